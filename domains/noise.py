"""The ``gaussian_noise`` domain: additive i.i.d. Gaussian pixel noise, clamped to [0, 1].

The noise is the Gaussian-noise corruption of Hendrycks & Dietterich (ICLR 2019, ImageNet-C), drawn
on the training device from ``ctx.generator``. ``std`` is in 0-255 pixel units like every other
mbn recipe parameter (ImageNet-C's severities 1-5 are std 0.08-0.38 on [0, 1], i.e. about 20-97).
"""

from __future__ import annotations

from torch import Tensor

from mbn.domain import Domain, DomainContext
from mbn.registry import register_domain
from mbn.validators import check_number

PIXEL_SCALE = 255.0


@register_domain("gaussian_noise")
class GaussianNoiseDomain(Domain):
    """Add ``N(0, std^2)`` noise per pixel and channel, then clamp to [0, 1].

    Args:
        std: noise standard deviation in 0-255 pixel units (default 20, about ImageNet-C severity 1).
    """

    def __init__(self, std: float = 20.0) -> None:
        self.std = check_number("std", std, low=0, unit="in 0-255 pixel units")

    def generate(self, images: Tensor, labels: Tensor, ctx: DomainContext) -> tuple[Tensor, Tensor]:
        """Return ``(clamp(images + noise, 0, 1), labels)``; same shape, dtype and device."""
        noise = ctx.randn(images.shape, device=images.device, dtype=images.dtype)
        noisy = images + noise * (self.std / PIXEL_SCALE)
        return noisy.clamp_(0.0, 1.0), labels
