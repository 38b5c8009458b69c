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
