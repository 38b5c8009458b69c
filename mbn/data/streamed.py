"""A streamed ImageFolder: images are decoded in DataLoader workers, batch by batch, never held all at once.

``data.preload=false`` with ``data.name=imagefolder`` (ImageNet-size trees): time to the first step and memory do
not grow with the number of images. Files are listed as torchvision's ``ImageFolder`` lists them (sorted classes,
sorted files) and decoded with torchvision's decoders (libjpeg-turbo; PIL for formats torchvision lacks).

Augmentation (``data.augment``):

* ``imagenet``: training images get ``RandomResizedCrop(image_size, scale=(0.08, 1), ratio=(3/4, 4/3))`` and a
  horizontal flip (Szegedy et al. 2015; torchvision's reference recipe); evaluation images are resized to
  ``image_size / crop_fraction`` on the shorter side and centre-cropped to ``image_size`` (crop fraction 0.875:
  resize 256, crop 224).
* ``cifar``: zero-padded random crop and flip at the images' native size, which must be ``image_size``.

Every sample's draws come from a generator seeded by ``(seed, epoch, index)``
(:func:`mbn.data.loaders.sample_seeds`), so an epoch's batches are the same whatever the worker count, and a resumed
run continues exactly. A file that is not a non-empty regular file (a FIFO, a device, an unreadable file), an
image that cannot be decoded, that is larger than ``data.max_image_pixels`` (read from its header, before decoding)
or smaller than ``data.min_image_side`` (or, with ``cifar``, not ``image_size`` square), stops the run with one line
naming the file; nothing is skipped or silently resized.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mbn.config import RecipeError
from mbn.data.files import DEFAULT_MAX_IMAGE_PIXELS, decode_image_file, image_header_size, read_image_file
from mbn.data.loaders import TrainLoader, closing_workers, collate_batch, sample_seeds, split_key, worker_init_fn
from mbn.data.transforms import random_resized_crop_box, resize_centre_crop

Batch = tuple[torch.Tensor, torch.Tensor]
#: A sample's drawn transform: ``(op, arguments, flip)`` with op ``centre``, ``resized_crop``, ``pad_crop`` or ``none``.
Transform = tuple[str, tuple[int, ...], bool]


@dataclass
class EncodedBatch:
    """A training batch read from disk but not decoded: file bytes, paths, drawn transforms and labels."""

    files: list[bytes]  # bytes, not tensors: one shared-memory handle per file would exhaust the workers' fds
    paths: list[str]
    transforms: list[Transform]
    labels: torch.Tensor  # int64 (N,)


#: ImageNet statistics in [0, 1] units: the normalisation a streamed set uses unless data.mean/std say otherwise.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class StreamingImageFolder(Dataset):
    """Files and labels of one split, decoded (and, for training, augmented) per sample on demand.

    Training keys are ``(index, epoch)`` pairs, or ``(index, epoch, copy)`` under repeated augmentation (as
    :class:`mbn.data.loaders.AugmentedArrayDataset`); evaluation keys are plain indices. ``__getitems__`` returns
    whole ``(uint8 N3HW images, int64 labels)`` batches.

    Args:
        samples: ``(path, label)`` pairs.
        image_size: side of the images produced.
        train: augment (seeded per sample) rather than resize and centre-crop.
        augment: ``imagenet`` or ``cifar`` (see the module docstring).
        seed: the run seed.
        crop_fraction: evaluation crop fraction (``imagenet``).
        crop_padding: zero padding of the random crop (``cifar``).
        hflip: random horizontal flips in training.
        min_image_side: shorter sides below this are refused.
        max_image_pixels: images with more pixels (width x height, from the header) are refused before decoding.
        decode_on_device: workers only read the files and draw the transforms; :meth:`decode_batch` decodes and
            transforms a batch on the training device (``data.decode=device``).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        image_size: int,
        *,
        train: bool,
        augment: str = "imagenet",
        seed: int = 0,
        crop_fraction: float = 0.875,
        crop_padding: int = 4,
        hflip: bool = True,
        min_image_side: int = 8,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        decode_on_device: bool = False,
    ) -> None:
        self.paths = [p for p, _ in samples]
        self.labels = np.asarray([label for _, label in samples], dtype=np.int64)
        self.image_size, self.train, self.augment, self.seed = image_size, train, augment, seed
        self.crop_fraction, self.crop_padding, self.hflip = crop_fraction, crop_padding, hflip
        self.min_image_side, self.max_image_pixels = min_image_side, max_image_pixels
        self.decode_on_device = decode_on_device

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int, epoch: int | None = None, copy: int = 0) -> torch.Tensor:
        """Sample ``index`` as uint8 (3, S, S): augmented for ``epoch`` in training, else resized and cropped."""
        image = decode_image_file(self.paths[index], max_pixels=self.max_image_pixels)
        h, w = image.shape[-2:]
        return self.transform(image, self.draw(index, epoch, (int(h), int(w)), copy))

    def draw(self, index: int, epoch: int | None, size: tuple[int, int], copy: int = 0) -> Transform:
        """Check sample ``index``'s size ``(h, w)`` and draw its transform, seeded by ``(seed, epoch, index)``.

        ``copy``: which repeated copy of the sample it is (``data.aug_repeats``); each copy draws its own.
        """
        path = self.paths[index]
        h, w = size
        if min(h, w) < self.min_image_side:
            raise RecipeError(
                f"key 'data.root': image {path} is {w}x{h}, smaller than data.min_image_side={self.min_image_side}"
            )
        if self.augment == "cifar" and (h, w) != (self.image_size, self.image_size):
            raise RecipeError(
                f"key 'data.root': image {path} is {w}x{h}; data.augment=cifar trains at the native "
                f"{self.image_size}x{self.image_size} (use data.augment=imagenet to resize)"
            )
        if not self.train:
            return ("centre", (), False)
        rng = np.random.default_rng(int(sample_seeds(self.seed, epoch or 0, [index], [copy] if copy else None)[0]))
        args: tuple[int, ...]
        if self.augment == "imagenet":
            op, args = "resized_crop", random_resized_crop_box(h, w, rng)
        elif self.crop_padding > 0:
            op, args = "pad_crop", tuple(int(v) for v in rng.integers(0, 2 * self.crop_padding + 1, size=2))
        else:
            op, args = "none", ()
        return (op, args, bool(self.hflip and rng.random() < 0.5))

    def transform(self, image: torch.Tensor, drawn: Transform) -> torch.Tensor:
        """Apply a :meth:`draw` to a decoded uint8 (3, H, W) image, on whatever device it is."""
        op, args, flip = drawn
        if op == "centre":
            return resize_centre_crop(image, self.image_size, self.crop_fraction if self.augment == "imagenet" else 1.0)
        if op == "resized_crop":
            from torchvision.transforms.v2 import functional as TF

            top, left, ch, cw = args
            image = TF.resized_crop(image, top, left, ch, cw, [self.image_size, self.image_size], antialias=True)
        elif op == "pad_crop":
            p, (oy, ox) = self.crop_padding, args
            image = F.pad(image, (p, p, p, p))[:, oy : oy + self.image_size, ox : ox + self.image_size]
        if flip:
            image = image.flip(-1)
        return image.contiguous()

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, int]:
        index, epoch, copy = split_key(key)
        return self.load(index, epoch, copy), int(self.labels[index])

    def __getitems__(self, keys: list[Any]) -> Batch | EncodedBatch:
        if self.decode_on_device:
            return self.encoded(keys)
        items = [self[key] for key in keys]
        return torch.stack([image for image, _ in items]), torch.as_tensor([label for _, label in items])

    def encoded(self, keys: list[Any]) -> EncodedBatch:
        """The files of ``keys`` read but not decoded, with their drawn transforms (``data.decode=device``).

        The size a transform needs is read from the file's header (PIL opens images lazily).
        """
        files, paths, drawn, labels = [], [], [], []
        for key in keys:
            index, epoch, copy = split_key(key)
            path = self.paths[index]
            data = read_image_file(path, self.max_image_pixels).numpy().tobytes()
            w, h = image_header_size(path, data, self.max_image_pixels)
            files.append(data)
            paths.append(path)
            drawn.append(self.draw(index, epoch, (h, w), copy))
            labels.append(int(self.labels[index]))
        return EncodedBatch(files, paths, drawn, torch.as_tensor(labels))

    def decode_batch(self, batch: EncodedBatch, device: torch.device) -> Batch:
        """Decode an :class:`EncodedBatch` on ``device`` and apply its transforms: ``(uint8 N3SS, labels)``.

        JPEGs go through :func:`torchvision.io.decode_jpeg` as one list (nvJPEG on CUDA); other formats, or a
        JPEG the batched decoder rejects, are decoded on the CPU (naming a bad file) and moved to ``device``.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        files = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in batch.files]
        images: list[torch.Tensor | None] = [None] * len(files)
        jpegs = [i for i, data in enumerate(batch.files) if data[:2] == b"\xff\xd8"]
        if jpegs:
            try:
                decoded = decode_jpeg([files[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
                for i, image in zip(jpegs, decoded, strict=True):
                    images[i] = image
            except RuntimeError:
                pass  # decoded one by one below, so the bad file is named
        out = []
        for i, drawn in enumerate(batch.transforms):
            image = images[i]
            if image is None:
                image = decode_image_file(batch.paths[i], files[i], self.max_image_pixels).to(device)
            out.append(self.transform(image, drawn))
        return torch.stack(out), batch.labels.to(device)


class StreamEvalLoader:
    """Fixed-order, centre-cropped test batches decoded in workers (``len`` and iteration, as ``EvalLoader``)."""

    def __init__(self, dataset: StreamingImageFolder, batch_size: int, num_workers: int, pin_memory: bool) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.dataset)
        batches = [list(range(lo, min(lo + self.batch_size, n))) for lo in range(0, n, self.batch_size)]
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=collate_batch,  # type: ignore[arg-type]
            pin_memory=self.pin_memory,
            worker_init_fn=worker_init_fn,
        )
        yield from closing_workers(loader)


class DeviceDecodedTrainLoader(TrainLoader):
    """:class:`~mbn.data.TrainLoader` whose workers read files and draw crops; batches are decoded on ``device``.

    ``data.decode=device``: on CUDA the JPEG decoding (nvJPEG) and the crops run on the GPU, leaving the CPU
    workers only file reads; the batches equal the worker-decoded ones up to the device's resize arithmetic
    (identical on the CPU).
    """

    def __init__(self, dataset: StreamingImageFolder, batch_size: int, *, device: torch.device, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size, **kwargs)
        self.device = device

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches ``start_batch..`` of ``epoch``, decoded on the training device."""
        assert isinstance(self.dataset, StreamingImageFolder)
        for encoded in super().epoch_batches(epoch, start_batch):
            yield self.dataset.decode_batch(encoded, self.device)  # type: ignore[arg-type]
