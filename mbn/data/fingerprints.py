"""Identities of a training set, stored in checkpoints and checked on resume (cheap: labels and 64 samples)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mbn.data.files import DEFAULT_MAX_IMAGE_PIXELS, read_image_file


def training_set_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """Identity of a training set for resume: its size, every label and 64 images spread over it (cheap)."""
    digest = hashlib.sha1(f"{images.shape}".encode())
    digest.update(np.ascontiguousarray(labels).tobytes())
    step = max(1, len(images) // 64)
    digest.update(np.ascontiguousarray(images[::step][:64]).tobytes())
    return digest.hexdigest()[:20]


def streamed_fingerprints(
    root: Path, train: Sequence[tuple[str, int]], image_size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[str, str]:
    """Identity of a streamed training set for resume: (file list and labels, the same plus 64 files' bytes).

    The second is what a checkpoint stores; the first is what runs saved before mbn 0.3.1 stored (still accepted).
    The files are read as for decoding (:func:`mbn.data.files.read_image_file`: regular, non-empty, bounded).

    Raises:
        RecipeError: a sampled file that is not a readable image file (a FIFO, a device, ...), named.
    """
    digest = hashlib.sha1(f"{len(train)}|{image_size}".encode())
    for path, label in train:
        digest.update(f"|{os.path.relpath(path, root)}:{label}".encode("utf-8", "surrogateescape"))
    listing = digest.hexdigest()[:20]
    step = max(1, len(train) // 64)
    for path, _ in train[::step][:64]:  # 64 files spread over the set, as for a preloaded one
        digest.update(read_image_file(path, max_pixels).numpy().data)
    return listing, digest.hexdigest()[:20]
