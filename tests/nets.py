"""Small models shared by the test modules."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Small conv net with BatchNorm that takes [0, 1] images (normalisation inside)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - self.mean) / self.std)


class BNFreeLinear(nn.Module):
    """A linear classifier on 3x32x32 images whose BN is never used: batch statistics cannot tell batches apart.

    The unused BN lets it through mbn's N-BatchNorm conversion (a model without any BN is refused).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, num_classes)
        self.unused = nn.BatchNorm1d(1, affine=False)  # no parameters: DDP finds none unused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def bn_free_classifier(cfg, num_classes, mean, std):  # the signature of mbn.models.create_model
    """A drop-in for ``mbn.builders.create_model`` building :class:`BNFreeLinear` (seeded: same weights each call)."""
    from mbn.models import ImageClassifier

    torch.manual_seed(0)
    return ImageClassifier(BNFreeLinear(num_classes), mean, std)
