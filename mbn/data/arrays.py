"""In-memory data: a split held as arrays, the fixed subset a limit selects, channel statistics, :class:`DataStats`.

The bottom of :mod:`mbn.data`: it imports no other module of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mbn.config import RecipeError

_SUBSET_SEED = 20200614  # fixed, so train_limit/test_limit pick the same images whatever the run seed


@dataclass
class ArraySplit:
    """One split held in memory: uint8 images (N, H, W, 3) and int64 labels (N,).

    ``cache_file``: the decoded-image cache the images were read from or written to (an ImageFolder tree), if any.
    """

    images: np.ndarray
    labels: np.ndarray
    cache_file: str | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)


def subset_indices(num_items: int, limit: int | None, key: str = "limit") -> np.ndarray:
    """Sorted indices of the first ``limit`` items after a fixed seeded shuffle (all items when None).

    Raises:
        RecipeError: if ``limit`` is not positive.
    """
    if limit is None or limit >= num_items:
        return np.arange(num_items)
    if limit < 1:
        raise RecipeError(f"key '{key}': expected a positive integer or null, got {limit}")
    perm = np.random.default_rng(_SUBSET_SEED).permutation(num_items)
    return np.sort(perm[:limit])


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std in [0, 1] units of uint8 NHWC images (from 256-bin histograms)."""
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[-1]):
        hist = np.bincount(images[..., c].ravel(), minlength=256).astype(np.float64)
        hist /= hist.sum()
        mean = float(hist @ values)
        means.append(mean)
        stds.append(float(np.sqrt(hist @ (values - mean) ** 2)))
    return tuple(means), tuple(stds)


@dataclass(frozen=True)
class DataStats:
    """What a trained model needs from its training data: class names and input normalisation.

    Checkpoints store it (``to_dict``), so evaluation loads only the test split.
    """

    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so ``torch.load(weights_only=True)`` reads it back."""
        return {
            "class_names": list(self.class_names),
            "mean": list(self.mean),
            "std": list(self.std),
            "image_size": self.image_size,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataStats:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tuple(str(c) for c in d["class_names"]),
            tuple(float(m) for m in d["mean"]),
            tuple(float(v) for v in d["std"]),
            int(d["image_size"]),
        )
