"""The ``data`` section of a recipe turned into loaders and metadata: :func:`build_data` and :class:`DataBundle`.

The only module of :mod:`mbn.data` that reads recipe-level settings across the others (preloaded or streamed,
on the device or in workers, the batch size against the training set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mbn.config import RecipeError, check_preload_keys
from mbn.data.arrays import ArraySplit, DataStats
from mbn.data.files import DEFAULT_MAX_IMAGE_PIXELS, evaluation_folder, folder_classes, folder_samples
from mbn.data.fingerprints import streamed_fingerprints, training_set_fingerprint
from mbn.data.loaders import AugmentedArrayDataset, DeviceTrainLoader, EvalLoader, ResumableBatches, TrainLoader
from mbn.data.preloaded import load_arrays
from mbn.data.streamed import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DeviceDecodedTrainLoader,
    StreamEvalLoader,
    StreamingImageFolder,
)
from mbn.data.transforms import base_transform


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
    train_cache: str | None = None  # the decoded-image cache the preloaded training images came from, if any

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

    def describe_training_set(self, root: Any) -> str:
        """What a refused resume names: the tree under ``root`` and, when its images came from one, the cache."""
        where = f"the training set under {root}"
        if self.train_cache is None:
            return where
        return f"{where} (decoded images from the cache {self.train_cache}; delete it to decode the tree again)"

    def fingerprint(self) -> str:
        """Identity of the training set, checked on resume."""
        if self.train_split is None:
            return str(self.streamed_fingerprint)
        return training_set_fingerprint(self.train_split.images, self.train_split.labels)


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
    if cfg.name == "webdataset":
        return build_webdataset_data(cfg, seed=seed, device=device, rank=rank, world_size=world_size)
    if cfg.name == "imagefolder" and not getattr(cfg, "preload", True):
        return build_streamed_data(cfg, seed=seed, device=device, rank=rank, world_size=world_size)
    check_preload_keys(cfg)
    train, test, stats = load_arrays(cfg)
    stats = _override_normalisation(cfg, stats)
    _check_batch_size(cfg, len(train), world_size)
    shard = {"rank": rank, "world_size": world_size, "repeats": int(getattr(cfg, "aug_repeats", 0) or 1)}
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
        train_cache=train.cache_file,
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
    """A streamed ImageFolder (:mod:`mbn.data.streamed`): files listed now, decoded batch by batch in workers.

    The normalisation is ``data.mean`` / ``data.std``, else ImageNet's (a streamed set is never decoded as a whole
    to measure its own).
    """
    check_preload_keys(cfg)
    root = Path(cfg.root)
    classes = folder_classes(root, evaluation_folder(cfg))
    train = folder_samples(root, "train", classes, cfg.train_limit, check_files=False)
    test = folder_samples(root, evaluation_folder(cfg), classes, cfg.test_limit, check_files=False)
    _check_batch_size(cfg, len(train), world_size)
    max_pixels = int(getattr(cfg, "max_image_pixels", None) or DEFAULT_MAX_IMAGE_PIXELS)
    common = {"augment": cfg.augment, "seed": seed, "crop_fraction": cfg.crop_fraction,
              "crop_padding": cfg.crop_padding, "hflip": cfg.hflip, "min_image_side": cfg.min_image_side,
              "max_image_pixels": max_pixels}  # fmt: skip
    pin = device.type == "cuda"
    on_device = getattr(cfg, "decode", "workers") == "device"
    train_set = StreamingImageFolder(train, cfg.image_size, train=True, decode_on_device=on_device, **common)
    kwargs = {"seed": seed, "num_workers": cfg.num_workers, "rank": rank, "world_size": world_size,
              "repeats": int(getattr(cfg, "aug_repeats", 0) or 1)}  # fmt: skip
    loader: TrainLoader = (
        DeviceDecodedTrainLoader(train_set, cfg.batch_size, device=torch.device(device), **kwargs)
        if on_device
        else TrainLoader(train_set, cfg.batch_size, pin_memory=pin, **kwargs)
    )
    test_loader = StreamEvalLoader(
        StreamingImageFolder(test, cfg.image_size, train=False, **common), cfg.eval_batch_size, cfg.num_workers, pin
    )
    stats = _override_normalisation(cfg, DataStats(tuple(classes), IMAGENET_MEAN, IMAGENET_STD, int(cfg.image_size)))
    listing, content = streamed_fingerprints(root, train, int(cfg.image_size), max_pixels)
    return DataBundle(loader, test_loader, stats, None, None, streamed_fingerprint=content, legacy_fingerprint=listing)


def build_webdataset_data(
    cfg: Any, *, seed: int, device: torch.device, rank: int = 0, world_size: int = 1
) -> DataBundle:
    """Tar shards (:mod:`mbn.data.shards`): ``data.root`` / ``data.test_root`` brace patterns, streamed in workers.

    The normalisation is ``data.mean`` / ``data.std``, else ImageNet's, as for a streamed tree.
    """
    from mbn.data.shards import build_shard_loaders

    check_preload_keys(cfg)
    shards = build_shard_loaders(cfg, seed=seed, device=device, rank=rank, world_size=world_size)
    stats = DataStats(tuple(shards.classes), IMAGENET_MEAN, IMAGENET_STD, int(cfg.image_size))
    listing, content = shards.fingerprints
    return DataBundle(
        shards.train, shards.test, _override_normalisation(cfg, stats), None, None,
        streamed_fingerprint=content, legacy_fingerprint=listing,
    )  # fmt: skip
