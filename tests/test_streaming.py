"""Streamed ImageFolder (data.preload=false): same images as the preloaded path, seeded crops, bad files named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from mbn.checkpoint import load_checkpoint
from mbn.cli.train import main as train_main
from mbn.config import DataCfg, RecipeError, load_recipe
from mbn.data import build_data, load_test_split, streamed_fingerprints
from mbn.data.streamed import StreamingImageFolder
from mbn.data.transforms import random_resized_crop_box
from mbn.fileio import atomic_torch_save
from tests.runs import TINY

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "frog")


def make_tree(root: Path, size: tuple[int, int] = (32, 32), per_class: int = 6, fmt: str = "png") -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                w, h = size
                array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(array).save(root / split / c / f"{i:03d}.{fmt}")
    return root


def data_cfg(root: Path, **overrides):
    base = {"name": "imagefolder", "root": str(root), "batch_size": 4, "eval_batch_size": 5, "num_workers": 0}
    return OmegaConf.merge(OmegaConf.structured(DataCfg), {**base, **overrides})


def streamed_test(bundle) -> tuple[np.ndarray, np.ndarray]:
    batches = list(bundle.test)
    images = torch.cat([b[0] for b in batches]).permute(0, 2, 3, 1).numpy()
    return images, torch.cat([b[1] for b in batches]).numpy()


@pytest.mark.parametrize(("size", "fmt", "extra"), [((32, 32), "png", {}), ((48, 40), "jpg", {"augment": "imagenet"})])
def test_streamed_test_split_equals_the_preloaded_one(tmp_path, monkeypatch, size, fmt, extra):
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path / "cache"))
    root = make_tree(tmp_path / "tree", size, fmt=fmt)
    preloaded = build_data(data_cfg(root), seed=0, device="cpu")
    streamed = build_data(data_cfg(root, preload=False, crop_fraction=1.0, **extra), seed=0, device="cpu")
    images, labels = streamed_test(streamed)
    np.testing.assert_array_equal(images, preloaded.test_split.images)
    np.testing.assert_array_equal(labels, preloaded.test_split.labels)
    np.testing.assert_array_equal(streamed.train.dataset.labels, preloaded.train_split.labels)
    assert streamed.class_names == preloaded.class_names == list(CLASSES)
    assert len(streamed.train) == len(preloaded.train)


@pytest.mark.slow
def test_evaluation_decodes_a_streamed_test_split_with_its_crop(tmp_path, monkeypatch, capsys):
    root = make_tree(tmp_path / "tree", (48, 40), fmt="png")
    cfg = data_cfg(root, preload=False, augment="imagenet", crop_fraction=0.8, num_workers=1)
    bundle = build_data(cfg, seed=0, device="cpu")
    split = load_test_split(cfg, bundle.stats)
    images, labels = streamed_test(bundle)
    np.testing.assert_array_equal(split.images, images)  # resize 40, centre crop 32: what training evaluated
    np.testing.assert_array_equal(split.labels, labels)
    from mbn.cli.eval import main as eval_main

    run = tmp_path / "run"
    assert train_streamed(root, run, "data.augment=imagenet", "data.crop_fraction=0.8", "trainer.max_steps=2") == 0
    assert eval_main([str(run)]) == 0
    trained = json.loads((run / "metrics.json").read_text())["test_acc"]["clean"]
    evaluated = json.loads((run / "eval.json").read_text())
    assert abs(evaluated["clean_acc"] - trained) < 1e-9, evaluated


def test_random_resized_crop_sizes_and_determinism(tmp_path):
    root = make_tree(tmp_path / "tree", (57, 41), per_class=3, fmt="png")
    samples = [(str(p), 0) for p in sorted((root / "train").rglob("*.png"))]
    a = StreamingImageFolder(samples, 24, train=True, augment="imagenet", seed=3)
    b = StreamingImageFolder(samples, 24, train=True, augment="imagenet", seed=3)
    for index in range(len(samples)):
        assert a.load(index, epoch=0).shape == (3, 24, 24)
        assert torch.equal(a.load(index, epoch=0), b.load(index, epoch=0))  # seeded by (seed, epoch, index)
    epochs = [a.load(0, epoch=e) for e in range(4)]
    assert any(not torch.equal(epochs[0], x) for x in epochs[1:])  # a new crop every epoch
    rng = np.random.default_rng(0)
    for height, width in ((10, 300), (300, 10), (64, 48), (1, 1)):
        top, left, h, w = random_resized_crop_box(height, width, rng)
        assert top >= 0 and top + h <= height and left >= 0 and left + w <= width and h > 0 and w > 0


def test_streamed_batches_do_not_depend_on_workers(tmp_path):
    root = make_tree(tmp_path / "tree", (40, 40))
    cfg = data_cfg(root, preload=False, augment="imagenet", image_size=32)
    serial = list(build_data(cfg, seed=1, device="cpu").train.epoch_batches(0))
    cfg.num_workers = 2
    parallel = list(build_data(cfg, seed=1, device="cpu").train.epoch_batches(0))
    assert len(serial) == len(parallel) == 4
    for (x0, y0), (x1, y1) in zip(serial, parallel, strict=True):
        assert x0.dtype == torch.uint8 and x0.shape == (4, 3, 32, 32)
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def train_streamed(root: Path, out: Path, *extra: str) -> int:
    return train_main(
        [
            str(REPO / "recipes" / "advprop.yaml"),
            *TINY,
            "data.name=imagefolder",
            f"data.root={root}",
            "data.preload=false",
            "data.batch_size=4",
            "data.num_workers=1",
            f"trainer.out_dir={out}",
            *extra,
        ]
    )


def test_training_streams_an_imagefolder_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path / "cache"))
    root = make_tree(tmp_path / "tree", (40, 36), fmt="jpg")
    assert train_streamed(root, tmp_path / "run", "data.augment=imagenet", "trainer.max_steps=3") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 3
    assert not (tmp_path / "cache").exists()  # nothing decoded into a cache


@pytest.mark.slow
def test_a_streamed_run_resumes_bit_identically(tmp_path, monkeypatch):
    """RandomResizedCrop seeded by (seed, epoch, index) and the worker-decoded order: a resume repeats them exactly."""
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path / "cache"))
    root = make_tree(tmp_path / "tree", (40, 36), fmt="jpg")
    extra = ("data.augment=imagenet", "data.image_size=32")  # 18 images, 4 per batch: 4 steps per epoch
    assert train_streamed(root, tmp_path / "full", *extra, "trainer.max_steps=6") == 0
    assert train_streamed(root, tmp_path / "part", *extra, "trainer.max_steps=3") == 0
    assert train_main(["--resume", str(tmp_path / "part"), "trainer.max_steps=6"]) == 0
    full, resumed = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    assert resumed["state"]["step"] == 6 and resumed["state"]["epoch"] == 1
    torch.testing.assert_close(resumed["model"], full["model"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["optimizer"]["state"], full["optimizer"]["state"], rtol=0, atol=0)


@pytest.mark.slow
def test_resuming_a_streamed_run_on_other_pixels_is_refused(tmp_path, capsys):
    """Same file names, labels and count, other image content: the fingerprint reads 64 files spread over the set."""
    root = make_tree(tmp_path / "tree", (32, 32))
    other = tmp_path / "other"
    for path in root.rglob("*.png"):  # every image changed, every name kept
        target = other / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - np.asarray(Image.open(path))).save(target)
    run = tmp_path / "run"
    assert train_streamed(root, run, "trainer.max_steps=2") == 0
    before = (run / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    assert train_main(["--resume", str(run), f"data.root={other}", "trainer.max_steps=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not the one this run was trained on" in err, err
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    moved = tmp_path / "moved"  # the same data elsewhere: data.root may move
    root.rename(moved)
    assert train_main(["--resume", str(run), f"data.root={moved}", "trainer.max_steps=4"]) == 0


def test_one_changed_image_changes_the_content_fingerprint_not_the_listing(tmp_path):
    root = make_tree(tmp_path / "tree", (32, 32))
    samples = sorted((str(p), CLASSES.index(p.parent.name)) for p in (root / "train").rglob("*.png"))
    listing, content = streamed_fingerprints(root, samples, 32)
    changed = Path(samples[len(samples) // 2][0])  # a tree under 64 images: every file is read
    Image.fromarray(255 - np.asarray(Image.open(changed))).save(changed)
    new_listing, new_content = streamed_fingerprints(root, samples, 32)
    assert new_listing == listing and new_content != content


@pytest.mark.slow
def test_a_streamed_run_saved_before_content_fingerprints_still_resumes(tmp_path):
    root = make_tree(tmp_path / "tree", (32, 32))
    run = tmp_path / "run"
    assert train_streamed(root, run, "trainer.max_steps=2") == 0
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    samples = sorted((str(p), CLASSES.index(p.parent.name)) for p in (root / "train").rglob("*.png"))
    listing, content = streamed_fingerprints(root, samples, 32)
    assert ckpt["data_fingerprint"] == content != listing
    ckpt["data_fingerprint"] = listing  # what mbn 0.3.0 stored
    atomic_torch_save(ckpt, run / "checkpoints" / "last.pt")
    assert train_main(["--resume", str(run), "trainer.max_steps=4"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["data_fingerprint"] == content


@pytest.mark.parametrize(
    ("damage", "extra", "message"),
    [
        (lambda p: p.write_bytes(b"not an image at all"), [], "cannot decode image"),
        (lambda p: Image.new("RGB", (5, 40)).save(p, format="PNG"), ["data.augment=imagenet"], "smaller than"),
        (lambda p: Image.new("RGB", (40, 40)).save(p, format="PNG"), [], "data.augment=cifar trains at the native"),
    ],
    ids=["garbage", "too-small", "wrong-size-for-cifar"],
)
@pytest.mark.parametrize("decode", ["workers", "device"])
def test_bad_files_are_named_in_one_line(tmp_path, capsys, damage, extra, message, decode):
    root = make_tree(tmp_path / "tree", (32, 32))
    bad = root / "train" / "dog" / "002.png"
    damage(bad)
    assert train_streamed(root, tmp_path / "run", "trainer.epochs=1", f"data.decode={decode}", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(bad) in err and message in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"augment": "imagenet"}, "key 'data.augment': imagenet (RandomResizedCrop) needs"),
        ({"name": "synthetic", "preload": False}, "key 'data.preload': only imagefolder trees stream"),
        ({"decode": "device"}, "key 'data.decode': device decoding is for streamed trees"),
        ({"preload": False, "on_device": True}, "key 'data.on_device': holding the set on the device is for preloaded"),
    ],
)
def test_streaming_options_are_checked(tmp_path, overrides, message):
    root = make_tree(tmp_path / "tree", (32, 32), per_class=2)
    with pytest.raises(RecipeError) as err:
        build_data(data_cfg(root, **overrides), seed=0, device="cpu")
    assert message in str(err.value)
    keys = [f"data.{k}={v}" for k, v in {"name": "imagefolder", "root": str(root), **overrides}.items()]
    with pytest.raises(RecipeError) as err:  # already when the recipe loads: no torchrun rank waits for rank 0's data
        load_recipe(REPO / "recipes" / "quickstart.yaml", keys)
    assert message in str(err.value)


def _epoch(bundle, epoch=0):
    return [(x.clone(), y.clone()) for x, y in bundle.train.epoch_batches(epoch)]


@pytest.mark.parametrize(
    ("size", "fmt", "extra"),
    [((40, 36), "jpg", {"augment": "imagenet", "image_size": 24}), ((32, 32), "png", {}), ((32, 32), "jpg", {})],
    ids=["jpeg-imagenet", "png-cifar", "jpeg-cifar"],
)
def test_decoding_on_the_device_gives_the_workers_batches(tmp_path, size, fmt, extra):
    """data.decode=device: the same crops and flips, decoded in the main process; on the CPU the same bytes."""
    root = make_tree(tmp_path / "tree", size, fmt=fmt)
    workers = build_data(data_cfg(root, preload=False, num_workers=1, **extra), seed=3, device="cpu")
    device = build_data(data_cfg(root, preload=False, decode="device", num_workers=1, **extra), seed=3, device="cpu")
    for epoch in (0, 1):
        a, b = _epoch(workers, epoch), _epoch(device, epoch)
        assert len(a) == len(b) == 4
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert xb.dtype == torch.uint8 and xb.shape == xa.shape
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    resumed = [x for x, _ in device.train.epoch_batches(1, 2)]
    assert torch.equal(resumed[0], _epoch(device, 1)[2][0])  # a resume mid-epoch decodes the same batch


@pytest.mark.slow
def test_training_decodes_on_the_device_and_resumes_exactly(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tree", (40, 36), fmt="jpg")
    extra = ("data.augment=imagenet", "data.image_size=32", "data.decode=device")
    assert train_streamed(root, tmp_path / "full", *extra, "trainer.max_steps=6") == 0
    assert train_streamed(root, tmp_path / "part", *extra, "trainer.max_steps=3") == 0
    assert train_main(["--resume", str(tmp_path / "part"), "trainer.max_steps=6"]) == 0
    full, resumed = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    torch.testing.assert_close(resumed["model"], full["model"], rtol=0, atol=0)
    assert train_streamed(root, tmp_path / "workers", "data.augment=imagenet", "data.image_size=32",
                          "trainer.max_steps=6") == 0  # fmt: skip
    workers = load_checkpoint(tmp_path / "workers" / "checkpoints" / "last.pt")
    torch.testing.assert_close(workers["model"], full["model"], rtol=0, atol=0)  # the same training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_jpegs_decode_on_the_gpu_close_to_the_cpu(tmp_path):
    root = make_tree(tmp_path / "tree", (64, 48), fmt="jpg")
    cfg = data_cfg(root, preload=False, decode="device", augment="imagenet", image_size=32)
    cpu = _epoch(build_data(cfg, seed=0, device="cpu"))
    gpu = _epoch(build_data(cfg, seed=0, device="cuda"))
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.is_cuda and torch.equal(yc, yg.cpu())
        diff = (xc.float() - xg.cpu().float()).abs()
        assert diff.mean() < 3 and diff.max() <= 64  # nvJPEG's IDCT and the GPU resize round differently


def test_16_bit_pngs_and_animated_gifs_decode_to_8_bit_rgb(tmp_path):
    """torchvision decodes a 16-bit PNG as uint16 and a GIF as frames: both become one uint8 RGB image."""
    import cv2

    from mbn.data import decode_image_file

    deep = np.random.default_rng(0).integers(0, 2**16, (32, 32, 3)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), deep[..., ::-1])  # OpenCV writes BGR
    image = decode_image_file(str(tmp_path / "deep.png"))
    assert image.dtype == torch.uint8
    assert torch.equal(image, torch.from_numpy((deep >> 8).astype(np.uint8)).permute(2, 0, 1))
    frames = [Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)) for i in (1, 2, 3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    gif = decode_image_file(str(tmp_path / "anim.gif"))
    assert gif.shape == (3, 32, 32) and gif.dtype == torch.uint8
    with Image.open(tmp_path / "anim.gif") as first:
        assert torch.equal(gif, torch.from_numpy(np.asarray(first.convert("RGB")).copy()).permute(2, 0, 1))

    root = make_tree(tmp_path / "tree", (32, 32))
    cv2.imwrite(str(root / "train" / "cat" / "000.png"), deep[..., ::-1])
    batches = {}
    for decode in ("workers", "device"):
        bundle = build_data(data_cfg(root, preload=False, decode=decode), seed=0, device="cpu")
        batches[decode] = _epoch(bundle)
        assert all(x.dtype == torch.uint8 for x, _ in batches[decode])
    for (a, _), (b, _) in zip(batches["workers"], batches["device"], strict=True):
        assert torch.equal(a, b)
