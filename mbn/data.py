"""Datasets, CPU-side base transforms and resumable, deterministic loaders.

Every dataset is held in memory as uint8 NHWC arrays: CIFAR-10/100 through torchvision, an ImageFolder
tree (``<root>/{train,test}/<class>/*``, decoded once and cached as ``.npy``) or the embedded synthetic
shape set (:mod:`mbn.synthetic`). Training batches get the standard CIFAR base augmentation (zero-padded
random crop and horizontal flip, He et al. 2016) with albumentations in DataLoader workers; each
sample's augmentation is seeded from ``(seed, epoch, sample index)``, so an epoch's batches are
identical bit for bit whatever the worker count, and a resumed run can jump to any batch without
touching the ones before. Batches are ``(uint8 NCHW images, int64 labels)``; :func:`to_device` turns
them into float images in [0, 1] on the training device, where the domains run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import signal
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI for updates on import

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, get_worker_info

from mbn.config import RecipeError, check_data_path
from mbn.errors import first_line
from mbn.fileio import atomic_write
from mbn.synthetic import SYNTHETIC_CLASSES, generate_synthetic

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]

#: Per-channel statistics in [0, 1] units, computed on the training sets.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

_SUBSET_SEED = 20200614  # fixed, so train_limit/test_limit pick the same images whatever the run seed
_CACHE_VERSION = 3  # 2: the fingerprint covers the absolute root and file mtimes; 3: 16-bit PNGs, animated GIFs
_DECODE_CHUNK = 512


# --------------------------------------------------------------------------------------------- arrays


@dataclass
class ArraySplit:
    """One split held in memory: uint8 images (N, H, W, 3) and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

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


# -------------------------------------------------------------------------------------------- sources


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


def decode_image_file(path: str, data: Any = None) -> torch.Tensor:
    """One image file (or its bytes, ``data``) as uint8 RGB (3, H, W); a :class:`RecipeError` names a bad file."""
    from torchvision.io import ImageReadMode, decode_image

    data = read_image_file(path) if data is None else data
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        return _decode_with_pil(path, err)
    if image.ndim == 4:  # an animated image (GIF): its first frame, as torchvision's ImageFolder (PIL) reads it
        image = image[0]
    if image.dtype == torch.uint16:  # a 16-bit PNG: its top 8 bits (PIL keeps them for RGB but clips grayscale to 255)
        image = image.to(torch.int32).div(256, rounding_mode="floor").to(torch.uint8)
    return image


def resize_centre_crop(image: torch.Tensor, size: int, crop_fraction: float = 1.0) -> torch.Tensor:
    """Shorter side to ``size / crop_fraction`` (antialiased), then the central ``size`` x ``size`` crop."""
    from torchvision.transforms.v2 import functional as TF

    resize = math.floor(size / crop_fraction) if crop_fraction < 1.0 else size
    if min(image.shape[-2:]) != resize:
        image = TF.resize(image, resize, antialias=True)
    if image.shape[-2:] != (size, size):
        image = TF.center_crop(image, [size, size])
    return image


def _decode_files(paths: Sequence[str], image_size: int) -> np.ndarray:
    """Decode image files to uint8 (N, S, S, 3); other sizes get a shorter-side resize and a centre crop."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    for lo in range(0, len(paths), _DECODE_CHUNK):
        chunk = paths[lo : lo + _DECODE_CHUNK]
        datas = [read_image_file(p) for p in chunk]
        try:  # libjpeg-turbo on a whole list is ~4x faster than PIL file by file
            if not all(p.lower().endswith((".jpg", ".jpeg")) for p in chunk):
                raise ValueError("not all JPEG")
            images = decode_jpeg(datas, mode=ImageReadMode.RGB)
        except (RuntimeError, ValueError):
            images = [decode_image_file(path, data) for path, data in zip(chunk, datas, strict=True)]
        for i, img in enumerate(images):
            out[lo + i] = resize_centre_crop(img, image_size).permute(1, 2, 0).numpy()
    return out


def _decode_with_pil(path: str, first_error: Exception) -> torch.Tensor:
    """Formats torchvision cannot decode but ImageFolder lists (BMP, TIFF, PPM, ...): PIL, as torchvision's loader."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    except Exception:
        raise RecipeError(f"key 'data.root': cannot decode image {path} ({first_line(first_error)})") from None


