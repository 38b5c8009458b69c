"""A run saved by mbn 0.3.1 (before the loop became mbn.train) resumes bit-identically, evaluates and initialises.

``tests/data/run_0_3_1`` is a 2-step AdvProp run (EMA on, CIFAR ResNet-8 width 4, synthetic data, seed 7) written by
0.3.1's ``mbn-train``: its ``config.yaml`` and ``checkpoints/last.pt`` as that version wrote them.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks.common import cpu_model
from mbn.cli.train import main as train_main
from mbn.eval.loading import load_run
from mbn.train.checkpoints import load_checkpoint, read_checkpoint
from tests.runs import REPO, train

OLD = Path(__file__).with_name("data") / "run_0_3_1"
SAME = ["trainer.seed=7", "ema.decay=0.9", "model.width=4", "logging.image_every=0", "logging.divergence_every=0"]
RECORDED_ON = ("2.14.1+cu130", "x86_64", "AMD EPYC")  # the torch build, machine and processor it was written on


def _copy(tmp_path: Path) -> Path:
    run = tmp_path / "old"
    shutil.copytree(OLD, run)
    return run


def test_a_0_3_1_checkpoint_passes_the_schema():
    for purpose in ("resume", "evaluate", "init"):
        ckpt = read_checkpoint(OLD / "checkpoints" / "last.pt", purpose)
    assert ckpt["state"]["step"] == 2 and ckpt["sources"] == ["clean", "adv"] and "ema" in ckpt


@pytest.mark.slow
def test_a_0_3_1_run_resumes_as_if_never_interrupted(tmp_path):
    run = _copy(tmp_path)
    assert train_main(["--resume", str(run), "trainer.max_steps=3"]) == 0
    assert train(REPO / "recipes" / "advprop.yaml", tmp_path / "new", "trainer.max_steps=3", *SAME) == 0
    resumed, fresh = (load_checkpoint(r / "checkpoints" / "last.pt") for r in (run, tmp_path / "new"))
    assert resumed["state"]["step"] == fresh["state"]["step"] == 3
    exact = (torch.__version__, platform.machine(), cpu_model()) == RECORDED_ON
    for entry in ("model", "ema"):
        for key, value in fresh[entry].items():
            if exact:
                assert torch.equal(resumed[entry][key], value), f"{entry}/{key}"
            else:  # another torch build or processor orders float sums differently
                torch.testing.assert_close(resumed[entry][key], value, rtol=1e-4, atol=1e-5)


def test_a_0_3_1_run_evaluates_and_initialises_a_new_one(tmp_path):
    run = _copy(tmp_path)
    loaded = load_run(run)
    assert loaded.sources == ("clean", "adv") and loaded.stats.num_classes == 10
    init = ["trainer.max_steps=1", "model.width=4", f"model.init_from={run}"]
    assert train("vanilla.yaml", tmp_path / "fine", *init) == 0
    fine = load_checkpoint(tmp_path / "fine" / "checkpoints" / "last.pt")
    assert fine["state"]["step"] == 1
