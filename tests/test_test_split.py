"""``data.test_split``: an ImageFolder tree evaluates on ``<root>/<test_split>`` (``val``), streamed or preloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from mbn.cli.train import main as train_main
from mbn.config import DataCfg, RecipeError
from mbn.data import build_data, load_test_split
from mbn.eval.loading import load_run
from mbn.plan import check_dataset_present
from tests.runs import TINY, VANILLA, one_line_error


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MBN_CACHE_DIR", str(tmp_path / "cache"))


def make_tree(root: Path, splits: dict[str, int]) -> Path:
    """``<root>/<split>/<class>/*.png``, ``splits[split]`` images a class; only val images have values of 200 up."""
    rng = np.random.default_rng(0)
    for split, per_class in splits.items():
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                array = rng.integers(200 if split == "val" else 0, 256 if split == "val" else 100, (32, 32, 3))
                array = array.astype(np.uint8)
                Image.fromarray(array).save(root / split / c / f"{i}.png")
    return root


def data_cfg(root: Path, **overrides):
    base = {"name": "imagefolder", "root": str(root), "batch_size": 4, "eval_batch_size": 5, "num_workers": 0}
    return OmegaConf.merge(OmegaConf.structured(DataCfg), {**base, **overrides})


@pytest.mark.parametrize("preload", [True, False])
def test_val_is_the_evaluation_set(tmp_path, preload):
    root = make_tree(tmp_path / "tree", {"train": 4, "val": 3})
    cfg = data_cfg(root, test_split="val", preload=preload)
    bundle = build_data(cfg, seed=0, device="cpu")
    images = np.concatenate([b[0].numpy() for b in bundle.test])
    assert len(images) == 6 and (images >= 200).all()  # the val images, none of train's
    assert bundle.class_names == ["cat", "dog"]
    split = load_test_split(cfg, bundle.stats)  # what mbn-eval reads
    assert len(split.labels) == 6 and (split.images >= 200).all()
    check_dataset_present(cfg)


def test_preloaded_cache_keys_name_the_split(tmp_path):
    root = make_tree(tmp_path / "tree", {"train": 4, "val": 3, "test": 2})
    build_data(data_cfg(root, test_split="val"), seed=0, device="cpu")
    build_data(data_cfg(root), seed=0, device="cpu")
    names = sorted(p.name.split("-")[1] for p in (tmp_path / "cache").glob("*.npy"))
    assert names == ["test", "train", "val"]  # one decoded train set, and each evaluation folder its own


@pytest.mark.parametrize("preload", [True, False])
def test_a_missing_split_is_one_line_naming_it(tmp_path, preload):
    root = make_tree(tmp_path / "tree", {"train": 4, "test": 2})
    cfg = data_cfg(root, test_split="val", preload=preload)
    with pytest.raises(RecipeError, match=rf"key 'data.test_split': .*; {root}/val is not a directory$") as err:
        build_data(cfg, seed=0, device="cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match=rf"key 'data.test_split': imagefolder evaluates on {root}/val/"):
        check_dataset_present(cfg)


@pytest.mark.parametrize("split", ["", "/abs/val", "../val", "."])
def test_a_split_outside_the_root_is_refused(tmp_path, split):
    root = make_tree(tmp_path / "tree", {"train": 4, "test": 2})
    with pytest.raises(RecipeError, match=r"key 'data\.test_split'"):
        build_data(data_cfg(root, test_split=split), seed=0, device="cpu")


@pytest.mark.slow
def test_train_and_evaluate_on_val(tmp_path, capsys):
    root = make_tree(tmp_path / "tree", {"train": 8, "val": 3})
    settings = [s for s in TINY if not s.startswith("data.synthetic") and s != "data.name=synthetic"]
    run = tmp_path / "run"
    args = [str(VANILLA), *settings, "data.name=imagefolder", f"data.root={root}", "data.test_split=val",
            "data.batch_size=4", "data.eval_batch_size=4", "trainer.epochs=1", f"trainer.out_dir={run}"]  # fmt: skip
    assert train_main([*args, "data.preload=false"]) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4
    assert load_run(run, "cpu").test.images.shape[0] == 6  # mbn-eval reads val, from the stored recipe
    assert train_main([*args, "data.test_split=valid", f"trainer.out_dir={tmp_path / 'other'}"]) == 2
    assert f"{root}/valid" in one_line_error(capsys)
