"""The ``rotation`` domain: self-supervised rotation prediction (RotNet, Gidaris et al., ICLR 2018).

Each image is rotated by ``k x 90`` degrees with ``k`` drawn per image from the step's generator, and a
4-way ``rotation`` head on the penultimate features predicts ``k`` (Hendrycks et al., "Using
Self-Supervised Learning Can Improve Model Robustness and Uncertainty", NeurIPS 2019). Class labels
are not used. The batch goes through whichever BN the recipe's ``bn:`` names; ``input: adv`` rotates
another domain's (e.g. adversarial) images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mbn import rng
from mbn.domain import Domain, DomainContext
from mbn.objective import Objective
from mbn.registry import register_domain

ROTATION_HEAD = "rotation"
NUM_ROTATIONS = 4


def rotate_quarters(images: Tensor, k: Tensor) -> Tensor:
    """Rotate image ``i`` by ``k[i] x 90`` degrees counter-clockwise (``torch.rot90`` on H, W).

    Gathers from the four rotations of the batch, so ``k`` stays on the device (no host sync).

    Shape:
        images: ``(N, C, S, S)`` (square); k: ``(N,)`` int64 in ``{0, 1, 2, 3}``; output as images.

    Raises:
        ValueError: non-square images or ``k`` of another length.
    """
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square (N, C, S, S) to rotate by 90 degrees, got {tuple(images.shape)}")
    if k.shape != images.shape[:1]:
        raise ValueError(f"k must hold one rotation per image: {tuple(k.shape)} vs {tuple(images.shape)}")
    stacked = torch.stack([torch.rot90(images, q, dims=(2, 3)) for q in range(NUM_ROTATIONS)])  # (4, N, C, S, S)
    return stacked[k.to(images.device), torch.arange(images.shape[0], device=images.device)]


def draw_rotations(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``n`` rotation indices drawn uniformly from ``{0, 1, 2, 3}`` on the generator's device."""
    return rng.randint(0, NUM_ROTATIONS, (n,), generator=generator, device=device)


@register_domain("rotation")
class RotationDomain(Domain):
    """Rotate each image by a random multiple of 90 degrees; the target is the multiple (0-3).

    Scored by the 4-way ``rotation`` head with plain cross-entropy (no label smoothing). Its weight is
    the self-supervision weight (Hendrycks et al. use 0.5 beside adversarial training).
    """

    def heads(self) -> dict[str, int]:
        """One 4-way ``rotation`` head."""
        return {ROTATION_HEAD: NUM_ROTATIONS}

    def objective(self, default: Objective) -> Objective:
        """Cross-entropy of the ``rotation`` head."""
        return Objective(head=ROTATION_HEAD)

    def generate(self, images: Tensor, labels: Tensor, ctx: DomainContext) -> tuple[Tensor, Tensor]:
        """Return ``(rotated images, k)`` with ``k`` drawn per image from ``ctx.generator``."""
        k = draw_rotations(images.shape[0], ctx.generator, images.device)
        return rotate_quarters(images, k), k