def read_image_file(path: str) -> Any:
    """The bytes of an image file as a uint8 tensor; a :class:`RecipeError` names a file that cannot be read."""
    from torchvision.io import read_file

    try:
        return read_file(path)
    except (OSError, RuntimeError) as err:
        raise RecipeError(f"key 'data.root': cannot read image {path} ({first_line(err)})") from None


def check_image_files(samples: Sequence[tuple[str, int]]) -> None:
    """Every sample is a readable, non-empty regular file (a FIFO would block a reader forever).

    Raises:
        RecipeError: naming the first bad file and what is wrong with it.
    """
    for path, _ in samples:
        try:
            info = os.stat(path)  # follows symlinks: a dangling one fails here
        except OSError as err:
            raise RecipeError(f"key 'data.root': cannot read image {path} ({err.strerror})") from None
        if not stat.S_ISREG(info.st_mode):
            raise RecipeError(f"key 'data.root': {path} is not a regular file")
        if info.st_size == 0:
            raise RecipeError(f"key 'data.root': {path} is an empty file, not an image")


def check_tree(top: Path) -> None:
    """Refuse a tree in which one directory is reached twice (a symlink loop, or two links to one folder).

    torchvision's ``make_dataset`` follows directory symlinks: a loop would hang it or repeat samples
    under wrong labels.

    Raises:
        RecipeError: naming the directory reached twice and the path it was first reached by.
    """
    seen: dict[str, str] = {}
    for dirpath, _, _ in os.walk(top, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            first = seen[real]
            link = _first_link(dirpath, top) or _first_link(first, top) or dirpath
            other = first if link != first else dirpath
            raise RecipeError(
                f"key 'data.root': {link} leads to {other} again (a symlink loop or a second link to one folder); "
                "remove the link"
            )
        seen[real] = dirpath


def _first_link(path: str, top: Path) -> str | None:
    """The outermost symlinked directory on ``path`` below ``top``, if any."""
    rel = Path(os.path.relpath(path, top))
    current = Path(top)
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            return str(current)
    return None


def _fingerprint(root: Path, samples: Sequence[tuple[str, int]], image_size: int) -> str:
    """Identity of a decoded set: the tree's absolute path, each file's path, size, mtime and label."""
    digest = hashlib.sha1(f"v{_CACHE_VERSION}|{image_size}|{root.resolve()}".encode("utf-8", "surrogateescape"))
    for path, label in samples:
        info = os.stat(path)
        entry = f"|{os.path.relpath(path, root)}:{info.st_size}:{info.st_mtime_ns}:{label}"
        digest.update(entry.encode("utf-8", "surrogateescape"))  # file names need not be UTF-8
    return digest.hexdigest()[:20]


def _load_folder_split(
    root: Path, split: str, samples: list[tuple[str, int]], image_size: int, cache_dir: Path | None
) -> ArraySplit:
    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    key = _fingerprint(root, samples, image_size)
    name = root.name.encode("utf-8", "surrogateescape").decode("ascii", "replace")[:40]  # short, printable
    path = cache_dir / f"{name}-{split}-{len(samples)}-{image_size}px-{key}.npy" if cache_dir else None
    if path is not None and path.is_file():
        try:
            images = np.load(path)
            if images.shape == (len(samples), image_size, image_size, 3) and images.dtype == np.uint8:
                return ArraySplit(images, labels)
        except (OSError, ValueError):
            pass  # a truncated or foreign file: decode again and overwrite it
    log.info("decoding %d images from %s/%s (once; cached in %s)", len(samples), root, split, cache_dir)
    images = _decode_files([p for p, _ in samples], image_size)
    if path is not None:
        try:
            atomic_write(path, lambda f: np.save(f, images))
        except OSError as err:  # a cache is optional: train from memory, decode again next time
            log.warning("could not cache decoded images: %s", err)
    return ArraySplit(images, labels)


def load_image_folder(
    root: str | Path,
    image_size: int = 32,
    train_limit: int | None = None,
    test_limit: int | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[ArraySplit, ArraySplit, list[str]]:
    """Load ``<root>/train/<class>/*`` and ``<root>/test/<class>/*`` into memory.

    Limits are applied to the file lists before decoding, so a small subset of a large tree is cheap.
    Decoded arrays are cached under ``cache_dir`` keyed by a fingerprint of the selected files (paths,
    sizes, labels) and the image size.

    Args:
        root: the tree's root.
        image_size: side length of the held images; other sizes are resized and centre-cropped.
        train_limit: keep this many training images (fixed seeded choice); None keeps all.
        test_limit: the same for the test split.
        cache_dir: cache folder; defaults to :func:`default_cache_dir`.

    Returns:
        ``(train, test, class_names)``; labels follow the sorted train class folders.

    Raises:
        RecipeError: missing folders, no images, or test classes absent from train.
    """
    root = Path(root)
    classes = folder_classes(root)  # before decoding anything
    train = load_image_folder_split(root, "train", classes, image_size, train_limit, cache_dir)
    test = load_image_folder_split(root, "test", classes, image_size, test_limit, cache_dir)
    return train, test, classes


def folder_classes(root: Path) -> list[str]:
    """The class names of ``<root>/train`` (sorted folder names); ``<root>/test`` may hold only some of them.

    Raises:
        RecipeError: a missing ``train``/``test`` folder, or test classes absent from train.
    """
    from torchvision.datasets.folder import find_classes

    for split in ("train", "test"):
        _require_folder(root, split)
    try:
        classes, _ = find_classes(str(root / "train"))
        test_classes, _ = find_classes(str(root / "test"))
    except FileNotFoundError as err:
        raise RecipeError(f"key 'data.root': {_folder_layout(root)}; {err}") from None
    _check_classes(root, "test", test_classes, classes)
    return list(classes)


def _folder_layout(root: Path) -> str:
    return f"imagefolder expects {root}/train/<class>/<image> and {root}/test/<class>/<image>"


def _require_folder(root: Path, split: str) -> None:
    if not (root / split).is_dir():
        raise RecipeError(f"key 'data.root': {_folder_layout(root)}; {root / split} is not a directory")


def _check_classes(root: Path, split: str, found: Sequence[str], classes: Sequence[str]) -> None:
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise RecipeError(f"key 'data.root': {split} classes {unknown} in {root} are not among the training classes")


def load_image_folder_split(
    root: str | Path,
    split: str,
    classes: Sequence[str],
    image_size: int = 32,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
) -> ArraySplit:
    """Load one split, ``<root>/<split>/<class>/*``, labelling folders by their index in ``classes``.

    The test split of a trained model is loaded this way with the class names stored in its checkpoint,
    so evaluation never decodes the training images.

    Raises:
        RecipeError: a missing folder, no images, or a class folder not in ``classes``.
    """
    root = Path(root)
    samples = folder_samples(root, split, classes, limit)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _load_folder_split(root.resolve(), split, samples, image_size, cache)


def folder_samples(
    root: Path, split: str, classes: Sequence[str], limit: int | None = None, *, check_files: bool = True
) -> list[tuple[str, int]]:
    """``(path, label)`` of ``<root>/<split>/<class>/*`` as torchvision's ImageFolder lists them, limit applied.

    ``check_files=False`` skips the per-file checks (a stat each), for streamed sets that check on decoding.

    Raises:
        RecipeError: a missing folder, no images, a class folder not in ``classes``, or an unreadable file.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    _require_folder(root, split)
    try:
        found, _ = find_classes(str(root / split))
    except FileNotFoundError as err:
        raise RecipeError(f"key 'data.root': {_folder_layout(root)}; {err}") from None
    _check_classes(root, split, found, classes)
    class_to_idx = {name: i for i, name in enumerate(classes)}
    check_tree(root / split)
    try:
        samples = make_dataset(str(root / split), class_to_idx, IMG_EXTENSIONS, allow_empty=split != "train")
    except FileNotFoundError as err:
        raise RecipeError(f"key 'data.root': {_folder_layout(root)}; {first_line(err)}") from None
    if not samples:
        raise RecipeError(f"key 'data.root': {_folder_layout(root)}; no images found in {root / split}")
    samples = [samples[i] for i in subset_indices(len(samples), limit, f"data.{split}_limit")]
    if check_files:
        check_image_files(samples)
    return samples


# ------------------------------------------------------------------------------------------ transforms


def base_transform(image_size: int, crop_padding: int, hflip: bool) -> A.Compose:
    """Zero-padded random crop and horizontal flip (the standard CIFAR augmentation) as a Compose."""
    transforms: list[Any] = []
    if crop_padding > 0:
        side = image_size + 2 * crop_padding
        transforms += [
            A.PadIfNeeded(side, side, border_mode=cv2.BORDER_CONSTANT, fill=0),
            A.RandomCrop(image_size, image_size),
        ]
    if hflip:
        transforms.append(A.HorizontalFlip(p=0.5))
    return A.Compose(transforms)


def sample_seeds(seed: int, epoch: int, indices: np.ndarray | Sequence[int]) -> np.ndarray:
    """Independent 64-bit seeds for the augmentation of ``indices`` in ``epoch`` (splitmix64 of a run key)."""
    base = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)
    z = base + (np.asarray(indices, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class _LazyGenerator:
    """A ``np.random.Generator`` built on first use.

    Building one costs more than the whole crop + flip of a 32x32 image, and the built-in
    transforms draw only from Python's ``random``; transforms a user adds may still use it.
    """

    def __init__(self, seed: int) -> None:
        self._seed: int = seed
        self._gen: np.random.Generator | None = None

    def __getattr__(self, name: str) -> Any:
        if self._gen is None:
            self._gen = np.random.default_rng(self._seed)
        return getattr(self._gen, name)


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of one epoch: ``randperm`` from a CPU generator seeded by (seed, epoch)."""
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0])
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(mixed))


