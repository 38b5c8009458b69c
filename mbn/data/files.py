"""Image files of an ImageFolder tree: listing, checking, reading, decoding.

The tree is ``<root>/train/<class>/*`` and ``<root>/<data.test_split>/<class>/*`` (``test`` by default).
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mbn.config import RecipeError
from mbn.data.arrays import subset_indices
from mbn.errors import first_line

#: ``data.max_image_pixels``'s default: PIL's own ``Image.MAX_IMAGE_PIXELS`` (2**30 / 4 / 3, a 256 MiB RGB image),
#: above which torchvision's ``ImageFolder`` (PIL) already warns, and at twice which it refuses to decode.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

_FILE_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def max_image_file_bytes(max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> int:
    """The largest image file read: 8 bytes a pixel (uncompressed 16-bit RGBA) within the pixel limit, plus 16 MiB.

    732 MiB at the default limit; a larger file cannot hold an image the limit accepts (only metadata or more
    frames), so it is refused before a byte is read.
    """
    return 8 * max_pixels + 2**24


def _reason(err: OSError) -> str:
    return err.strerror or first_line(err)  # the errno's words: "Permission denied", "No such file or directory"


def _check_file_info(path: str, info: os.stat_result, max_pixels: int) -> int:
    """``info``'s size, if it is that of a non-empty regular file small enough to read; else a RecipeError."""
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(info.st_mode)), "not a regular file")
        link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
        raise RecipeError(f"key 'data.root': {path} is {kind}{link}, not an image file")
    if info.st_size == 0:
        raise RecipeError(f"key 'data.root': {path} is an empty file, not an image")
    limit = max_image_file_bytes(max_pixels)
    if info.st_size > limit:
        raise RecipeError(
            f"key 'data.max_image_pixels': {path} is {info.st_size / 2**20:.0f} MiB, more than an image within "
            f"data.max_image_pixels={max_pixels} can need ({limit / 2**20:.0f} MiB); raise the key if it is one"
        )
    return int(info.st_size)


