"""Two example domains, registered through entry points rather than the decorator."""

from __future__ import annotations

import torch
from torch import Tensor

import mbn


class Invert(mbn.Domain):
    """Photographic negative, blended with the clean image by ``strength``."""

    def __init__(self, strength: float = 1.0) -> None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        self.strength = strength

    def generate(self, images: Tensor, labels: Tensor, ctx: mbn.DomainContext) -> tuple[Tensor, Tensor]:
        """Blend each image with its negative."""
        return images + self.strength * (1.0 - 2.0 * images), labels


class ChannelShuffle(mbn.Domain):
    """A random colour-channel permutation per image."""

    def generate(self, images: Tensor, labels: Tensor, ctx: mbn.DomainContext) -> tuple[Tensor, Tensor]:
        """Permute the channels of each image independently."""
        n, c = images.shape[:2]
        perm = torch.rand(n, c, generator=ctx.generator, device=images.device).argsort(dim=1)  # (N, C)
        return images.gather(1, perm[:, :, None, None].expand_as(images)), labels