class AugmentedArrayDataset(Dataset):
    """Training samples with albumentations base transforms, seeded per (seed, epoch, index).

    Keys are ``(index, epoch)`` pairs; ``__getitems__`` returns a whole collated batch
    ``(uint8 NCHW tensor, int64 tensor)``, so use it with :func:`collate_batch`.

    Args:
        split: the training arrays.
        transform: albumentations pipeline applied to each HWC uint8 image.
        seed: run seed mixed into every sample's augmentation seed.
    """

    def __init__(self, split: ArraySplit, transform: A.Compose, seed: int) -> None:
        self.split, self.transform, self.seed = split, transform, seed

    def __len__(self) -> int:
        return len(self.split)

    def _augment(self, index: int, key: int) -> np.ndarray:
        # Reseeding the Compose per sample is what makes batches independent of worker count and
        # scheduling (albumentations otherwise repeats per-worker random streams across workers/epochs).
        self.transform.set_random_state(_LazyGenerator(key), random.Random(key))
        return self.transform(image=self.split.images[index])["image"]

    def __getitem__(self, key: tuple[int, int]) -> tuple[np.ndarray, int]:
        index, epoch = key
        return self._augment(index, int(sample_seeds(self.seed, epoch, [index])[0])), int(self.split.labels[index])

    def __getitems__(self, keys: list[tuple[int, int]]) -> Batch:
        indices = [index for index, _ in keys]
        epochs = {epoch for _, epoch in keys}
        if len(epochs) != 1:
            raise ValueError(f"keys: expected one epoch per batch, got {sorted(epochs)}")
        seeds = sample_seeds(self.seed, epochs.pop(), indices).tolist()
        images = np.stack([self._augment(i, s) for i, s in zip(indices, seeds, strict=True)])
        # numpy's uint8 transpose-copy is >10x faster than torch's permute().contiguous()
        nchw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        return torch.from_numpy(nchw), torch.from_numpy(self.split.labels[indices])


