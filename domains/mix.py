"""The ``mixup`` and ``cutmix`` domains: batch-level image mixing with soft targets.

mixup (Zhang et al., ICLR 2018) blends each image with its neighbour in the batch, ``lam * x + (1 - lam) * x'``;
CutMix (Yun et al., ICCV 2019) pastes a box of the neighbour into the image. Both draw ``lam ~ Beta(alpha, alpha)``
once per batch and return probability targets ``lam * onehot(y) + (1 - lam) * onehot(y')`` (for CutMix ``lam`` is
the unpasted area), which the trainer scores with cross-entropy against probabilities. Defaults are the torchvision
references' (mixup 0.2, cutmix 1.0).

The mixing is torchvision's :class:`~torchvision.transforms.v2.MixUp` / :class:`~torchvision.transforms.v2.CutMix`.
They draw from torch's global CPU generator; here that generator is forked and seeded from ``ctx.seed`` (the
trainer's host-side seed of this domain and step; outside the trainer, a draw from ``ctx.generator``), so a batch
depends only on the step's seed (a resume repeats it), no step waits on the device, and the global RNG is left as
it was. torchvision's rather than timm's ``Mixup``: timm's draws from NumPy's global generator and needs an even
batch, where a domain's share of a batch (``fraction``) may be odd.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2

from mbn.domain import Domain, DomainContext
from mbn.registry import register_domain
from mbn.validators import check_number


class _MixingDomain(Domain):
    """Shared part of mixup and cutmix: seeding, label checks, the call into torchvision."""

    transform: type[v2.Transform]

    def __init__(self, alpha: float) -> None:
        self.alpha = check_number("alpha", alpha, low=0, low_open=True, unit="(the Beta(alpha, alpha) of lam)")

    def generate(self, images: Tensor, labels: Tensor, ctx: DomainContext) -> tuple[Tensor, Tensor]:
        """Mix ``images`` with their batch neighbours; targets ``(N, num_classes)`` probabilities summing to 1."""
        if labels.is_floating_point() and labels.ndim == 2:
            targets = labels.float()
        elif labels.ndim == 1 and not labels.is_floating_point():
            targets = labels
        else:
            raise ValueError(
                f"{self.name} needs class indices (N,) or probabilities (N, K) as labels, got {tuple(labels.shape)} "
                f"{labels.dtype}"
            )
        seed = ctx.seed  # the trainer's host-side seed: reading a CUDA generator here would sync every step
        if seed is None:
            seed = int(ctx.randint(0, 2**62, (1,)))
        mix = self.transform(alpha=self.alpha, num_classes=ctx.num_classes)
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: lam and the box are drawn there
            torch.default_generator.manual_seed(seed)
            mixed, soft = mix(images, targets)
        return mixed, soft.to(torch.float32)


@register_domain("mixup")
class MixUpDomain(_MixingDomain):
    """mixup (Zhang et al. 2018): ``lam * x + (1 - lam) * roll(x)``, ``lam ~ Beta(alpha, alpha)`` per batch.

    Args:
        alpha: the Beta distribution's parameter (0.2 in the torchvision references; timm uses 0.8).
    """

    name = "mixup"
    transform = v2.MixUp

    def __init__(self, alpha: float = 0.2) -> None:
        super().__init__(alpha)


@register_domain("cutmix")
class CutMixDomain(_MixingDomain):
    """CutMix (Yun et al. 2019): a box of ``roll(x)`` covering ``1 - lam`` of the image pasted into ``x``.

    Args:
        alpha: the Beta distribution's parameter (1.0 in the torchvision references and timm).
    """

    name = "cutmix"
    transform = v2.CutMix

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__(alpha)
