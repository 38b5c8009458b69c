"""The ``random_erasing`` domain: Random Erasing (Zhong et al., AAAI 2020), batched on the training device.

timm's ``RandomErasing`` (``--reprob --remode --recount``) with its parameters and sampling: each image is erased
with ``probability``; it gets ``count`` boxes, ``count`` uniform in ``[min_count, max_count]``; each box's area is
``U(min_area, max_area) / count`` of the image and its aspect ratio log-uniform in ``[min_aspect, max_aspect]``
(``1 / min_aspect`` by default), side lengths rounded, with up to 10 tries for a box that fits (a box whose 10
tries all fail is left out, as in timm); its top-left corner is uniform over the places it fits. Boxes are pasted
in order, a later one over an earlier one.

Why not timm's class itself: it draws from Python's and torch's *global* generators, loops over the images on the
host, writes into its input, and erases *normalised* images. Here every draw comes from ``ctx.generator`` (a run
and its resume erase the same boxes), the whole batch is erased with a few tensor operations and no host sync, a
new tensor is returned, and the images are in [0, 1] before the model's normalisation. So the fill values are
timm's mapped back through that normalisation (the model's ``mean`` / ``std``, the recipe's or the data set's):

* ``const``: timm's 0 is the per-channel ``mean`` (the mean colour, not black);
* ``rand``: one ``N(0, 1)`` colour per box and channel, ``mean + std * z``;
* ``pixel``: ``N(0, 1)`` per pixel and channel, ``mean + std * z``.

``rand`` and ``pixel`` values are clamped to [0, 1] (a domain's images stay there): with ImageNet's statistics
about 3 % of the pixel-mode values (``|z|`` beyond 1.8-2.6) land on 0 or 1, so the erased region's spread is a little
below the unit normal's in normalised space. A model without ``mean`` / ``std`` buffers gets 0.5 / 0.5.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mbn.domain import Domain, DomainContext
from mbn.registry import register_domain
from mbn.validators import check_choice, check_int, check_number, check_probability

MODES = ("const", "rand", "pixel")
ATTEMPTS = 10  # timm's tries for a box that fits


def _statistics(ctx: DomainContext, images: Tensor) -> tuple[Tensor, Tensor]:
    """The model's input normalisation as ``(1, C, 1, 1)`` tensors in ``images``' dtype (0.5 / 0.5 without one)."""
    channels = images.shape[1]
    stats = []
    for name in ("mean", "std"):
        value = getattr(ctx.model, name, None)
        if not isinstance(value, Tensor) or value.numel() != channels:
            value = torch.full((channels,), 0.5)
        stats.append(value.detach().reshape(1, channels, 1, 1).to(device=images.device, dtype=images.dtype))
    return stats[0], stats[1]


@register_domain("random_erasing")
class RandomErasingDomain(Domain):
    """Erase random boxes of each image (timm's ``RandomErasing``, in [0, 1] pixel space); labels unchanged.

    Args:
        probability: chance that an image is erased (timm's ``--reprob``; DeiT uses 0.25).
        min_area: smallest area of the erased region, a fraction of the image (0.02).
        max_area: largest area (1/3).
        min_aspect: smallest aspect ratio, height / width (0.3).
        max_aspect: largest aspect ratio (``None``: ``1 / min_aspect``).
        mode: the fill, ``const`` (the mean colour), ``rand`` (a random colour per box) or ``pixel`` (random per
            pixel); timm's ``--remode``, whose default is ``pixel``.
        min_count: fewest boxes per erased image (1).
        max_count: most boxes (timm's ``--recount``; ``None``: ``min_count``); the area is divided among them.
    """

    def __init__(
        self,
        probability: float = 0.5,
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        mode: str = "pixel",
        min_count: int = 1,
        max_count: int | None = None,
    ) -> None:
        self.probability = check_probability("probability", probability)
        self.min_area = check_number("min_area", min_area, low=0, high=1)
        self.max_area = check_number("max_area", max_area, low=self.min_area, high=1)
        self.min_aspect = check_number("min_aspect", min_aspect, low=0, low_open=True)
        default_max = 1 / self.min_aspect
        self.max_aspect = check_number("max_aspect", default_max if max_aspect is None else max_aspect, low=min_aspect)
        self.mode = check_choice("mode", mode, MODES)
        self.min_count = check_int("min_count", min_count, low=1)
        self.max_count = check_int("max_count", self.min_count if max_count is None else max_count, low=self.min_count)

    def _boxes(self, n: int, h: int, w: int, ctx: DomainContext, device: torch.device) -> tuple[Tensor, ...]:
        """Per image and box slot: ``(active, top, left, height, width)``, each ``(n, max_count)``."""
        slots = self.max_count
        erased = ctx.rand((n, 1), device=device) < self.probability
        count = self.min_count + (ctx.rand((n, 1), device=device) * (slots - self.min_count + 1)).long()
        count = count.clamp_(max=slots)
        shape = (n, slots, ATTEMPTS)
        area = self.min_area + ctx.rand(shape, device=device, dtype=torch.float64) * (self.max_area - self.min_area)
        area = area * (h * w) / count.unsqueeze(-1)
        low, high = math.log(self.min_aspect), math.log(self.max_aspect)
        aspect = torch.exp(low + ctx.rand(shape, device=device, dtype=torch.float64) * (high - low))
        heights = torch.sqrt(area * aspect).round().long()
        widths = torch.sqrt(area / aspect).round().long()
        fits = (heights < h) & (widths < w)
        first = fits.long().argmax(dim=-1, keepdim=True)  # timm's first try that fits
        bh, bw = heights.gather(-1, first).squeeze(-1), widths.gather(-1, first).squeeze(-1)
        slot = torch.arange(slots, device=device).unsqueeze(0)
        active = erased & fits.any(dim=-1) & (slot < count)
        top = (ctx.rand((n, slots), device=device, dtype=torch.float64) * (h - bh + 1).clamp(min=1)).long()
        left = (ctx.rand((n, slots), device=device, dtype=torch.float64) * (w - bw + 1).clamp(min=1)).long()
        return active, top, left, bh, bw

    def generate(self, images: Tensor, labels: Tensor, ctx: DomainContext) -> tuple[Tensor, Tensor]:
        """Return ``(erased images, labels)``: a new batch of the input's shape, dtype and device, in [0, 1]."""
        if self.probability == 0:
            return images, labels  # nothing drawn, nothing erased: the batch as given (no copy, as clean)
        n, c, h, w = images.shape
        device = images.device
        active, top, left, bh, bw = self._boxes(n, h, w, ctx, device)
        mean, std = _statistics(ctx, images)
        rows = torch.arange(h, device=device).view(1, h, 1)
        cols = torch.arange(w, device=device).view(1, 1, w)
        out = images
        noise = None
        if self.mode == "pixel":  # one draw per pixel serves every box: each erased pixel gets its own N(0, 1)
            noise = (mean + std * ctx.randn((n, c, h, w), device=device, dtype=images.dtype)).clamp(0.0, 1.0)
        for j in range(self.max_count):  # in order: a later box is pasted over an earlier one
            inside = (rows >= top[:, j, None, None]) & (rows < (top[:, j] + bh[:, j])[:, None, None])
            inside = inside & (cols >= left[:, j, None, None]) & (cols < (left[:, j] + bw[:, j])[:, None, None])
            inside = (inside & active[:, j, None, None]).unsqueeze(1)  # (n, 1, h, w)
            if noise is not None:
                fill = noise
            elif self.mode == "rand":  # one colour per image and box
                fill = (mean + std * ctx.randn((n, c, 1, 1), device=device, dtype=images.dtype)).clamp(0.0, 1.0)
            else:
                fill = mean.expand(n, c, 1, 1)
            out = torch.where(inside, fill, out)
        return out, labels