def collate_batch(batch: Batch) -> Batch:
    """Identity collate: :meth:`AugmentedArrayDataset.__getitems__` already returns a batch."""
    return batch


def worker_init_fn(worker_id: int) -> None:
    """Give each DataLoader worker its own random streams.

    Per-sample seeding already makes the base transforms independent of workers; this also covers
    any transform a user adds that draws from the Compose's own or the global generators.
    """
    # A scheduler's SIGTERM/SIGHUP (or Ctrl-C's SIGINT) reaches the whole process group: the main process saves
    # a checkpoint and then shuts the workers down, so they must not die first (the main process would fail).
    stops = {getattr(signal, name) for name in _STOP_NAMES if hasattr(signal, name)}
    for sig in stops:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # forked with them blocked (closing_workers): pending ones are dropped
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    # no cv2.setNumThreads here: reconfiguring a thread pool inherited through fork can deadlock
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, AugmentedArrayDataset):
        info.dataset.transform.set_random_seed(seed)


# -------------------------------------------------------------------------------------------- loaders


class ResumableBatches:
    """The epoch order every training loader shares: drop-last batches of a permutation seeded by (seed, epoch).

    Under ``torchrun`` each global step takes ``batch_size * world_size`` consecutive samples of the permutation
    and rank ``r`` trains on the ``r``-th ``batch_size`` of them, so the ranks see disjoint shards, every sample
    at most once per epoch (the last ``num_samples mod (batch_size * world_size)`` of each epoch's order are
    dropped, as a single process drops an incomplete batch). One process (``world_size=1``) is the plain order.
    Subclasses produce the batches (:meth:`epoch_batches`); a resumed run asks for ``start_batch > 0``.

    Args:
        num_samples: training set size.
        batch_size: images per batch (per rank).
        seed: seeds the per-epoch order.
        rank: this process's rank.
        world_size: number of training processes.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.num_samples // (self.batch_size * self.world_size)

    def batch_indices(self, epoch: int, start_batch: int = 0) -> torch.Tensor:
        """This rank's sample indices of batches ``start_batch..len-1`` of ``epoch``, shape (batches, batch_size)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch: expected 0..{len(self)}, got {start_batch}")
        perm = epoch_permutation(self.num_samples, self.seed, epoch)
        per_step = self.batch_size * self.world_size
        steps = perm[start_batch * per_step : len(self) * per_step].view(-1, self.world_size, self.batch_size)
        return steps[:, self.rank].contiguous()

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield batches ``start_batch..`` of ``epoch`` as (images, labels)."""
        raise NotImplementedError


class TrainLoader(ResumableBatches):
    """Resumable, deterministic training batches (drop_last) with augmentation in DataLoader workers.

    Args:
        dataset: the augmented training set.
        batch_size: images per batch.
        seed: seeds the per-epoch order (and, via the dataset, the augmentation).
        num_workers: DataLoader worker processes (0: in the main process); results do not depend on it.
        pin_memory: pin batches for asynchronous host-to-GPU copies.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        size = len(dataset)  # type: ignore[arg-type]  # map-style datasets are sized
        super().__init__(size, batch_size, seed, rank=rank, world_size=world_size)
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield batches ``start_batch..`` of ``epoch``; skipped batches are never decoded or augmented."""
        batches = [[(i, epoch) for i in row] for row in self.batch_indices(epoch, start_batch).tolist()]
        if not batches:
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=collate_batch,  # type: ignore[arg-type]  # whole batches (__getitems__), not lists
            pin_memory=self.pin_memory,
            worker_init_fn=worker_init_fn,
        )
        yield from closing_workers(loader)


_STOP_NAMES = ("SIGINT", "SIGTERM", "SIGHUP")


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Hold stop signals while DataLoader workers are forked (delivered to this process when the block ends).

    A scheduler's SIGTERM to the process group could otherwise reach a worker between its fork and
    :func:`worker_init_fn`, kill it, and fail the run instead of saving it.
    """
    stops = {getattr(signal, n) for n in _STOP_NAMES if hasattr(signal, n)}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def closing_workers(loader: DataLoader) -> Iterator[Batch]:
    """Iterate ``loader`` and shut its workers down however the iteration ends.

    Workers ignore stop signals (:func:`worker_init_fn`), so a worker left running by an error or an abandoned
    epoch would block the interpreter's exit, which joins its children.
    """
    with _stop_signals_blocked():  # forked workers start with them blocked, until they ignore them
        iterator = iter(loader)
    try:
        yield from iterator
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()


