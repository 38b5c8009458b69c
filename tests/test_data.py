"""Tests for mbn.data and mbn.synthetic: datasets, augmentation seeding, resumable loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import mbn.data.preloaded as preloaded_mod
from mbn.config import DataCfg, RecipeError
from mbn.data import (
    ArraySplit,
    AugmentedArrayDataset,
    DataStats,
    DeviceTrainLoader,
    EvalLoader,
    TrainLoader,
    base_transform,
    build_data,
    channel_stats,
    load_arrays,
    load_test_split,
    subset_indices,
    to_device,
)
from mbn.synthetic import SYNTHETIC_CLASSES, generate_synthetic


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path / "cache"))


def _synthetic_cfg(**kw: object) -> DataCfg:
    base = {"name": "synthetic", "synthetic_train_size": 400, "synthetic_test_size": 100, "batch_size": 32}
    return DataCfg(**{**base, **kw})


def _identical_images(n: int = 64, size: int = 16) -> ArraySplit:
    """``n`` copies of one random image, labelled by index: an augmented output identifies its crop/flip."""
    image = np.random.default_rng(0).integers(1, 256, (size, size, 3), dtype=np.uint8)  # no zeros, unlike padding
    return ArraySplit(np.repeat(image[None], n, axis=0), np.arange(n, dtype=np.int64))


def _loader(
    split: ArraySplit, batch_size: int = 8, seed: int = 0, num_workers: int = 0, padding: int = 4
) -> TrainLoader:
    dataset = AugmentedArrayDataset(split, base_transform(split.images.shape[1], padding, True), seed)
    return TrainLoader(dataset, batch_size, seed=seed, num_workers=num_workers)


def _all_crops(image_hwc: np.ndarray, padding: int) -> torch.Tensor:
    """Every zero-padded crop and its mirror of one image, as (K, C, H, W)."""
    img = torch.from_numpy(image_hwc).permute(2, 0, 1)
    h, w = img.shape[1:]
    padded = nn.functional.pad(img, (padding,) * 4)
    crops = [padded[:, y : y + h, x : x + w] for y in range(2 * padding + 1) for x in range(2 * padding + 1)]
    crops = torch.stack(crops)
    return torch.cat([crops, crops.flip(-1)])


def _crop_ids(images: torch.Tensor, candidates: torch.Tensor) -> list[int]:
    """Index of the candidate each image equals; fails if one matches none."""
    eq = (images[:, None] == candidates[None]).flatten(2).all(-1)
    assert eq.any(1).all(), "an augmented image is not a zero-padded crop (or mirror) of the source"
    return eq.float().argmax(1).tolist()


# ------------------------------------------------------------------------------------------ synthetic


def test_synthetic_deterministic_and_balanced() -> None:
    x1, y1 = generate_synthetic(205, 32, seed=3)
    x2, y2 = generate_synthetic(205, 32, seed=3)
    x3, _ = generate_synthetic(205, 32, seed=4)
    assert x1.shape == (205, 32, 32, 3) and x1.dtype == np.uint8 and y1.dtype == np.int64
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    counts = np.bincount(y1, minlength=len(SYNTHETIC_CLASSES))
    assert counts.min() == 20 and counts.max() == 21
    assert generate_synthetic(30, 20, seed=0, chunk=7)[0].shape == (30, 20, 20, 3)
    np.testing.assert_array_equal(generate_synthetic(30, 16, seed=0, chunk=7)[0], generate_synthetic(30, 16)[0])


def test_synthetic_colour_carries_no_label() -> None:
    x, y = generate_synthetic(4000, 16, seed=0)
    colour = x.reshape(len(x), -1, 3).mean(1)
    # Nearest class-mean colour, fitted on one half, scored on the other: chance level if colour is a nuisance.
    class_means = np.stack([colour[:2000][y[:2000] == c].mean(0) for c in range(10)])
    pred = np.linalg.norm(colour[2000:, None] - class_means[None], axis=-1).argmin(1)
    assert (pred == y[2000:]).mean() < 0.15


def test_synthetic_bad_args() -> None:
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic(10, 4)
    with pytest.raises(ValueError, match="num_images"):
        generate_synthetic(-1)


@pytest.mark.slow
def test_tiny_cnn_learns_synthetic() -> None:
    torch.manual_seed(0)
    x, y = generate_synthetic(1000, 32, seed=0)
    xt, yt = generate_synthetic(300, 32, seed=1)
    images = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    test_images = torch.from_numpy(xt).permute(0, 3, 1, 2).float() / 255

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    net = nn.Sequential(
        *block(3, 16), nn.MaxPool2d(2), *block(16, 32), nn.MaxPool2d(2), *block(32, 64),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(80):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        loss = nn.functional.cross_entropy(net(images[idx]), torch.from_numpy(y[idx.numpy()]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(test_images).argmax(1).numpy() == yt).mean()
    assert acc > 0.6  # chance is 0.1; about 0.9 is typical


def test_synthetic_bundle() -> None:
    bundle = build_data(_synthetic_cfg(image_size=24), seed=0, device="cpu")
    assert bundle.num_classes == 10 and bundle.class_names == list(SYNTHETIC_CLASSES)
    assert bundle.image_size == 24 and len(bundle.train) == 400 // 32
    images, labels = bundle.test_split.images, bundle.test_split.labels
    assert images.shape == (100, 24, 24, 3) and images.dtype == np.uint8 and labels.shape == (100,)
    mean, std = channel_stats(bundle.train_split.images)
    assert bundle.mean == mean and bundle.std == std
    assert all(0.3 < m < 0.7 for m in mean) and all(0.2 < s < 0.4 for s in std)


def test_channel_stats_exact() -> None:
    images = np.random.default_rng(0).integers(0, 256, (10, 5, 7, 3), dtype=np.uint8)
    mean, std = channel_stats(images)
    pixels = images.reshape(-1, 3) / 255.0
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), torch.tensor(pixels.mean(0)))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), torch.tensor(pixels.std(0)))


# ----------------------------------------------------------------------------------------- augmentation


def test_augmentation_is_padded_crop_or_flip() -> None:
    split = _identical_images(32)
    candidates = _all_crops(split.images[0], 4)
    images, _ = next(_loader(split, batch_size=32).epoch_batches(0))
    assert images.shape == (32, 3, 16, 16) and images.dtype == torch.uint8
    ids = _crop_ids(images, candidates)
    assert len(set(ids)) > 16  # 162 possible outcomes; a stuck RNG would give one


def test_augmentation_varies_across_positions_workers_and_epochs() -> None:
    split = _identical_images(64)
    candidates = _all_crops(split.images[0], 4)
    loader = _loader(split, batch_size=8, num_workers=2)
    by_epoch = []
    for epoch in (0, 1):
        batches = list(loader.epoch_batches(epoch))
        # Batches 0 and 1 come from different workers: equal positions must not repeat augmentations.
        ids = [_crop_ids(images, candidates) for images, _ in batches]
        same_position = sum(a == b for a, b in zip(ids[0], ids[1], strict=True))
        assert same_position <= 2
        assert len(set(ids[0])) >= 5
        labels = torch.cat([y for _, y in batches]).tolist()
        by_epoch.append(dict(zip(labels, [c for row in ids for c in row], strict=True)))
    assert by_epoch[0].keys() == by_epoch[1].keys() == set(range(64))
    repeats = sum(by_epoch[0][i] == by_epoch[1][i] for i in range(64))
    assert repeats <= 6  # the same image gets a new crop/flip each epoch (chance of a repeat 1/162)


def test_epoch_determinism_independent_of_workers() -> None:
    split = ArraySplit(*generate_synthetic(96, 16, seed=0))
    runs = [list(_loader(split, batch_size=16, seed=5, num_workers=w).epoch_batches(2)) for w in (0, 2, 0)]
    assert len(runs[0]) == 6
    for batches in runs[1:]:
        for (xa, ya), (xb, yb) in zip(runs[0], batches, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other_epoch = list(_loader(split, batch_size=16, seed=5).epoch_batches(3))
    other_seed = list(_loader(split, batch_size=16, seed=6).epoch_batches(2))
    assert not torch.equal(runs[0][0][1], other_epoch[0][1])
    assert not torch.equal(runs[0][0][1], other_seed[0][1])


def test_epoch_covers_dataset_once_with_drop_last() -> None:
    split = ArraySplit(*generate_synthetic(100, 16, seed=0))
    loader = _loader(split, batch_size=16)
    labels = [i for row in loader.batch_indices(0).tolist() for i in row]
    assert len(loader) == 6 and len(labels) == 96 and len(set(labels)) == 96


def test_start_batch_is_tail_and_skips_work(monkeypatch: pytest.MonkeyPatch) -> None:
    split = ArraySplit(*generate_synthetic(80, 16, seed=0))
    loader = _loader(split, batch_size=8)
    full = list(loader.epoch_batches(1))
    calls = []
    original = AugmentedArrayDataset._augment

    def counting(self: AugmentedArrayDataset, index: int, key: int) -> np.ndarray:
        calls.append(index)
        return original(self, index, key)

    monkeypatch.setattr(AugmentedArrayDataset, "_augment", counting)
    tail = list(loader.epoch_batches(1, start_batch=7))
    assert len(tail) == 3 and len(calls) == 3 * 8
    for (xa, ya), (xb, yb) in zip(full[7:], tail, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert list(loader.epoch_batches(1, start_batch=10)) == []
    with pytest.raises(ValueError, match="start_batch"):
        list(loader.epoch_batches(1, start_batch=11))


def test_no_augmentation_when_disabled() -> None:
    split = ArraySplit(*generate_synthetic(32, 16, seed=0))
    dataset = AugmentedArrayDataset(split, base_transform(16, 0, False), seed=0)
    loader = TrainLoader(dataset, 8, seed=0)
    order = loader.batch_indices(0).flatten().numpy()
    images = torch.cat([x for x, _ in loader.epoch_batches(0)])
    expected = torch.from_numpy(split.images[order]).permute(0, 3, 1, 2)
    assert torch.equal(images, expected)


# --------------------------------------------------------------------------------------- device loader


def test_device_loader(device: torch.device) -> None:
    split = _identical_images(64)
    candidates = _all_crops(split.images[0], 4).to(device)
    loader = DeviceTrainLoader(split, 16, seed=3, device=device, crop_padding=4, hflip=True)
    cpu = _loader(split, batch_size=16, seed=3)
    batches = list(loader.epoch_batches(0))
    assert len(batches) == len(loader) == 4
    ids = []
    for (images, labels), (_, cpu_labels) in zip(batches, cpu.epoch_batches(0), strict=True):
        assert images.device.type == device.type and images.dtype == torch.uint8
        assert torch.equal(labels.cpu(), cpu_labels)  # same order as the CPU path
        ids += _crop_ids(images, candidates)
    assert len(set(ids)) > 20
    tail = list(loader.epoch_batches(0, start_batch=2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches[2:], tail, strict=True))


def test_on_device_bundle(device: torch.device) -> None:
    bundle = build_data(_synthetic_cfg(on_device=True), seed=0, device=device)
    assert isinstance(bundle.train, DeviceTrainLoader)
    images, _ = next(iter(bundle.test))
    assert images.device.type == device.type and images.shape == (100, 3, 32, 32)


# ------------------------------------------------------------------------------------ eval & transfer


def test_eval_loader_fixed_order() -> None:
    split = ArraySplit(*generate_synthetic(50, 16, seed=0))
    loader = EvalLoader(split, 16)
    batches = list(loader)
    assert len(loader) == len(batches) == 4 and len(batches[-1][1]) == 2
    images = torch.cat([x for x, _ in batches])
    assert torch.equal(images, torch.from_numpy(split.images).permute(0, 3, 1, 2))
    assert torch.equal(torch.cat([y for _, y in batches]), torch.from_numpy(split.labels))


def test_to_device(device: torch.device) -> None:
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(4)
    x, y = to_device((images, labels), device, channels_last=True)
    assert x.dtype == torch.float32 and x.device.type == device.type and y.device.type == device.type
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.cpu(), images.float() / 255)
    assert x.min() >= 0 and x.max() <= 1


# ------------------------------------------------------------------------------------------------ limits


def test_limits_are_fixed_subsets() -> None:
    first = build_data(_synthetic_cfg(train_limit=96, test_limit=30), seed=0, device="cpu")
    second = build_data(_synthetic_cfg(train_limit=96, test_limit=30), seed=7, device="cpu")
    assert len(first.train_split.labels) == 96 and len(first.test_split.labels) == 30
    np.testing.assert_array_equal(first.test_split.images, second.test_split.images)
    idx = subset_indices(1000, 100)
    assert len(set(idx.tolist())) == 100 and idx.max() > 500  # a spread, not the first 100
    with pytest.raises(RecipeError, match=r"data\.train_limit"):
        build_data(_synthetic_cfg(train_limit=0), seed=0, device="cpu")


def test_batch_larger_than_train_set() -> None:
    with pytest.raises(RecipeError, match=r"data\.batch_size"):
        build_data(_synthetic_cfg(train_limit=10), seed=0, device="cpu")


# ------------------------------------------------------------------------------------------ image folder


def _make_tree(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    pngs = {}
    for split, per_class in (("train", 3), ("test", 2)):
        for cls in ("bee", "ant"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                if i == 0:
                    Image.fromarray(image).save(folder / f"{i}.png")
                    pngs[f"{split}/{cls}"] = image
                elif i == 1:  # smooth content, so JPEG stays close
                    image = np.repeat(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], 32, 0).repeat(3, 2)
                    Image.fromarray(image).save(folder / f"{i}.jpg", quality=95)
                    pngs[f"{split}/{cls}/jpg"] = image
                else:  # another size and a grayscale mode: resized / converted on load
                    Image.fromarray(image[:, :, 0]).resize((40, 48)).save(folder / f"{i}.jpeg")
    (root / "train" / "notes.txt").write_text("not an image")
    return pngs


def test_image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pngs = _make_tree(tmp_path / "tree")
    cfg = DataCfg(name="imagefolder", root=str(tmp_path / "tree"), batch_size=2, num_workers=0)
    bundle = build_data(cfg, seed=0, device="cpu")
    assert bundle.class_names == ["ant", "bee"] and bundle.num_classes == 2
    train_images, train_labels = bundle.train_split.images, bundle.train_split.labels
    test_images, test_labels = bundle.test_split.images, bundle.test_split.labels
    assert train_images.shape == (6, 32, 32, 3) and test_images.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(train_labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(test_labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(train_images[0], pngs["train/ant"])  # PNG decodes losslessly
    np.testing.assert_array_equal(test_images[2], pngs["test/bee"])
    assert np.abs(train_images[1].astype(int) - pngs["train/ant/jpg"]).mean() < 3
    gray = train_images[2]
    assert np.array_equal(gray[..., 0], gray[..., 1])  # grayscale expanded to RGB
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2

    def no_decode(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(preloaded_mod, "_decode_files", no_decode)
    cached = build_data(cfg, seed=0, device="cpu")
    np.testing.assert_array_equal(cached.train_split.images, train_images)
    assert len(list(cached.train.epoch_batches(0))) == 3


def test_image_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "train" / "a").mkdir(parents=True)
    cfg = DataCfg(name="imagefolder", root=str(tmp_path), batch_size=1)
    with pytest.raises(RecipeError, match=r"data\.root.*test is not a directory"):
        build_data(cfg, seed=0, device="cpu")
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(RecipeError, match=r"data\.root"):
        build_data(cfg, seed=0, device="cpu")  # no image files
    (tmp_path / "test" / "zebra").mkdir()
    with pytest.raises(RecipeError, match="zebra"):
        build_data(cfg, seed=0, device="cpu")


def test_test_split_alone_uses_the_given_classes(tmp_path: Path) -> None:
    _make_tree(tmp_path / "tree")
    cfg = DataCfg(name="imagefolder", root=str(tmp_path / "tree"), test_limit=3)
    stats = DataStats(("ant", "bee", "cat"), (0.5,) * 3, (0.2,) * 3, 32)
    _, full_test, _ = load_arrays(cfg)
    test = load_test_split(cfg, stats)
    np.testing.assert_array_equal(test.images, full_test.images)
    np.testing.assert_array_equal(test.labels, full_test.labels)
    assert DataStats.from_dict(stats.to_dict()) == stats and stats.num_classes == 3
    with pytest.raises(RecipeError, match=r"data\.root.*\['bee'\]"):
        load_test_split(cfg, DataStats(("ant",), (0.5,) * 3, (0.2,) * 3, 32))
    synthetic = DataCfg(name="synthetic", synthetic_test_size=20, test_limit=5)
    _, synthetic_test, synthetic_stats = load_arrays(synthetic)
    got = load_test_split(synthetic, synthetic_stats)
    np.testing.assert_array_equal(got.images, synthetic_test.images)


def test_cifar_missing_names_root(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"data\.root.*download"):
        build_data(DataCfg(name="cifar10", root=str(tmp_path)), seed=0, device="cpu")
    with pytest.raises(RecipeError, match=r"data\.image_size"):
        build_data(DataCfg(name="cifar100", root=str(tmp_path), image_size=64), seed=0, device="cpu")


@pytest.mark.data
def test_shared_cifar10_subset(shared_cifar10: Path) -> None:
    cfg = DataCfg(name="imagefolder", root=str(shared_cifar10), train_limit=300, test_limit=100, batch_size=64)
    bundle = build_data(cfg, seed=0, device="cpu")
    assert bundle.class_names[0] == "airplane" and bundle.class_names[-1] == "truck" and bundle.num_classes == 10
    train_images, train_labels = bundle.train_split.images, bundle.train_split.labels
    test_images = bundle.test_split.images
    assert train_images.shape == (300, 32, 32, 3) and test_images.shape == (100, 32, 32, 3)
    assert len(np.unique(train_labels)) == 10 and len(bundle.train) == 4
    images, labels = next(bundle.train.epoch_batches(0))
    assert images.shape == (64, 3, 32, 32) and labels.dtype == torch.int64
