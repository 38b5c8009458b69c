"""Repeated augmentation (``data.aug_repeats``): k copies of every sample an epoch, spread over ranks, each its own
augmentation, a resume that continues exactly, and runs without it unchanged."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from mbn.budget import matched_epochs
from mbn.builders import build_domains
from mbn.cli.train import main as train_main
from mbn.config import DataCfg, domain_specs, load_recipe
from mbn.data import AugmentedArrayDataset, ResumableBatches, TrainLoader, build_data, sample_seeds
from mbn.data.arrays import ArraySplit
from mbn.data.loaders import DeviceTrainLoader, epoch_permutation
from mbn.data.transforms import base_transform
from tests.runs import VANILLA, one_line_error, train
from tests.test_distributed import REPO, SETTINGS, records, torchrun


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path / "cache"))


def rank_orders(n: int, batch: int, world: int, k: int, epoch: int = 0, seed: int = 5) -> list[tuple[list, list]]:
    """``(indices, copies)`` of every rank's batches of ``epoch``, flattened."""
    out = []
    for rank in range(world):
        sampler = ResumableBatches(n, batch, seed, rank=rank, world_size=world, repeats=k)
        copies = sampler.batch_copies()
        assert copies is not None
        out.append((sampler.batch_indices(epoch).flatten().tolist(), copies.flatten().tolist()))
    return out


@pytest.mark.parametrize(("n", "batch", "world", "k"), [(24, 4, 2, 2), (24, 4, 2, 3), (30, 5, 3, 3), (16, 4, 1, 4)])
def test_every_sample_k_times_an_epoch_across_ranks_each_copy_once(n, batch, world, k):
    orders = rank_orders(n, batch, world, k)
    assert len(ResumableBatches(n, batch, 5, world_size=world, repeats=k)) == n * k // (batch * world)
    pairs = [pair for indices, copies in orders for pair in zip(indices, copies, strict=True)]
    assert collections.Counter(i for i, _ in pairs) == {i: k for i in range(n)}
    assert sorted(pairs) == [(i, c) for i in range(n) for c in range(k)]  # copies 0..k-1 of every sample, once each
    if k <= world:  # the copies of a sample on k different ranks
        for i in range(n):
            assert sum(i in indices for indices, _ in orders) == k


def test_consecutive_copies_go_to_consecutive_ranks():
    (a, ca), (b, cb) = rank_orders(16, 4, 2, 2)
    assert a == b  # position 2j on rank 0, 2j + 1 on rank 1: one copy of each sample on each rank, in step
    assert set(ca) == {0} and set(cb) == {1}
    perm = epoch_permutation(16, 5, 0)
    assert a == perm.tolist()  # the epoch's permutation, as without repeats


def test_a_tail_that_does_not_divide_drops_positions_not_copies_of_kept_samples():
    orders = rank_orders(10, 4, 2, 3)  # 30 positions, 3 steps of 8: the last 6 positions dropped
    counts = collections.Counter(i for indices, _ in orders for i in indices)
    assert sum(counts.values()) == 24
    perm = epoch_permutation(10, 5, 0).tolist()
    assert [counts.get(i, 0) for i in perm] == [3] * 8 + [0, 0]  # whole samples at the tail of the order, 24 = 8 x 3


def test_off_is_the_order_of_before():
    for world in (1, 2):
        for rank in range(world):
            plain = ResumableBatches(64, 8, 3, rank=rank, world_size=world)
            for repeats in (0, 1):
                off = ResumableBatches(64, 8, 3, rank=rank, world_size=world, repeats=repeats)
                assert off.batch_copies() is None and len(off) == len(plain)
                assert torch.equal(off.batch_indices(2, 1), plain.batch_indices(2, 1))
            steps = epoch_permutation(64, 3, 2)[: len(plain) * 8 * world].view(-1, world, 8)
            assert torch.equal(plain.batch_indices(2), steps[:, rank])
    seeds = sample_seeds(7, 3, [0, 5, 9])
    assert np.array_equal(sample_seeds(7, 3, [0, 5, 9], [0, 0, 0]), seeds)  # copy 0 draws what no repeats draws


def test_every_copy_has_its_own_seed():
    indices = np.repeat(np.arange(1000), 4)
    copies = np.tile(np.arange(4), 1000)
    seeds = sample_seeds(0, 2, indices, copies)
    assert len(set(seeds.tolist())) == 4000


def _split(n: int = 16, size: int = 32) -> ArraySplit:
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ArraySplit(images, np.arange(n, dtype=np.int64))


def _array_loader(k: int, num_workers: int = 0) -> TrainLoader:
    split = _split()
    dataset = AugmentedArrayDataset(split, base_transform(32, 8, True), seed=1)
    return TrainLoader(dataset, 8, seed=1, num_workers=num_workers, repeats=k)