class DeviceTrainLoader(ResumableBatches):
    """Training batches from a uint8 dataset held on the device, with crop/flip as batched torch ops.

    Same epoch order as :class:`TrainLoader` (same seed), but the augmentation is drawn per batch from
    a generator seeded by (seed, epoch, batch index), so crops and flips differ from the CPU path.

    Args:
        split: training arrays (copied to ``device`` once).
        batch_size: images per batch.
        seed: seeds order and augmentation.
        device: where the dataset lives and batches are produced.
        crop_padding: zero padding of the random crop (0 disables).
        hflip: random horizontal flip with probability 0.5.
    """

    def __init__(
        self,
        split: ArraySplit,
        batch_size: int,
        *,
        seed: int,
        device: torch.device,
        crop_padding: int,
        hflip: bool,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(len(split), batch_size, seed, rank=rank, world_size=world_size)
        self.images = torch.from_numpy(np.ascontiguousarray(split.images.transpose(0, 3, 1, 2))).to(device)
        self.labels = torch.from_numpy(split.labels).to(device)
        self.device, self.crop_padding, self.hflip = device, crop_padding, hflip

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random zero-padded crop and horizontal flip of a uint8 NCHW batch, per image."""
        n, c, h, w = images.shape
        p = self.crop_padding
        if p > 0:
            padded = F.pad(images, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(images.device)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(images.device)
            rows = (oy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
            batch = torch.arange(n, device=images.device)[:, None, None, None]
            channel = torch.arange(c, device=images.device)[None, :, None, None]
            images = padded[batch, channel, rows, cols]
        if self.hflip:
            flip = (torch.rand(n, generator=generator) < 0.5).to(images.device)[:, None, None, None]
            images = torch.where(flip, images.flip(-1), images)
        return images

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield batches ``start_batch..`` of ``epoch`` as device tensors."""
        rows = self.batch_indices(epoch, start_batch)
        for b, idx in enumerate(rows, start=start_batch):
            key = [self.seed, epoch, b] + ([self.rank] if self.rank else [])  # every rank draws its own crops
            mixed = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0])
            idx = idx.to(self.device)
            yield self.augment(self.images[idx], torch.Generator().manual_seed(mixed)), self.labels[idx]


