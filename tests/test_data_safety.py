"""Hostile image trees: files that never end, images that decode to gigabytes, unreadable files, a forged cache.

Each case ends in one line naming the file (and the key), without hanging or exhausting memory: a FIFO is never
opened for reading, a device never read, an image's size read from its header before it is decoded, and the
decoded-image cache checked against the SHA-256 written beside it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image

from mbn.config import RecipeError, load_recipe
from mbn.data import build_data, load_image_folder
from mbn.data.files import DEFAULT_MAX_IMAGE_PIXELS
from mbn.data.streamed import StreamingImageFolder
from mbn.plan import check_dataset_present
from tests.test_streaming import CLASSES, REPO, data_cfg, make_tree, train_streamed

pytestmark = pytest.mark.timeout(60)  # a regression that blocks on a FIFO fails here instead of hanging the suite


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path / "cache"))


def _refused(cfg, *, match: str) -> str:
    """The one-line RecipeError ``build_data(cfg)`` ends in (workers off: everything runs in this process)."""
    with pytest.raises(RecipeError) as err:
        build_data(cfg, seed=0, device="cpu")
    message = str(err.value)
    assert "\n" not in message and match in message, message
    return message


@contextmanager
def _memory_capped(extra: int = 2 * 2**30) -> Iterator[None]:
    """At most ``extra`` more bytes of address space: reading ``/dev/zero`` to its end fails fast, not the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _replace(path: Path, make) -> Path:
    path.unlink()
    make(path)
    return path


# --- Item 8: regular, non-empty files only; FIFOs never opened, devices never read -------------------------------


@pytest.mark.parametrize("preload", [False, True], ids=["streamed", "preloaded"])
def test_a_fifo_in_the_tree_is_named_not_waited_on(tmp_path, preload):
    root = make_tree(tmp_path / "tree", per_class=2)
    fifo = _replace(root / "train" / "dog" / "001.png", os.mkfifo)
    message = _refused(data_cfg(root, preload=preload), match=str(fifo))
    assert "is a FIFO (named pipe), not an image file" in message


def test_a_fifo_is_named_in_one_line_by_mbn_train(tmp_path, capsys):
    root = make_tree(tmp_path / "tree", per_class=2)
    fifo = _replace(root / "train" / "cat" / "000.png", os.mkfifo)
    assert train_streamed(root, tmp_path / "run", "trainer.max_steps=1") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(fifo) in err and "FIFO" in err, err


@pytest.mark.parametrize("decode_on_device", [False, True], ids=["workers", "device"])
def test_a_streamed_dataset_refuses_a_fifo_it_reaches_later(tmp_path, decode_on_device):
    """A FIFO the resume fingerprint did not sample (ImageNet: 64 of 1.28M files) is refused by the reader too."""
    root = make_tree(tmp_path / "tree", per_class=1)
    fifo = _replace(root / "train" / "frog" / "000.png", os.mkfifo)
    samples = [(str(root / "train" / c / "000.png"), i) for i, c in enumerate(CLASSES)]
    dataset = StreamingImageFolder(samples, 32, train=True, augment="cifar", decode_on_device=decode_on_device)
    with pytest.raises(RecipeError, match="is a FIFO") as err:
        dataset.__getitems__([(0, 0), (1, 0), (2, 0)])
    assert str(fifo) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("preload", [False, True], ids=["streamed", "preloaded"])
def test_a_link_to_dev_zero_is_refused_without_reading_it(tmp_path, preload):
    root = make_tree(tmp_path / "tree", per_class=2)
    link = _replace(root / "train" / "dog" / "000.png", lambda p: p.symlink_to("/dev/zero"))
    with _memory_capped():
        message = _refused(data_cfg(root, preload=preload), match=str(link))
    assert "is a character device (a link to /dev/zero), not an image file" in message


@pytest.mark.parametrize("preload", [False, True], ids=["streamed", "preloaded"])
def test_an_empty_file_is_refused(tmp_path, preload):
    root = make_tree(tmp_path / "tree", per_class=2)
    empty = root / "train" / "frog" / "001.png"
    empty.write_bytes(b"")
    _refused(data_cfg(root, preload=preload), match=f"key 'data.root': {empty} is an empty file, not an image")


