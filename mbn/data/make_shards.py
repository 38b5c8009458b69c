"""Write WebDataset tar shards from an ImageFolder tree: ``python -m mbn.data.make_shards SRC DST --shard-size N``.

``SRC/train/<class>/*`` (and ``SRC/test`` or ``SRC/val``, or the ``--splits`` named) become ``DST/train-000000.tar``,
... and ``DST/test-000000.tar``, ...: each sample is ``<key>.<ext>`` (the original file's bytes, never re-encoded) and
``<key>.cls`` (the class index as decimal text), as timm and the ``webdataset`` package read them. Classes are the
sorted folder names of ``train`` (as torchvision's ``ImageFolder``). Beside the shards, ``<split>.index.json`` holds
every shard's sample count and size and the class names (:mod:`mbn.data.shards` reads it instead of scanning).

Shards are read sequentially, so the order in which samples are written is the order within a shard at training
time: the samples are written in a seeded shuffled order (``--seed``), never class by class. Every file is written
under a temporary name and renamed once complete. The command prints the ``data.root`` / ``data.test_root``
overrides to use.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np

from mbn.config import RecipeError
from mbn.data.files import folder_samples, image_header_size, read_image_file
from mbn.data.shards import INDEX_FORMAT
from mbn.fileio import WriteError, atomic_write, atomic_write_text

SPLIT_CANDIDATES = ("train", "test", "val")


def find_classes(src: Path) -> list[str]:
    """The class folders of ``SRC/train``, sorted (torchvision's ``find_classes``)."""
    from torchvision.datasets.folder import find_classes as tv_find_classes

    if not src.is_dir():
        raise RecipeError(f"{src} is not a directory (expected SRC/train/<class>/<image>)")
    if not (src / "train").is_dir():
        raise RecipeError(f"{src / 'train'} is not a directory (expected SRC/train/<class>/<image>)")
    try:
        classes, _ = tv_find_classes(str(src / "train"))
    except (FileNotFoundError, OSError) as err:
        raise RecipeError(f"{src / 'train'}: {err}") from None
    return list(classes)


def write_split(src: Path, dst: Path, split: str, classes: Sequence[str], shard_size: int, seed: int) -> str:
    """Write the shards and index of one split; returns the brace pattern of its shards."""
    samples = folder_samples(src, split, classes)  # ImageFolder's listing; every file checked (regular, non-empty)
    if not samples:
        raise RecipeError(f"no images found in {src / split}")
    order = np.random.default_rng(seed).permutation(len(samples))
    shards = []
    for number, lo in enumerate(range(0, len(samples), shard_size)):
        name = f"{split}-{number:06d}.tar"
        chunk = [(lo + i, samples[j]) for i, j in enumerate(order[lo : lo + shard_size].tolist())]
        atomic_write(dst / name, functools.partial(_write_shard, chunk=chunk))
        shards.append({"name": name, "samples": len(chunk), "bytes": (dst / name).stat().st_size})
    index = {"format": INDEX_FORMAT, "version": 1, "split": split, "classes": list(classes), "samples": len(samples),
             "seed": seed, "shards": shards}  # fmt: skip
    atomic_write_text(dst / f"{split}.index.json", json.dumps(index, indent=1) + "\n")
    last = len(shards) - 1
    return str(dst / f"{split}-{{000000..{last:06d}}}.tar") if last else str(dst / f"{split}-000000.tar")


def _write_shard(f: IO[bytes], chunk: Sequence[tuple[int, tuple[str, int]]]) -> None:
    import webdataset as wds  # type: ignore[import-untyped]

    writer = wds.TarWriter(f, mtime=0.0)  # a fixed time: the same tree and seed give the same bytes
    for position, (path, label) in chunk:
        data = read_image_file(path).numpy().tobytes()
        image_header_size(path, data)  # a file that is not an image is named now, not at training time
        ext = Path(path).suffix.lower().lstrip(".")
        writer.write({"__key__": f"{position:09d}", ext: data, "cls": str(label)})
    writer.close()


def detect_splits(src: Path) -> list[str]:
    """``train`` and the evaluation folders present (``test``, ``val``)."""
    return [split for split in SPLIT_CANDIDATES if (src / split).is_dir()]


def check_destination(src: Path, dst: Path, splits: Sequence[str]) -> None:
    """DST is outside SRC and holds no shards of these splits yet (a re-run never mixes old and new shards)."""
    if dst.resolve().is_relative_to(src.resolve()):
        raise RecipeError(f"{dst} is inside the tree {src}: write the shards elsewhere")
    old = sorted(p.name for split in splits for p in dst.glob(f"{split}-*.tar")) if dst.is_dir() else []
    if old:
        raise RecipeError(
            f"{dst} already holds shards ({old[0]}, {len(old)} in all): remove them or choose another folder, so that "
            "no pattern mixes shards of two runs"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 with one line on stderr for bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m mbn.data.make_shards",
        description=(
            "Write WebDataset tar shards (<key>.jpg/.png + <key>.cls, the original bytes) and a JSON index from an "
            "ImageFolder tree SRC/<split>/<class>/<image>. Shards are read sequentially at training time, so the "
            "samples are written in a seeded shuffled order (--seed), never class by class."
        ),
    )
    parser.add_argument("src", type=Path, help="ImageFolder root: SRC/train/<class>/*, SRC/test or SRC/val")
    parser.add_argument("dst", type=Path, help="output folder: DST/<split>-000000.tar ..., DST/<split>.index.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--splits", nargs="+", default=None, help="splits to write (default: train, test, val found)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled sample order (default 0)")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error("--shard-size: expected a positive number of samples")
    try:
        classes = find_classes(args.src)
        splits = args.splits or detect_splits(args.src)
        check_destination(args.src, args.dst, splits)
        args.dst.mkdir(parents=True, exist_ok=True)
        patterns = {split: write_split(args.src, args.dst, split, classes, args.shard_size, args.seed)
                    for split in splits}  # fmt: skip
    except (RecipeError, WriteError, OSError) as err:
        message = str(err).removeprefix("key 'data.root': ")
        print(f"make_shards: {message}", file=sys.stderr)
        return 2
    for split, pattern in patterns.items():
        key = "data.root" if split == "train" else "data.test_root"
        print(f"{split}: {key}={pattern}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
