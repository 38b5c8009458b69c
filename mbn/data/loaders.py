"""Resumable, deterministic training loaders, the evaluation loader, and their DataLoader workers.

Each sample's augmentation is seeded from ``(seed, epoch, sample index)`` (:func:`sample_seeds`), so an epoch's
batches are identical bit for bit whatever the worker count, and a resumed run can jump to any batch without
touching the ones before.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, get_worker_info

from mbn.data.arrays import ArraySplit
from mbn.train.preemption import ignore_stop_signals_in_worker, stop_signals_blocked

if TYPE_CHECKING:
    import albumentations as A

Batch = tuple[torch.Tensor, torch.Tensor]


def sample_seeds(
    seed: int, epoch: int, indices: np.ndarray | Sequence[int], copies: np.ndarray | Sequence[int] | None = None
) -> np.ndarray:
    """Independent 64-bit seeds for the augmentation of ``indices`` in ``epoch`` (splitmix64 of a run key).

    ``copies``: under repeated augmentation (``data.aug_repeats``), which copy of its sample each index is. Copy
    ``c`` of index ``i`` is keyed ``i + c * 2**32``, so copy 0 draws what a run without repeats draws and the other
    copies draw their own (splitmix64 is a bijection: distinct keys, distinct seeds, for indices below ``2**32``).
    """
    base = np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)
    keys = np.asarray(indices, dtype=np.uint64)
    if copies is not None:
        keys = keys + (np.asarray(copies, dtype=np.uint64) << np.uint64(32))
    z = base + (keys + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def split_key(key: Any) -> tuple[int, int | None, int]:
    """A dataset key as ``(index, epoch, copy)``.

    Keys are a plain index (evaluation), ``(index, epoch)`` (training), or ``(index, epoch, copy)`` (copy ``copy`` of
    the sample under repeated augmentation, ``data.aug_repeats``).
    """
    if not isinstance(key, tuple):
        return int(key), None, 0
    return int(key[0]), int(key[1]), int(key[2]) if len(key) > 2 else 0


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

    Keys are ``(index, epoch)`` pairs, or ``(index, epoch, copy)`` under repeated augmentation (:func:`split_key`);
    ``__getitems__`` returns a whole collated batch ``(uint8 NCHW tensor, int64 tensor)``, so use it with
    :func:`collate_batch`.

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

    def __getitem__(self, key: tuple[int, ...]) -> tuple[np.ndarray, int]:
        index, epoch, copy = split_key(key)
        seed = int(sample_seeds(self.seed, epoch or 0, [index], [copy] if copy else None)[0])
        return self._augment(index, seed), int(self.split.labels[index])

    def __getitems__(self, keys: list[tuple[int, ...]]) -> Batch:
        split = [split_key(key) for key in keys]
        indices = [index for index, _, _ in split]
        epochs = {epoch for _, epoch, _ in split}
        if len(epochs) != 1:
            raise ValueError(f"keys: expected one epoch per batch, got {sorted(epochs, key=str)}")
        copies = [copy for _, _, copy in split]
        seeds = sample_seeds(self.seed, epochs.pop() or 0, indices, copies if any(copies) else None).tolist()
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
    ignore_stop_signals_in_worker()  # the main process checkpoints, then stops the workers (mbn.train.preemption)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    # no cv2.setNumThreads here: reconfiguring a thread pool inherited through fork can deadlock
    info = get_worker_info()
    if info is not None and isinstance(info.dataset, AugmentedArrayDataset):
        info.dataset.transform.set_random_seed(seed)


class ResumableBatches:
    """The epoch order every training loader shares: drop-last batches of a permutation seeded by (seed, epoch).

    Under ``torchrun`` each global step takes ``batch_size * world_size`` consecutive samples of the permutation
    and rank ``r`` trains on the ``r``-th ``batch_size`` of them, so the ranks see disjoint shards, every sample
    at most once per epoch (the last ``num_samples mod (batch_size * world_size)`` of each epoch's order are
    dropped, as a single process drops an incomplete batch). One process (``world_size=1``) is the plain order.
    Subclasses produce the batches (:meth:`epoch_batches`); a resumed run asks for ``start_batch > 0``.

    Repeated augmentation (``repeats = k >= 2``, ``data.aug_repeats``; Hoffer et al. 2020, DeiT's ``RASampler``):
    the epoch's order is the same permutation with every sample repeated ``k`` times in a row (``N * k``
    positions, position ``p`` is copy ``p mod k`` of sample ``perm[p // k]``), and rank ``r`` takes every
    ``world_size``-th position of each step's ``batch_size * world_size`` (positions ``r, r + W, ...``), so the
    copies of a sample land on ``k`` different ranks when ``k <= world_size`` (in one process, in one batch).
    Every sample appears exactly ``k`` times an epoch, except at the dropped tail (the last
    ``N * k mod (batch_size * world_size)`` positions): exactly ``k`` times for all when that is 0. Each copy is
    keyed with its copy number (:meth:`batch_copies`, :func:`sample_seeds`), so it gets its own augmentation.

    Args:
        num_samples: training set size.
        batch_size: images per batch (per rank).
        seed: seeds the per-epoch order.
        rank: this process's rank.
        world_size: number of training processes.
        repeats: copies of every sample per epoch (``data.aug_repeats``; 0 or 1: none).
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1, repeats: int = 1
    ) -> None:
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.repeats = rank, world_size, max(1, int(repeats))

    def __len__(self) -> int:
        return self.num_samples * self.repeats // (self.batch_size * self.world_size)

    def _positions(self, start_batch: int) -> torch.Tensor:
        """This rank's positions in the repeated order of batches ``start_batch..`` (``repeats >= 2``)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch: expected 0..{len(self)}, got {start_batch}")
        per_step = self.batch_size * self.world_size
        positions = torch.arange(start_batch * per_step, len(self) * per_step)
        return positions.view(-1, self.batch_size, self.world_size)[:, :, self.rank].contiguous()

    def batch_indices(self, epoch: int, start_batch: int = 0) -> torch.Tensor:
        """This rank's sample indices of batches ``start_batch..len-1`` of ``epoch``, shape (batches, batch_size)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch: expected 0..{len(self)}, got {start_batch}")
        perm = epoch_permutation(self.num_samples, self.seed, epoch)
        if self.repeats > 1:
            return perm[self._positions(start_batch) // self.repeats]
        per_step = self.batch_size * self.world_size
        steps = perm[start_batch * per_step : len(self) * per_step].view(-1, self.world_size, self.batch_size)
        return steps[:, self.rank].contiguous()

    def batch_copies(self, start_batch: int = 0) -> torch.Tensor | None:
        """Which copy of its sample each of :meth:`batch_indices` is (``0..repeats-1``); None without repeats."""
        return self._positions(start_batch) % self.repeats if self.repeats > 1 else None

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
        rank, world_size, repeats: as :class:`ResumableBatches`; the dataset takes ``(index, epoch[, copy])`` keys.
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
        repeats: int = 1,
    ) -> None:
        size = len(dataset)  # type: ignore[arg-type]  # map-style datasets are sized
        super().__init__(size, batch_size, seed, rank=rank, world_size=world_size, repeats=repeats)
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield batches ``start_batch..`` of ``epoch``; skipped batches are never decoded or augmented."""
        rows, copies = self.batch_indices(epoch, start_batch).tolist(), self.batch_copies(start_batch)
        if copies is None:
            batches: list[list[tuple[int, ...]]] = [[(i, epoch) for i in row] for row in rows]
        else:  # repeated augmentation: each copy keyed by its number, so it draws its own augmentation
            pairs = zip(rows, copies.tolist(), strict=True)
            batches = [[(i, epoch, c) for i, c in zip(row, cs, strict=True)] for row, cs in pairs]
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


def closing_workers(loader: DataLoader) -> Iterator[Batch]:
    """Iterate ``loader`` and shut its workers down however the iteration ends.

    Workers ignore stop signals (:func:`worker_init_fn`), so a worker left running by an error or an abandoned
    epoch would block the interpreter's exit, which joins its children.
    """
    with stop_signals_blocked():  # forked workers start with them blocked, until they ignore them
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
        rank, world_size, repeats: as :class:`ResumableBatches`; repeated copies draw their own crops (each image of a
            batch draws its own).
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
        repeats: int = 1,
    ) -> None:
        super().__init__(len(split), batch_size, seed, rank=rank, world_size=world_size, repeats=repeats)
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