def test_a_file_larger_than_any_image_within_the_pixel_limit_is_not_read(tmp_path):
    root = make_tree(tmp_path / "tree", per_class=2)
    big = root / "train" / "cat" / "001.png"
    with big.open("r+b") as f:
        f.truncate(2**25)  # sparse: 32 MiB on paper, nothing on disk; 1000 pixels allow 16 MiB
    message = _refused(data_cfg(root, preload=False, max_image_pixels=1000), match=str(big))
    assert message.startswith("key 'data.max_image_pixels':") and "is 32 MiB, more than" in message


# --- Item 9: the pixel count from the header, before decoding ---------------------------------------------------


def _huge_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black grayscale PNG of ``width`` x ``height``, written row by row (a few KB per 10 MP)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compress = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then black pixels
    idat = b"".join(compress.compress(row) for _ in range(height)) + compress.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_an_image_above_the_default_pixel_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    """9500x9500 (90 MP, a 90 KB file): just above PIL's limit; it would decode to 270 MB of RGB."""
    root = make_tree(tmp_path / "tree", per_class=2)
    bomb = _huge_png(root / "train" / "dog" / "000.png", 9500, 9500)
    assert bomb.stat().st_size < 200_000 and DEFAULT_MAX_IMAGE_PIXELS < 9500 * 9500

    real, size = torchvision.io.decode_image, bomb.stat().st_size

    def guarded(data, *args, **kwargs):
        assert len(data) != size, "decoded an image above the pixel limit"
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_image", guarded)
    expected = (
        f"key 'data.max_image_pixels': image {bomb} is 9500x9500 (90250000 pixels), more than "
        f"data.max_image_pixels={DEFAULT_MAX_IMAGE_PIXELS}; raise the key to decode it"
    )
    assert _refused(data_cfg(root), match=str(bomb)) == expected  # preloaded: every file decoded at the start
    streamed = build_data(data_cfg(root, preload=False, batch_size=6), seed=0, device="cpu")  # one batch: all 6
    with pytest.raises(RecipeError) as err:
        next(iter(streamed.train.epoch_batches(0)))
    assert str(err.value) == expected


@pytest.mark.parametrize(
    ("preload", "decode"),
    [(True, "workers"), (False, "workers"), (False, "device")],
    ids=["preloaded", "streamed", "device"],
)
def test_the_pixel_limit_is_the_recipe_key(tmp_path, preload, decode):
    root = make_tree(tmp_path / "tree", (40, 30), per_class=2)
    cfg = data_cfg(
        root, preload=preload, decode=decode, max_image_pixels=1199, augment="imagenet" if not preload else "cifar"
    )
    if preload:
        message = _refused(cfg, match="is 40x30 (1200 pixels), more than data.max_image_pixels=1199")
    else:  # streamed: found when a batch is read
        bundle = build_data(cfg, seed=0, device="cpu")
        with pytest.raises(RecipeError) as err:
            next(iter(bundle.train.epoch_batches(0)))
        message = str(err.value)
        assert "is 40x30 (1200 pixels), more than data.max_image_pixels=1199" in message
    assert message.startswith(f"key 'data.max_image_pixels': image {root}") and "\n" not in message
    ok = data_cfg(
        root, preload=preload, decode=decode, max_image_pixels=1200, augment="imagenet" if not preload else "cifar"
    )
    bundle = build_data(ok, seed=0, device="cpu")
    next(iter(bundle.train.epoch_batches(0)))


@pytest.mark.parametrize("value", [0, -5])
def test_the_pixel_limit_must_be_positive(value):
    with pytest.raises(RecipeError, match=r"key 'data.max_image_pixels': expected"):
        load_recipe(REPO / "recipes" / "quickstart.yaml", [f"data.max_image_pixels={value}"])


# --- Item 15: unreadable files and folders give the errno's words ------------------------------------------------