def checked_file_size(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> int:
    """The size of ``path``, a non-empty regular file (after symlinks) of a size an image can have; never opened.

    Raises:
        RecipeError: naming the file and what it is instead (a FIFO, a device, a dangling link, unreadable, ...).
    """
    try:
        info = os.stat(path)  # follows symlinks: a dangling one fails here
    except OSError as err:
        raise RecipeError(f"key 'data.root': cannot read image {path} ({_reason(err)})") from None
    return _check_file_info(path, info, max_pixels)


def read_image_file(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """The bytes of an image file as a uint8 tensor: a non-empty regular file, read up to the size it had.

    A FIFO is never opened for reading (that blocks until a writer comes), a device (``/dev/zero``) never read
    (it never ends): :func:`checked_file_size` refuses them from ``stat``, and the file opened (non-blocking) is
    checked again, so one swapped in between is refused too.

    Raises:
        RecipeError: naming the file and the reason (the errno's words for an unreadable one).
    """
    checked_file_size(path, max_pixels)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as err:
        raise RecipeError(f"key 'data.root': cannot read image {path} ({_reason(err)})") from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        size = _check_file_info(path, os.fstat(fd), max_pixels)
        data = torch.empty(size, dtype=torch.uint8)
        view, done = data.numpy().data, 0
        try:
            while done < size:
                got = f.readinto(view[done:])
                if not got:
                    break  # shrunk since: decoding reports the truncated image
                done += got
        except OSError as err:
            raise RecipeError(f"key 'data.root': cannot read image {path} ({_reason(err)})") from None
    return data[:done]


@contextmanager
def _pil_unbounded() -> Iterator[None]:
    """PIL without its own decompression-bomb check: ``data.max_image_pixels`` is checked instead."""
    from PIL import Image

    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def image_header_size(path: str, data: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of an image from its header alone (PIL opens images lazily), within the pixel limit.

    Args:
        path: the file, for messages.
        data: its bytes (``bytes`` or a uint8 tensor).
        max_pixels: ``data.max_image_pixels``.

    Raises:
        RecipeError: an unknown format or damaged header, or more pixels than ``max_pixels``, naming the file.
    """
    from PIL import Image

    buffer = io.BytesIO(data.numpy().data if isinstance(data, torch.Tensor) else data)
    try:
        with _pil_unbounded(), Image.open(buffer) as img:
            w, h = img.size
    except Exception as err:  # PIL's message names its BytesIO, not the file
        detail = "unknown format or damaged header" if "cannot identify" in str(err) else first_line(err)
        raise RecipeError(f"key 'data.root': cannot decode image {path} ({detail})") from None
    if w * h > max_pixels:
        raise RecipeError(
            f"key 'data.max_image_pixels': image {path} is {w}x{h} ({w * h} pixels), more than "
            f"data.max_image_pixels={max_pixels}; raise the key to decode it"
        )
    return int(w), int(h)


def decode_image_file(path: str, data: Any = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """One image file (or its bytes, ``data``) as uint8 RGB (3, H, W); a :class:`RecipeError` names a bad file.

    The size in the header is checked against ``max_pixels`` (``data.max_image_pixels``) before decoding.
    """
    from torchvision.io import ImageReadMode, decode_image

    data = read_image_file(path, max_pixels) if data is None else data
    image_header_size(path, data, max_pixels)
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        return _decode_with_pil(path, data, err)
    if image.ndim == 4:  # an animated image (GIF): its first frame, as torchvision's ImageFolder (PIL) reads it
        image = image[0]
    if image.dtype == torch.uint16:  # a 16-bit PNG: its top 8 bits (PIL keeps them for RGB but clips grayscale to 255)
        image = image.to(torch.int32).div(256, rounding_mode="floor").to(torch.uint8)
    return image


def _decode_with_pil(path: str, data: torch.Tensor, first_error: Exception) -> torch.Tensor:
    """Formats torchvision cannot decode but ImageFolder lists (BMP, TIFF, PPM, ...): PIL, as torchvision's loader."""
    from PIL import Image

    try:
        with _pil_unbounded(), Image.open(io.BytesIO(data.numpy().data)) as img:  # the size is already checked
            return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    except Exception:
        raise RecipeError(f"key 'data.root': cannot decode image {path} ({first_line(first_error)})") from None


def check_image_files(samples: Sequence[tuple[str, int]], max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Every sample is a readable, non-empty regular file (a FIFO would block a reader forever); none is opened.

    Raises:
        RecipeError: naming the first bad file and what is wrong with it.
    """
    for path, _ in samples:
        checked_file_size(path, max_pixels)


def check_tree(top: Path) -> None:
    """Refuse a tree in which one directory is reached twice (a symlink loop, or two links to one folder).

    torchvision's ``make_dataset`` follows directory symlinks: a loop would hang it or repeat samples
    under wrong labels.

    Raises:
        RecipeError: naming the directory reached twice and the path it was first reached by.
    """
    seen: dict[str, str] = {}
    for dirpath, _, _ in os.walk(top, followlinks=True, onerror=_unreadable_folder):
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


def _unreadable_folder(err: OSError) -> None:
    """``os.walk``'s ``onerror``: a folder that cannot be listed is named (torchvision would skip its images)."""
    raise RecipeError(f"key 'data.root': cannot read folder {err.filename} ({_reason(err)})") from None


def _find_classes(root: Path, split: str, test_split: str = "test") -> list[str]:
    """The class folders of ``<root>/<split>``, as torchvision's ``find_classes`` lists them."""
    from torchvision.datasets.folder import find_classes

    try:
        classes, _ = find_classes(str(root / split))
    except FileNotFoundError as err:
        raise RecipeError(f"key 'data.root': {_folder_layout(root, test_split)}; {err}") from None
    except OSError as err:  # an unreadable folder: the errno's words, not torchvision's
        folder = err.filename or root / split
        raise RecipeError(f"key 'data.root': cannot read folder {folder} ({_reason(err)})") from None
    return list(classes)


def _first_link(path: str, top: Path) -> str | None:
    """The outermost symlinked directory on ``path`` below ``top``, if any."""
    rel = Path(os.path.relpath(path, top))
    current = Path(top)
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            return str(current)
    return None


def evaluation_folder(data: Any) -> str:
    """``data.test_split``: the evaluation folder of an ImageFolder tree under ``data.root`` (``test``; ``val``).

    Raises:
        RecipeError: an empty name, an absolute path or one leading out of ``data.root`` (``..``).
    """
    value = getattr(data, "test_split", None)  # None: a recipe stored before the key existed
    split = "test" if value is None else str(value)
    parts = Path(split).parts
    if not split.strip() or Path(split).is_absolute() or ".." in parts or parts in ((), (".",)):
        raise RecipeError(
            f"key 'data.test_split': expected a folder under data.root holding <class>/<image> (test, val), "
            f"got {split!r}"
        )
    return split


def folder_classes(root: Path, test_split: str = "test") -> list[str]:
    """The class names of ``<root>/train`` (sorted folder names); ``<root>/<test_split>`` may hold only some of them.

    Raises:
        RecipeError: a missing ``train`` or ``test_split`` folder, or test classes absent from train.
    """
    for split in ("train", test_split):
        _require_folder(root, split, test_split)
    classes, test_classes = _find_classes(root, "train", test_split), _find_classes(root, test_split, test_split)
    _check_classes(root, test_split, test_classes, classes)
    return list(classes)


def _folder_layout(root: Path, test_split: str = "test") -> str:
    return f"imagefolder expects {root}/train/<class>/<image> and {root}/{test_split}/<class>/<image>"


def _require_folder(root: Path, split: str, test_split: str = "test") -> None:
    try:
        is_dir = stat.S_ISDIR(os.stat(root / split).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        is_dir = False
    except OSError as err:  # a root without search permission: not "not a directory"
        raise RecipeError(f"key 'data.root': cannot read folder {root} ({_reason(err)})") from None
    if not is_dir:
        key = "data.test_split" if split == test_split != "test" else "data.root"  # the key that names the folder
        raise RecipeError(f"key '{key}': {_folder_layout(root, test_split)}; {root / split} is not a directory")


def _check_classes(root: Path, split: str, found: Sequence[str], classes: Sequence[str]) -> None:
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise RecipeError(f"key 'data.root': {split} classes {unknown} in {root} are not among the training classes")


def folder_samples(
    root: Path,
    split: str,
    classes: Sequence[str],
    limit: int | None = None,
    *,
    check_files: bool = True,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> list[tuple[str, int]]:
    """``(path, label)`` of ``<root>/<split>/<class>/*`` as torchvision's ImageFolder lists them, limit applied.

    ``check_files=False`` skips the per-file checks (a stat each), for streamed sets that check on reading;
    ``max_pixels`` (``data.max_image_pixels``) bounds the size of a file (:func:`max_image_file_bytes`).

    Raises:
        RecipeError: a missing folder, no images, a class folder not in ``classes``, or an unreadable file.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    layout = "test" if split == "train" else split  # the evaluation folder the messages name
    _require_folder(root, split, layout)
    found = _find_classes(root, split, layout)
    _check_classes(root, split, found, classes)
    class_to_idx = {name: i for i, name in enumerate(classes)}
    check_tree(root / split)
    try:
        samples = make_dataset(str(root / split), class_to_idx, IMG_EXTENSIONS, allow_empty=split != "train")
    except FileNotFoundError as err:
        raise RecipeError(f"key 'data.root': {_folder_layout(root, layout)}; {first_line(err)}") from None
    if not samples:
        raise RecipeError(f"key 'data.root': {_folder_layout(root, layout)}; no images found in {root / split}")
    limit_key = "data.train_limit" if split == "train" else "data.test_limit"
    samples = [samples[i] for i in subset_indices(len(samples), limit, limit_key)]
    if check_files:
        check_image_files(samples, max_pixels)
    return samples