def _copies_differ(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The share of samples whose copies in the epoch are not all identical images."""
    seen: dict[int, list[torch.Tensor]] = collections.defaultdict(list)
    for images, labels in batches:
        for image, label in zip(images, labels.tolist(), strict=True):
            seen[label].append(image)
    assert all(len(v) == len(next(iter(seen.values()))) for v in seen.values())
    return float(np.mean([any(not torch.equal(v[0], w) for w in v[1:]) for v in seen.values()]))


def test_copies_get_different_augmentations_preloaded():
    loader = _array_loader(3)
    batches = list(loader.epoch_batches(0))
    assert len(batches) == 6  # 16 x 3 / 8
    assert _copies_differ(batches) == 1.0  # pad-8 crops and flips: 578 draws per copy, no sample drew one thrice
    copies = loader.batch_copies()
    assert copies is not None
    copy0 = {
        int(index): images[j]
        for (images, _), row, cs in zip(batches, loader.batch_indices(0), copies, strict=True)
        for j, (index, c) in enumerate(zip(row, cs, strict=True))
        if c == 0
    }
    assert len(copy0) == 16
    for images, labels in _array_loader(0).epoch_batches(0):  # copy 0 is what a run without repeats draws
        for image, label in zip(images, labels.tolist(), strict=True):
            assert torch.equal(copy0[label], image)


def test_copies_get_different_augmentations_on_device():
    loader = DeviceTrainLoader(_split(), 8, seed=1, device=torch.device("cpu"), crop_padding=8, hflip=True, repeats=2)
    assert len(loader) == 4
    assert _copies_differ(list(loader.epoch_batches(0))) > 0.9


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_remaining_batches(workers):
    loader = _array_loader(3, num_workers=workers)
    full = list(loader.epoch_batches(1))
    tail = list(loader.epoch_batches(1, start_batch=4))
    assert len(tail) == 2
    for (a, la), (b, lb) in zip(full[4:], tail, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_device_loader_resumes_exactly():
    loader = DeviceTrainLoader(_split(), 8, seed=1, device=torch.device("cpu"), crop_padding=4, hflip=True, repeats=2)
    full, tail = list(loader.epoch_batches(0)), list(loader.epoch_batches(0, start_batch=3))
    assert torch.equal(full[3][0], tail[0][0]) and torch.equal(full[3][1], tail[0][1])


def _tree(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_streamed_copies_differ_and_resume_exactly(tmp_path, decode):
    cfg = OmegaConf.merge(
        OmegaConf.structured(DataCfg),
        {"name": "imagefolder", "root": str(_tree(tmp_path / "tree")), "preload": False, "augment": "imagenet",
         "image_size": 24, "batch_size": 4, "num_workers": 0, "aug_repeats": 2, "decode": decode},
    )  # fmt: skip
    bundle = build_data(cfg, seed=3, device="cpu")
    assert len(bundle.train) == 4  # 8 images x 2 / 4
    full = list(bundle.train.epoch_batches(0))
    assert _copies_differ(full) == 1.0  # RandomResizedCrop: no two copies alike
    tail = list(bundle.train.epoch_batches(0, start_batch=2))
    for (a, la), (b, lb) in zip(full[2:], tail, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize("on_device", [False, True])
def test_the_bundle_counts_k_passes_an_epoch(on_device):
    cfg = DataCfg(name="synthetic", synthetic_train_size=64, synthetic_test_size=8, batch_size=16, num_workers=0)
    plain = build_data(cfg, seed=0, device="cpu")
    cfg.aug_repeats, cfg.on_device = 3, on_device
    repeated = build_data(cfg, seed=0, device="cpu")
    assert (len(plain.train), len(repeated.train)) == (4, 12)
    labels = collections.Counter(int(i) for row in repeated.train.batch_indices(0) for i in row)
    assert labels == {i: 3 for i in range(64)}


def test_budget_of_counts_the_k_passes():
    specs = domain_specs(load_recipe(REPO / "recipes" / "vanilla.yaml"))
    assert matched_epochs(30, specs, build_domains(specs), "vanilla", repeats=3) == 10
    assert matched_epochs(30, specs, build_domains(specs), "vanilla", repeats=0) == 30


@pytest.mark.slow
def test_two_gloo_ranks_train_every_sample_k_times_on_different_ranks(tmp_path):
    run = tmp_path / "run"
    args = [str(REPO / "recipes" / "vanilla.yaml"), *SETTINGS, "data.aug_repeats=2", "trainer.epochs=1"]
    proc = torchrun(*args, f"trainer.out_dir={run}", record=tmp_path / "rec")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r0, r1) = records(tmp_path / "rec")
    a, b = r0["indices"][0], r1["indices"][0]
    assert len(a) == len(b) == 64  # 64 images x 2 copies over 2 ranks
    assert collections.Counter(a + b) == {i: 2 for i in range(64)}
    assert sorted(a) == sorted(b) == list(range(64))  # one copy of every sample on each rank
    assert json.loads((run / "metrics.json").read_text())["steps"] == 8  # 128 positions / (8 x 2) a step


@pytest.mark.slow
def test_a_resume_cannot_change_the_repeats(tmp_path, capsys):
    assert train(VANILLA, tmp_path / "run", "trainer.epochs=1", "trainer.max_steps=2", "data.aug_repeats=2") == 0
    capsys.readouterr()
    assert train_main(["--resume", str(tmp_path / "run"), "data.aug_repeats=0"]) == 2
    assert "resume cannot change data.aug_repeats (2 -> 0)" in one_line_error(capsys)
