"""Image files of an ImageFolder tree (``<root>/{train,test}/<class>/*``): listing, checking, reading, decoding."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbn.config import RecipeError
from mbn.data.arrays import subset_indices
from mbn.errors import first_line


def read_image_file(path: str) -> Any:
    """The bytes of an image file as a uint8 tensor; a :class:`RecipeError` names a file that cannot be read."""
    from torchvision.io import read_file

    try:
        return read_file(path)
    except (OSError, RuntimeError) as err:
        raise RecipeError(f"key 'data.root': cannot read image {path} ({first_line(err)})") from None


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


def _decode_with_pil(path: str, first_error: Exception) -> torch.Tensor:
    """Formats torchvision cannot decode but ImageFolder lists (BMP, TIFF, PPM, ...): PIL, as torchvision's loader."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    except Exception:
        raise RecipeError(f"key 'data.root': cannot decode image {path} ({first_line(first_error)})") from None


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
