"""Data sets held in memory as uint8 NHWC arrays: CIFAR-10/100, a decoded (and cached) ImageFolder tree, synthetic.

CIFAR comes through torchvision; an ImageFolder tree is decoded once and cached as ``.npy`` outside the tree
(:func:`default_cache_dir`), with the file's SHA-256 beside it (``.npy.sha256``, as ``sha256sum`` writes it) and
checked on every load; the synthetic shape set comes from :mod:`mbn.synthetic`. :func:`load_arrays` and
:func:`load_test_split` read the ``data`` section of a recipe.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbn.config import RecipeError
from mbn.data.arrays import ArraySplit, DataStats, channel_stats, subset_indices
from mbn.data.files import (
    DEFAULT_MAX_IMAGE_PIXELS,
    decode_image_file,
    evaluation_folder,
    folder_classes,
    folder_samples,
    image_header_size,
    read_image_file,
)
from mbn.data.streamed import StreamEvalLoader, StreamingImageFolder
from mbn.data.transforms import resize_centre_crop
from mbn.errors import first_line
from mbn.fileio import atomic_write, atomic_write_text
from mbn.synthetic import SYNTHETIC_CLASSES, generate_synthetic

log = logging.getLogger(__name__)

#: Per-channel statistics in [0, 1] units, computed on the training sets.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

# 2: the fingerprint covers the absolute root and file mtimes; 3: 16-bit PNGs, animated GIFs; 4: a .sha256 beside
_CACHE_VERSION = 4
_HASH_CHUNK = 2**24
_DECODE_CHUNK = 512


def _load_cifar(cfg: Any, splits: Sequence[str] = ("train", "test")) -> tuple[dict[str, ArraySplit], list[str]]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if cfg.name == "cifar10" else CIFAR100
    if cfg.image_size != 32:
        raise RecipeError(f"key 'data.image_size': {cfg.name} images are 32x32, got {cfg.image_size}")
    loaded = {}
    for split in splits:
        try:
            ds = cls(str(cfg.root), train=split == "train", download=bool(cfg.download))
        except RuntimeError as err:
            raise RecipeError(
                f"key 'data.root': {cfg.name} not found under {cfg.root!r} (expected {cls.base_folder}/ there; "
                f"set data.download=true to fetch it): {first_line(err)}"
            ) from None
        loaded[split] = ArraySplit(np.ascontiguousarray(ds.data), np.asarray(ds.targets, dtype=np.int64))
    return loaded, list(ds.classes)


def default_cache_dir() -> Path:
    """Where decoded ImageFolder arrays are cached: ``$MBN_CACHE_DIR``, else ``$XDG_CACHE_HOME/mbn``.

    The cache lives outside the dataset tree so that read-only and shared trees work and stay clean.
    """
    if os.environ.get("MBN_CACHE_DIR"):
        return Path(os.environ["MBN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mbn"


def _decode_files(paths: Sequence[str], image_size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode image files to uint8 (N, S, S, 3); other sizes get a shorter-side resize and a centre crop.

    Each file's header is checked against ``max_pixels`` (``data.max_image_pixels``) before anything is decoded.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    for lo in range(0, len(paths), _DECODE_CHUNK):
        chunk = paths[lo : lo + _DECODE_CHUNK]
        datas = [read_image_file(p, max_pixels) for p in chunk]
        for path, data in zip(chunk, datas, strict=True):
            image_header_size(path, data, max_pixels)
        try:  # libjpeg-turbo on a whole list is ~4x faster than PIL file by file
            if not all(p.lower().endswith((".jpg", ".jpeg")) for p in chunk):
                raise ValueError("not all JPEG")
            images = decode_jpeg(datas, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            images = [decode_image_file(path, data, max_pixels) for path, data in zip(chunk, datas, strict=True)]
        for i, img in enumerate(images):
            out[lo + i] = resize_centre_crop(img, image_size).permute(1, 2, 0).numpy()
    return out


def _fingerprint(root: Path, samples: Sequence[tuple[str, int]], image_size: int) -> str:
    """Identity of a decoded set: the tree's absolute path, each file's path, size, mtime and label."""
    digest = hashlib.sha1(f"v{_CACHE_VERSION}|{image_size}|{root.resolve()}".encode("utf-8", "surrogateescape"))
    for path, label in samples:
        info = os.stat(path)
        entry = f"|{os.path.relpath(path, root)}:{info.st_size}:{info.st_mtime_ns}:{label}"
        digest.update(entry.encode("utf-8", "surrogateescape"))  # file names need not be UTF-8
    return digest.hexdigest()[:20]


def _hash_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


class _HashingFile:
    """A binary file whose reads or writes also feed a SHA-256 (``np.save`` writes through it in chunks)."""

    def __init__(self, f: Any) -> None:
        self.f, self.digest = f, hashlib.sha256()

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return int(self.f.write(data))

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.digest.update(data)
        return bytes(data)


def _write_cache(path: Path, images: np.ndarray) -> None:
    """``images`` as ``path`` (``.npy``) and its SHA-256 as ``path.sha256`` (``sha256sum -c`` checks it)."""
    written: list[str] = []

    def save(f: Any) -> None:
        out = _HashingFile(f)
        np.save(out, images)  # type: ignore[arg-type]  # not a real file: numpy writes it chunk by chunk
        written.append(out.digest.hexdigest())

    atomic_write(path, save)
    atomic_write_text(_hash_path(path), f"{written[-1]}  {path.name}\n")


def _read_cache(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached images at ``path`` if it holds ``shape`` uint8 and its SHA-256 is the one recorded beside it.

    ``None`` without a word when there is no cache yet; ``None`` with one warning line naming the cache when it is
    damaged (truncated, another shape, other content than written, no recorded hash): it is decoded again.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        return _damaged(path, first_line(err))
    if not stat.S_ISREG(info.st_mode):  # a FIFO there would block np.load forever
        return _damaged(path, "not a regular file")
    try:
        recorded = _hash_path(path).read_text(encoding="ascii").split()[0]
    except (OSError, ValueError, IndexError):
        return _damaged(path, f"no SHA-256 recorded in {_hash_path(path).name}")
    try:
        with open(path, "rb") as raw:
            f = _HashingFile(raw)
            version = np.lib.format.read_magic(f)  # type: ignore[arg-type]
            header = np.lib.format.read_array_header_2_0 if version == (2, 0) else np.lib.format.read_array_header_1_0
            found, fortran, dtype = header(f)  # type: ignore[arg-type]
            if tuple(found) != shape or dtype != np.uint8 or fortran:
                return _damaged(path, f"holds {dtype} {tuple(found)}, not uint8 {shape}")
            images = np.empty(shape, dtype=np.uint8)
            view, done = images.data.cast("B"), 0
            while done < len(view):
                got = raw.readinto(view[done : done + _HASH_CHUNK])
                if not got:
                    return _damaged(path, "truncated")
                f.digest.update(view[done : done + got])
                done += got
            f.read()  # anything after the array is hashed too (and makes the hash differ)
    except (OSError, ValueError) as err:
        return _damaged(path, first_line(err))
    if f.digest.hexdigest() != recorded:
        return _damaged(path, f"its SHA-256 is not the one recorded in {_hash_path(path).name} when it was written")
    return images


def _damaged(path: Path, why: str) -> np.ndarray | None:
    log.warning("decoded-image cache %s is damaged (%s); decoding the images again", path, why)
    return None


def _load_folder_split(
    root: Path,
    split: str,
    samples: list[tuple[str, int]],
    image_size: int,
    cache_dir: Path | None,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> ArraySplit:
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    key = _fingerprint(root, samples, image_size)
    name = root.name.encode("utf-8", "surrogateescape").decode("ascii", "replace")[:40]  # short, printable
    folder = split.replace("/", "_").replace(os.sep, "_")  # data.test_split may name a nested folder
    path = cache_dir / f"{name}-{folder}-{len(samples)}-{image_size}px-{key}.npy" if cache_dir else None
    if path is not None:
        cached = _read_cache(path, (len(samples), image_size, image_size, 3))
        if cached is not None:
            return ArraySplit(cached, labels, cache_file=str(path))
    log.info("decoding %d images from %s/%s (once; cached in %s)", len(samples), root, split, cache_dir)
    images = _decode_files([p for p, _ in samples], image_size, max_pixels)
    if path is not None:
        try:
            _write_cache(path, images)
        except OSError as err:  # a cache is optional: train from memory, decode again next time
            log.warning("could not cache decoded images: %s", err)
            return ArraySplit(images, labels)
    return ArraySplit(images, labels, cache_file=None if path is None else str(path))


def load_image_folder(
    root: str | Path,
    image_size: int = 32,
    train_limit: int | None = None,
    test_limit: int | None = None,
    cache_dir: str | Path | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    test_split: str = "test",
) -> tuple[ArraySplit, ArraySplit, list[str]]:
    """Load ``<root>/train/<class>/*`` and ``<root>/<test_split>/<class>/*`` into memory.

    Limits are applied to the file lists before decoding, so a small subset of a large tree is cheap.
    Decoded arrays are cached under ``cache_dir`` keyed by a fingerprint of the selected files (paths,
    sizes, labels) and the image size.

    Args:
        root: the tree's root.
        image_size: side length of the held images; other sizes are resized and centre-cropped.
        train_limit: keep this many training images (fixed seeded choice); None keeps all.
        test_limit: the same for the test split.
        cache_dir: cache folder; defaults to :func:`default_cache_dir`.
        max_image_pixels: images with more pixels (from their headers) are refused before decoding.
        test_split: the evaluation folder under ``root`` (``data.test_split``: ``test``, ``val``).

    Returns:
        ``(train, test, class_names)``; labels follow the sorted train class folders.

    Raises:
        RecipeError: missing folders, no images, test classes absent from train, or a bad file (named).
    """
    root = Path(root)
    classes = folder_classes(root, test_split)  # before decoding anything
    train = load_image_folder_split(root, "train", classes, image_size, train_limit, cache_dir, max_image_pixels)
    test = load_image_folder_split(root, test_split, classes, image_size, test_limit, cache_dir, max_image_pixels)
    return train, test, classes


def load_image_folder_split(
    root: str | Path,
    split: str,
    classes: Sequence[str],
    image_size: int = 32,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> ArraySplit:
    """Load one split, ``<root>/<split>/<class>/*``, labelling folders by their index in ``classes``.

    The test split of a trained model is loaded this way with the class names stored in its checkpoint,
    so evaluation never decodes the training images.

    Raises:
        RecipeError: a missing folder, no images, or a class folder not in ``classes``.
    """
    root = Path(root)
    samples = folder_samples(root, split, classes, limit, max_pixels=max_image_pixels)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _load_folder_split(root.resolve(), split, samples, image_size, cache, max_image_pixels)


def _max_pixels(cfg: Any) -> int:
    """``data.max_image_pixels`` (its default for a recipe stored before the key existed)."""
    return int(getattr(cfg, "max_image_pixels", None) or DEFAULT_MAX_IMAGE_PIXELS)


def _check_synthetic(cfg: Any) -> None:
    for key in ("synthetic_train_size", "synthetic_test_size"):
        if getattr(cfg, key) < 1:
            raise RecipeError(f"key 'data.{key}': expected a positive integer, got {getattr(cfg, key)}")
    if cfg.image_size < 8:
        raise RecipeError(f"key 'data.image_size': synthetic images need at least 8 pixels, got {cfg.image_size}")


def _unknown_dataset(cfg: Any) -> RecipeError:
    return RecipeError(f"key 'data.name': expected cifar10, cifar100, imagefolder or synthetic, got {cfg.name!r}")


def _limit(split: ArraySplit, limit: int | None, key: str) -> ArraySplit:
    idx = subset_indices(len(split), limit, key)
    return ArraySplit(split.images[idx], split.labels[idx])


def load_arrays(cfg: Any) -> tuple[ArraySplit, ArraySplit, DataStats]:
    """Load the dataset named by ``cfg.name`` with limits applied: train, test and the training statistics."""
    if cfg.name in ("cifar10", "cifar100"):
        loaded, classes = _load_cifar(cfg)
        train, test = loaded["train"], loaded["test"]
        mean: tuple[float, ...]
        std: tuple[float, ...]
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if cfg.name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    elif cfg.name == "imagefolder":
        train, test, classes = load_image_folder(
            cfg.root,
            cfg.image_size,
            cfg.train_limit,
            cfg.test_limit,
            max_image_pixels=_max_pixels(cfg),
            test_split=evaluation_folder(cfg),
        )
        mean, std = channel_stats(train.images)
        if min(std) == 0:
            raise RecipeError(
                f"key 'data.root': the training images under {cfg.root} are constant in channel "
                f"{std.index(0.0)} (std 0); they cannot be normalised or learned from"
            )
    elif cfg.name == "synthetic":
        _check_synthetic(cfg)
        # Fixed data seeds: every run sees the same synthetic train and test sets.
        train = ArraySplit(*generate_synthetic(cfg.synthetic_train_size, cfg.image_size, seed=0))
        test = ArraySplit(*generate_synthetic(cfg.synthetic_test_size, cfg.image_size, seed=1))
        classes = list(SYNTHETIC_CLASSES)
        mean, std = channel_stats(train.images)
    else:
        raise _unknown_dataset(cfg)
    if cfg.name != "imagefolder":  # the folder loader applies limits before decoding
        train = _limit(train, cfg.train_limit, "data.train_limit")
        test = _limit(test, cfg.test_limit, "data.test_limit")
    return train, test, DataStats(tuple(classes), tuple(mean), tuple(std), int(train.images.shape[1]))


def load_test_split(cfg: Any, stats: DataStats) -> ArraySplit:
    """The test split named by ``cfg`` (limit applied), labelled by ``stats.class_names``; no training data read.

    Raises:
        RecipeError: missing or malformed dataset, or test classes the model was not trained on.
    """
    if cfg.name in ("cifar10", "cifar100"):
        loaded, _ = _load_cifar(cfg, splits=("test",))
        return _limit(loaded["test"], cfg.test_limit, "data.test_limit")
    if cfg.name == "imagefolder" and not getattr(cfg, "preload", True):
        return _decode_streamed_test_split(cfg, stats)
    if cfg.name == "webdataset":  # the data.test_root shards
        from mbn.data.shards import load_shard_test_split

        return load_shard_test_split(cfg, stats.class_names)
    if cfg.name == "imagefolder":
        return load_image_folder_split(
            cfg.root,
            evaluation_folder(cfg),
            stats.class_names,
            stats.image_size,
            cfg.test_limit,
            max_image_pixels=_max_pixels(cfg),
        )
    if cfg.name == "synthetic":
        _check_synthetic(cfg)
        test = ArraySplit(*generate_synthetic(cfg.synthetic_test_size, cfg.image_size, seed=1))
        return _limit(test, cfg.test_limit, "data.test_limit")
    raise _unknown_dataset(cfg)


def _decode_streamed_test_split(cfg: Any, stats: DataStats) -> ArraySplit:
    """A streamed run's test split, decoded in workers with its evaluation transform (``crop_fraction``)."""
    samples = folder_samples(
        Path(cfg.root), evaluation_folder(cfg), stats.class_names, cfg.test_limit, check_files=False
    )
    dataset = StreamingImageFolder(
        samples, stats.image_size, train=False, augment=cfg.augment, crop_fraction=cfg.crop_fraction,
        min_image_side=cfg.min_image_side, max_image_pixels=_max_pixels(cfg),
    )  # fmt: skip
    batches = list(StreamEvalLoader(dataset, cfg.eval_batch_size, cfg.num_workers, pin_memory=False))
    images = torch.cat([b[0] for b in batches]).permute(0, 2, 3, 1).contiguous().numpy()
    return ArraySplit(images, np.concatenate([b[1].numpy() for b in batches]))
