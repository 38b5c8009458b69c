"""The checkpoint schema and ``best.pt``: what each use of a checkpoint requires, and which weights are "best"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mbn.config import load_recipe
from mbn.train import build_trainer
from mbn.train.checkpoints import CheckpointError, validate
from tests.runs import REPO, TINY


def _ckpt() -> dict:
    return {"model": {}, "optimizer": {}, "scheduler": {}, "scaler": {}, "state": {}, "config": {}, "sources": ["a"]}


def test_each_use_requires_its_entries_and_names_the_missing_one():
    validate(_ckpt(), Path("x.pt"), "resume")
    with pytest.raises(CheckpointError, match=r"x\.pt: not a training checkpoint to resume \(missing 'optimizer'\)"):
        validate({k: v for k, v in _ckpt().items() if k != "optimizer"}, Path("x.pt"), "resume")
    evaluation = {"model": {}, "config": {}}  # slimmed for release: no optimiser, no state
    with pytest.raises(CheckpointError, match=r"not a checkpoint written by mbn-train \(missing 'sources'\)"):
        validate(evaluation, Path("x.pt"), "evaluate")
    validate({**evaluation, "sources": ["a"], "optimizer": None}, Path("x.pt"), "evaluate")


def test_a_malformed_entry_is_named_and_an_optional_none_is_absent():
    with pytest.raises(CheckpointError, match=r"its 'sources' entry is not a list or tuple"):
        validate({**_ckpt(), "sources": "ab"}, Path("x.pt"), "resume")
    with pytest.raises(CheckpointError, match=r"its 'ema' entry is not a dict"):
        validate({**_ckpt(), "ema": 3}, Path("x.pt"), "resume")
    validate({**_ckpt(), "ema": None, "data": None}, Path("x.pt"), "resume")  # a run saved without them


def test_best_pt_holds_only_weights_that_were_evaluated(tmp_path):
    """A mid-epoch or stop checkpoint after an evaluation does not overwrite best.pt with unevaluated weights."""
    cfg = load_recipe(REPO / "recipes" / "vanilla.yaml", [*TINY, f"trainer.out_dir={tmp_path / 'run'}"])
    with build_trainer(cfg, tmp_path / "run") as trainer:
        state, best = trainer.state, trainer.ckpt_dir / "best.pt"
        state.test_acc, state.best_acc, state.evaluated_step, state.step = {"clean": 0.5}, 0.5, 3, 5
        trainer.save_checkpoint()
        assert (trainer.ckpt_dir / "last.pt").is_file() and not best.exists()
        state.evaluated_step = 5
        trainer.save_checkpoint()
        assert torch.load(best, weights_only=True)["state"]["step"] == 5