@contextmanager
def _unprivileged() -> Iterator[None]:
    """Permissions that apply: as root (CAP_DAC_OVERRIDE reads mode-000 files) run as ``nobody`` meanwhile."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A folder that ``nobody`` can reach (pytest's own are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="mbn-perm-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in folder.rglob("*"):
            if not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(folder)


@pytest.mark.parametrize("preload", [False, True], ids=["streamed", "preloaded"])
@pytest.mark.parametrize("what", ["file", "folder", "root"])
def test_unreadable_files_and_folders_are_named_with_the_errno_words(open_tmp, monkeypatch, preload, what):
    root = make_tree(open_tmp / "tree", per_class=2)
    monkeypatch.setenv("MBN_CACHE_DIR", str(open_tmp / "cache"))
    bad = {"file": root / "train" / "dog" / "001.png", "folder": root / "train" / "dog", "root": root}[what]
    bad.chmod(0o000)
    cfg = data_cfg(root, preload=preload)
    kind = "image" if what == "file" else "folder"
    with _unprivileged():
        message = _refused(cfg, match=f"key 'data.root': cannot read {kind} {bad} (Permission denied)")
        if what == "root":  # the check before anything is built (mbn-train, mbn-eval)
            with pytest.raises(RecipeError) as err:
                check_dataset_present(cfg)
            assert str(err.value) == message


# --- Item 3: the decoded-image cache is checked against the SHA-256 written beside it ----------------------------


def test_a_cache_replaced_by_other_images_of_its_shape_is_decoded_again(tmp_path, caplog):
    root = make_tree(tmp_path / "tree", per_class=2)
    cache = tmp_path / "cache"
    train, _, _ = load_image_folder(root, 32, cache_dir=cache)
    (npy,) = cache.glob("tree-train-*.npy")
    assert train.cache_file == str(npy)
    recorded = Path(f"{npy}.sha256").read_text().split()
    assert recorded == [hashlib.sha256(npy.read_bytes()).hexdigest(), npy.name]  # as sha256sum writes it
    forged = np.load(npy)
    forged[0, 0, 0, 0] ^= 1  # other pixels, the same shape and dtype
    np.save(npy, forged)
    caplog.set_level(logging.WARNING, logger="mbn.data.preloaded")
    again, _, _ = load_image_folder(root, 32, cache_dir=cache)
    np.testing.assert_array_equal(again.images, train.images)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(npy) in warnings[0] and "SHA-256" in warnings[0], warnings
    np.testing.assert_array_equal(np.load(npy), train.images)  # rewritten with what the tree decodes to
    caplog.clear()
    load_image_folder(root, 32, cache_dir=cache)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("damage", ["truncated", "no hash", "fifo"])
def test_a_damaged_cache_is_named_and_decoded_again(tmp_path, caplog, damage):
    root = make_tree(tmp_path / "tree", per_class=2)
    cache = tmp_path / "cache"
    train, _, _ = load_image_folder(root, 32, cache_dir=cache)
    (npy,) = cache.glob("tree-train-*.npy")
    if damage == "truncated":
        npy.write_bytes(npy.read_bytes()[:-100])
    elif damage == "no hash":
        Path(f"{npy}.sha256").unlink()
    else:
        _replace(npy, os.mkfifo)
    caplog.set_level(logging.WARNING, logger="mbn.data.preloaded")
    again, _, _ = load_image_folder(root, 32, cache_dir=cache)
    np.testing.assert_array_equal(again.images, train.images)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(npy) in warnings[0], warnings


def test_the_bundle_names_the_cache_its_training_images_came_from(tmp_path):
    root = make_tree(tmp_path / "tree", per_class=2)
    bundle = build_data(data_cfg(root), seed=0, device="cpu")
    (npy,) = (tmp_path / "cache").glob("tree-train-*.npy")
    assert bundle.train_cache == str(npy)
    assert str(npy) in bundle.describe_training_set(root) and str(root) in bundle.describe_training_set(root)
    streamed = build_data(data_cfg(root, preload=False), seed=0, device="cpu")
    assert streamed.describe_training_set(root) == f"the training set under {root}"


def test_images_within_the_limit_decode_as_before(tmp_path):
    """The header check changes nothing for good images: the cached arrays equal a direct PIL decode."""
    root = make_tree(tmp_path / "tree", (32, 32), per_class=2)
    train, _, _ = load_image_folder(root, 32, cache_dir=tmp_path / "cache")
    first = sorted((root / "train" / CLASSES[0]).iterdir())[0]
    np.testing.assert_array_equal(train.images[0], np.asarray(Image.open(first).convert("RGB")))
    assert torch.from_numpy(train.images).dtype == torch.uint8