class EvalLoader:
    """Fixed-order, unaugmented batches over arrays (already decoded, so no workers are needed).

    Args:
        split: the arrays.
        batch_size: images per batch (the last batch may be smaller).
        device: when given, the whole split is held there and batches are device tensors.
        pin_memory: pin CPU batches for asynchronous host-to-GPU copies.
    """

    def __init__(
        self, split: ArraySplit, batch_size: int, device: torch.device | None = None, pin_memory: bool = False
    ) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(split.images.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(split.labels)
        if device is not None:
            self.images, self.labels = self.images.to(device), self.labels.to(device)
        self.batch_size, self.pin_memory = batch_size, pin_memory and device is None

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for lo in range(0, len(self.labels), self.batch_size):
            batch = self.images[lo : lo + self.batch_size], self.labels[lo : lo + self.batch_size]
            yield (batch[0].pin_memory(), batch[1].pin_memory()) if self.pin_memory else batch


def to_device(batch: Batch, device: torch.device | str, channels_last: bool = False) -> Batch:
    """Move a ``(uint8 images, labels)`` batch to ``device`` and convert images to float in [0, 1] there.

    The uint8 copy is 4x smaller than float, so the conversion happens after the transfer.
    """
    images, labels = batch
    images = images.to(device, non_blocking=True).float().div_(255.0)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


# ---------------------------------------------------------------------------------------------- entry


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


@dataclass
class DataBundle:
    """Everything the trainer and evaluators need from the data section.

    Attributes:
        train: resumable training loader (``len``, ``epoch_batches(epoch, start_batch)``).
        test: fixed-order test batches (iterable, ``len``).
        stats: class names, input normalisation (mean/std in [0, 1] units) and image size.
    """

    train: ResumableBatches
    test: Any  # EvalLoader, or StreamEvalLoader for a streamed set
    stats: DataStats
    train_split: ArraySplit | None = field(repr=False)  # None for a streamed set (data.preload=false)
    test_split: ArraySplit | None = field(repr=False)
    streamed_fingerprint: str | None = None  # identity of a streamed training set (file list, labels, 64 files)
    legacy_fingerprint: str | None = None  # what a run saved before 0.3.1 stored for it (file list and labels)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.stats.num_classes

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean in [0, 1] units for the model's input normalisation."""
        return self.stats.mean

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation in [0, 1] units."""
        return self.stats.std

    @property
    def class_names(self) -> list[str]:
        """Names in label order."""
        return list(self.stats.class_names)

    @property
    def image_size(self) -> int:
        """Side length of the images."""
        return self.stats.image_size

    def test_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Test images as uint8 (N, H, W, 3) and labels as int64 (N,), in the test loader's order (preloaded sets)."""
        if self.test_split is None:
            raise ValueError("a streamed data set (data.preload=false) holds no arrays")
        return self.test_split.images, self.test_split.labels

    def train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Unaugmented training images (N, H, W, 3) uint8 and labels (N,) int64 (preloaded sets)."""
        if self.train_split is None:
            raise ValueError("a streamed data set (data.preload=false) holds no arrays")
        return self.train_split.images, self.train_split.labels

    def fingerprint(self) -> str:
        """Identity of the training set, checked on resume."""
        if self.train_split is None:
            return str(self.streamed_fingerprint)
        return training_set_fingerprint(self.train_split.images, self.train_split.labels)


def training_set_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """Identity of a training set for resume: its size, every label and 64 images spread over it (cheap)."""
    digest = hashlib.sha1(f"{images.shape}".encode())
    digest.update(np.ascontiguousarray(labels).tobytes())
    step = max(1, len(images) // 64)
    digest.update(np.ascontiguousarray(images[::step][:64]).tobytes())
    return digest.hexdigest()[:20]


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
        train, test, classes = load_image_folder(cfg.root, cfg.image_size, cfg.train_limit, cfg.test_limit)
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
    if cfg.name == "imagefolder":
        return load_image_folder_split(cfg.root, "test", stats.class_names, stats.image_size, cfg.test_limit)
    if cfg.name == "synthetic":
        _check_synthetic(cfg)
        test = ArraySplit(*generate_synthetic(cfg.synthetic_test_size, cfg.image_size, seed=1))
        return _limit(test, cfg.test_limit, "data.test_limit")
    raise _unknown_dataset(cfg)


def _decode_streamed_test_split(cfg: Any, stats: DataStats) -> ArraySplit:
    """A streamed run's test split, decoded in workers with its evaluation transform (``crop_fraction``)."""
    from mbn.streaming import StreamEvalLoader, StreamingImageFolder

    samples = folder_samples(Path(cfg.root), "test", stats.class_names, cfg.test_limit, check_files=False)
    dataset = StreamingImageFolder(
        samples, stats.image_size, train=False, augment=cfg.augment, crop_fraction=cfg.crop_fraction,
        min_image_side=cfg.min_image_side,
    )  # fmt: skip
    batches = list(StreamEvalLoader(dataset, cfg.eval_batch_size, cfg.num_workers, pin_memory=False))
    images = torch.cat([b[0] for b in batches]).permute(0, 2, 3, 1).contiguous().numpy()
    return ArraySplit(images, np.concatenate([b[1].numpy() for b in batches]))


def build_data(cfg: Any, *, seed: int, device: torch.device | str, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Build loaders and metadata from the ``data`` section of a recipe.

    Args:
        cfg: a :class:`mbn.config.DataCfg` or the matching omegaconf node.
        seed: run seed for the training order and augmentation.
        device: training device; with ``cfg.on_device`` the datasets are held there (crop/flip then run
            as batched torch ops with a different RNG stream than the CPU/albumentations path).
        rank: this process's rank under torchrun; it trains on its shard of every epoch.
        world_size: number of training processes (``data.batch_size`` is per process).

    Raises:
        RecipeError: missing or malformed dataset, bad limits, or a batch larger than the training set.
    """
    device = torch.device(device)
    if cfg.name == "imagefolder" and not getattr(cfg, "preload", True):
        return build_streamed_data(cfg, seed=seed, device=device, rank=rank, world_size=world_size)
    check_data_path(cfg)
    train, test, stats = load_arrays(cfg)
    stats = _override_normalisation(cfg, stats)
    _check_batch_size(cfg, len(train), world_size)
    shard = {"rank": rank, "world_size": world_size}
    if cfg.on_device:
        train_loader: ResumableBatches = DeviceTrainLoader(
            train, cfg.batch_size, seed=seed, device=device, crop_padding=cfg.crop_padding, hflip=cfg.hflip, **shard
        )
        test_loader = EvalLoader(test, cfg.eval_batch_size, device=device)
    else:
        pin = device.type == "cuda"
        dataset = AugmentedArrayDataset(train, base_transform(train.images.shape[1], cfg.crop_padding, cfg.hflip), seed)
        train_loader = TrainLoader(
            dataset, cfg.batch_size, seed=seed, num_workers=cfg.num_workers, pin_memory=pin, **shard
        )
        test_loader = EvalLoader(test, cfg.eval_batch_size, pin_memory=pin)
    return DataBundle(
        train=train_loader,
        test=test_loader,
        stats=stats,
        train_split=train,
        test_split=test,
    )


def _check_batch_size(cfg: Any, num_train: int, world_size: int) -> None:
    """One step takes ``batch_size`` images per process; the training set must hold at least that many."""
    if num_train < cfg.batch_size * world_size:
        per = f" x {world_size} processes" if world_size > 1 else ""
        raise RecipeError(
            f"key 'data.batch_size': {cfg.batch_size}{per} exceeds the {num_train} training images "
            "(batches drop the last)"
        )


def _override_normalisation(cfg: Any, stats: DataStats) -> DataStats:
    """``data.mean`` / ``data.std`` from the recipe, when set, replace the data set's statistics."""
    mean = tuple(float(v) for v in cfg.mean) if getattr(cfg, "mean", None) is not None else stats.mean
    std = tuple(float(v) for v in cfg.std) if getattr(cfg, "std", None) is not None else stats.std
    return DataStats(stats.class_names, mean, std, stats.image_size)


def build_streamed_data(cfg: Any, *, seed: int, device: torch.device, rank: int = 0, world_size: int = 1) -> DataBundle:
    """A streamed ImageFolder (:mod:`mbn.streaming`): files listed now, decoded batch by batch in workers.

    The normalisation is ``data.mean`` / ``data.std``, else ImageNet's (a streamed set is never decoded as a whole
    to measure its own).
    """
    from mbn.streaming import (
        IMAGENET_MEAN,
        IMAGENET_STD,
        DeviceDecodedTrainLoader,
        StreamEvalLoader,
        StreamingImageFolder,
    )

    check_data_path(cfg)
    root = Path(cfg.root)
    classes = folder_classes(root)
    train = folder_samples(root, "train", classes, cfg.train_limit, check_files=False)
    test = folder_samples(root, "test", classes, cfg.test_limit, check_files=False)
    _check_batch_size(cfg, len(train), world_size)
    common = {"augment": cfg.augment, "seed": seed, "crop_fraction": cfg.crop_fraction,
              "crop_padding": cfg.crop_padding, "hflip": cfg.hflip, "min_image_side": cfg.min_image_side}  # fmt: skip
    pin = device.type == "cuda"
    on_device = getattr(cfg, "decode", "workers") == "device"
    train_set = StreamingImageFolder(train, cfg.image_size, train=True, decode_on_device=on_device, **common)
    kwargs = {"seed": seed, "num_workers": cfg.num_workers, "rank": rank, "world_size": world_size}
    loader: TrainLoader = (
        DeviceDecodedTrainLoader(train_set, cfg.batch_size, device=torch.device(device), **kwargs)
        if on_device
        else TrainLoader(train_set, cfg.batch_size, pin_memory=pin, **kwargs)
    )
    test_loader = StreamEvalLoader(
        StreamingImageFolder(test, cfg.image_size, train=False, **common), cfg.eval_batch_size, cfg.num_workers, pin
    )
    stats = _override_normalisation(cfg, DataStats(tuple(classes), IMAGENET_MEAN, IMAGENET_STD, int(cfg.image_size)))
    listing, content = streamed_fingerprints(root, train, int(cfg.image_size))
    return DataBundle(loader, test_loader, stats, None, None, streamed_fingerprint=content, legacy_fingerprint=listing)


def streamed_fingerprints(root: Path, train: Sequence[tuple[str, int]], image_size: int) -> tuple[str, str]:
    """Identity of a streamed training set for resume: (file list and labels, the same plus 64 files' bytes).

    The second is what a checkpoint stores; the first is what runs saved before mbn 0.3.1 stored (still accepted).
    """
    digest = hashlib.sha1(f"{len(train)}|{image_size}".encode())
    for path, label in train:
        digest.update(f"|{os.path.relpath(path, root)}:{label}".encode("utf-8", "surrogateescape"))
    listing = digest.hexdigest()[:20]
    step = max(1, len(train) // 64)
    for path, _ in train[::step][:64]:  # 64 files spread over the set, as for a preloaded one
        try:
            digest.update(Path(path).read_bytes())
        except OSError as err:
            raise RecipeError(f"{path}: cannot read ({first_line(err)})") from None
    return listing, digest.hexdigest()[:20]
