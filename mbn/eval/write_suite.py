"""``mbn-eval RUN --write-suite DIR``: a corruption suite in CIFAR-10-C's published layout, from a run's test split.

For users without the official arrays: mbn's generator (:mod:`mbn.eval.corruptions`, the authors' constants)
corrupts the run's test images and writes ``DIR/<corruption>.npy`` (uint8 NHWC, the five severities stacked,
severity 1 first), ``DIR/labels.npy`` (the labels, five times) and ``DIR/classes.txt`` (the run's class names, one
per line, which the reader uses instead of CIFAR's label order). ``mbn-eval RUN --suite cifar10-c=DIR`` reads it
back like the official arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np

from mbn.eval.corruptions import SEVERITIES, load_or_generate
from mbn.fileio import atomic_write, atomic_write_text


def write_corruption_suite(
    out_dir: Path,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    cache_dir: Path,
    dataset_id: str,
    corruptions: Sequence[str],
    seed: int = 0,
    progress: bool = False,
) -> list[Path]:
    """Generate (or reuse from ``cache_dir``) every corruption at the five severities and write the layout.

    Each file is written atomically; an existing suite folder is refused by the caller, never mixed into.

    Returns:
        The files written.
    """
    sets = load_or_generate(
        images, labels, cache_dir, dataset_id, corruptions, SEVERITIES, seed=seed, progress=progress
    )
    written = []
    for name in corruptions:
        stacked = np.concatenate([np.asarray(sets[(name, s)]) for s in SEVERITIES])
        path = out_dir / f"{name}.npy"
        atomic_write(path, partial(np.save, arr=stacked))
        written.append(path)
    atomic_write(out_dir / "labels.npy", partial(np.save, arr=np.tile(np.asarray(labels, np.int64), len(SEVERITIES))))
    atomic_write_text(out_dir / "classes.txt", "".join(f"{name}\n" for name in class_names))
    return [*written, out_dir / "labels.npy", out_dir / "classes.txt"]
