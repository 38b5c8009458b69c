"""A procedurally generated 10-class shape dataset that needs no download.

Each class is one shape (disk, ring, square, frame, triangle up/down, plus, x-cross, horizontal or
vertical stripes) drawn at a random position, scale and small rotation, in a random foreground colour
over a random background colour with Gaussian pixel noise. Colour carries no label information, so a
model has to learn shape and orientation: a small CNN reaches well above chance within a few hundred
CPU steps, which makes the set a stand-in for CIFAR-10 in smoke tests and demos. Generation is
vectorised numpy and deterministic given the seed.
"""

from __future__ import annotations

import numpy as np

#: Class names in label order.
SYNTHETIC_CLASSES: tuple[str, ...] = (
    "disk",
    "ring",
    "square",
    "frame",
    "triangle_up",
    "triangle_down",
    "plus",
    "cross",
    "hstripes",
    "vstripes",
)


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean foreground mask of class ``cls``; ``u``, ``v`` are shape-frame coordinates (unit ~ half size)."""
    au, av = np.abs(u), np.abs(v)
    bar = 0.28
    if cls in (0, 1):  # disk, ring
        r = np.sqrt(u * u + v * v)
        return (r <= 0.95) & (r >= (0.55 if cls == 1 else 0.0))
    if cls in (2, 3):  # square, frame
        box = np.maximum(au, av)
        return (box <= (0.8 if cls == 2 else 0.85)) & (box >= (0.5 if cls == 3 else 0.0))
    if cls in (4, 5):  # triangle up (image y grows downwards) / down: apex at -0.9, base at 0.8
        w = -v if cls == 5 else v
        return (w >= -0.9) & (w <= 0.8) & (au <= (w + 0.9) * 0.55)
    if cls in (6, 7):  # plus; rotating the frame by 45 degrees turns it into an x-cross
        if cls == 7:
            au, av = np.abs(u + v) / np.sqrt(2), np.abs(u - v) / np.sqrt(2)
        return ((au <= bar) & (av <= 0.9)) | ((av <= bar) & (au <= 0.9))
    # Horizontal / vertical stripes: three bands across the patch, alternating every 0.34 units.
    across = v if cls == 8 else u
    return (np.maximum(au, av) <= 0.85) & (np.floor((across + 0.85) / 0.34) % 2 == 0)


def generate_synthetic(
    num_images: int, image_size: int = 32, seed: int = 0, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Generate a class-balanced synthetic shape set.

    Args:
        num_images: number of images; labels cycle through the 10 classes before shuffling, so every
            class gets ``num_images // 10`` or one more.
        image_size: side length in pixels (at least 8).
        seed: generator seed; the same seed gives the same images and labels bit for bit.
        chunk: images rendered per vectorised step (bounds the float working memory).

    Returns:
        ``(images, labels)``: uint8 array (N, H, W, 3) and int64 array (N,).

    Raises:
        ValueError: if ``num_images`` < 0 or ``image_size`` < 8.
    """
    if num_images < 0:
        raise ValueError(f"num_images: expected a value >= 0, got {num_images}")
    if image_size < 8:
        raise ValueError(f"image_size: expected at least 8 pixels, got {image_size}")
    param_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    num_classes = len(SYNTHETIC_CLASSES)
    n = num_images
    labels = param_rng.permutation(np.arange(n) % num_classes).astype(np.int64)
    # Per-image parameters are drawn up front so that ``chunk`` does not change the result.
    scale = param_rng.uniform(0.35, 0.7, n).astype(np.float32)
    cx = param_rng.uniform(-1, 1, n).astype(np.float32) * (1 - scale)
    cy = param_rng.uniform(-1, 1, n).astype(np.float32) * (1 - scale)
    angle = param_rng.uniform(-0.26, 0.26, n).astype(np.float32)  # +-15 degrees keeps up/down and +/x apart
    # One colour from a dark range, one from a bright range, randomly assigned: colour is a nuisance.
    dark = param_rng.uniform(0.0, 0.45, (n, 1, 1, 3)).astype(np.float32)
    bright = param_rng.uniform(0.55, 1.0, (n, 1, 1, 3)).astype(np.float32)
    swap = param_rng.random((n, 1, 1, 1)) < 0.5
    fg, bg = np.where(swap, dark, bright), np.where(swap, bright, dark)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    grid = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2 - 1  # pixel centres in [-1, 1]
    for lo in range(0, n, chunk):
        sl = slice(lo, min(lo + chunk, n))
        lab, m = labels[sl], len(labels[sl])
        cos, sin = np.cos(angle[sl])[:, None, None], np.sin(angle[sl])[:, None, None]
        x = (grid[None, None, :] - cx[sl, None, None]) / scale[sl, None, None]
        y = (grid[None, :, None] - cy[sl, None, None]) / scale[sl, None, None]
        u, v = cos * x + sin * y, -sin * x + cos * y
        mask = np.zeros((m, image_size, image_size, 1), dtype=bool)
        for cls in range(num_classes):
            sel = lab == cls
            mask[sel, ..., 0] = _shape_mask(cls, u[sel], v[sel])
        noise = noise_rng.standard_normal((m, image_size, image_size, 3), dtype=np.float32)
        img = np.where(mask, fg[sl], bg[sl]) + 0.06 * noise
        images[sl] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return images, labels
