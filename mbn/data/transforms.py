"""Image transforms: the CIFAR base augmentation (albumentations), resize + centre crop, RandomResizedCrop boxes."""

from __future__ import annotations

import math
import os
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI for updates on import

import albumentations as A
import cv2
import numpy as np
import torch


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


def resize_centre_crop(image: torch.Tensor, size: int, crop_fraction: float = 1.0) -> torch.Tensor:
    """Shorter side to ``size / crop_fraction`` (antialiased), then the central ``size`` x ``size`` crop."""
    from torchvision.transforms.v2 import functional as TF

    resize = math.floor(size / crop_fraction) if crop_fraction < 1.0 else size
    if min(image.shape[-2:]) != resize:
        image = TF.resize(image, resize, antialias=True)
    if image.shape[-2:] != (size, size):
        image = TF.center_crop(image, [size, size])
    return image


def eval_crop_fraction(data: Any) -> float:
    """The crop fraction a run is evaluated with: ``data.crop_fraction`` when streamed ImageNet-style, else 1.

    Preloaded trees are decoded at ``image_size`` (shorter side, centre crop) and CIFAR arrays are at their size.
    """
    streamed = not bool(data.preload) or getattr(data, "name", None) == "webdataset"  # shards always stream
    streamed_imagenet = streamed and str(data.augment) == "imagenet"
    return float(data.crop_fraction) if streamed_imagenet else 1.0


#: torchvision's RandomResizedCrop defaults (Inception-style crops).
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3.0 / 4.0, 4.0 / 3.0)


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a RandomResizedCrop (torchvision's algorithm: 10 tries, then the central crop)."""
    area = height * width
    log_ratio = (math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*RRC_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < RRC_RATIO[0]:
        w, h = width, round(width / RRC_RATIO[0])
    elif in_ratio > RRC_RATIO[1]:
        h, w = height, round(height * RRC_RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
