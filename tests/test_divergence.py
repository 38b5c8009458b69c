"""A run that diverges keeps a last good checkpoint that is good, and a gentler resume rescues it."""

from __future__ import annotations

import pytest
import torch

from mbn.checkpoint import load_checkpoint
from mbn.cli.train import main as train_main
from mbn.config import load_recipe
from mbn.train import build_trainer
from tests.runs import TINY, VANILLA, one_line_error, train


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_an_update_that_overflows_from_a_finite_loss_is_not_checkpointed_and_a_gentler_resume_rescues_it(
    tmp_path, capsys
):
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.pt"
    # a loss weighted 1e30 with a learning rate of 1e-31 trains as weight 1 and rate 0.1 would
    scaled = ["domains.clean.weight=1e30", "optim.lr=1e-31", "trainer.checkpoint_every_steps=1", "ema.decay=0.9"]
    assert train(VANILLA, run, "trainer.max_steps=2", *scaled) == 0
    good = last.read_bytes()
    capsys.readouterr()
    # step 3's loss is finite (step 2's weights); its update, 1e10 x gradients of ~1e30, overflows float32
    assert train_main(["--resume", str(run), "optim.lr=1e10", "trainer.max_steps=4"]) == 1
    err = one_line_error(capsys)
    assert "non-finite weights after step 3 (model " in err, err
    assert "last good checkpoint (step 2) kept at" in err, err
    assert f"mbn-train --resume {run} optim.lr=1e+09 optim.grad_clip=1.0" in err, err
    assert last.read_bytes() == good  # nothing written over the last good checkpoint
    assert not (run / "checkpoints" / "best.pt").exists() or all_finite(
        load_checkpoint(run / "checkpoints" / "best.pt")["model"]
    )
    # the rescue: the learning rate and clipping may change on resume
    assert train_main(["--resume", str(run), "optim.lr=1e-32", "optim.grad_clip=1e30", "trainer.max_steps=4"]) == 0
    ckpt = load_checkpoint(last)
    assert ckpt["state"]["step"] == 4
    assert all_finite(ckpt["model"]) and all_finite(ckpt["ema"])
    assert ckpt["config"]["optim"]["lr"] == 1e-32 and ckpt["config"]["optim"]["grad_clip"] == 1e30


def test_weights_check_names_the_ema_and_optimiser_state(tmp_path):
    cfg = load_recipe(VANILLA, [*TINY, "trainer.max_steps=1", "ema.decay=0.9", "logging.image_every=0"])
    with build_trainer(cfg, tmp_path / "run") as trainer:
        trainer.fit()
        checkpoints = trainer.checkpoints
        checkpoints.check_finite_weights(1)  # a finite run passes
        ema = checkpoints.ema
        assert ema is not None
        next(iter(ema.module.parameters())).data.fill_(float("nan"))
        with pytest.raises(RuntimeError, match=r"non-finite weights after step 1 \(weight average \(ema\) "):
            checkpoints.check_finite_weights(1)
        next(iter(ema.module.parameters())).data.zero_()
        buf = next(v for s in trainer.update.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
        buf.fill_(float("inf"))
        with pytest.raises(RuntimeError, match=r"optimiser state momentum_buffer"):
            checkpoints.check_finite_weights(1)


@pytest.mark.parametrize("schedule", ["cosine", "multistep"])
def test_a_resume_with_another_learning_rate_takes_it_from_the_resumed_step(tmp_path, schedule):
    """The resumed run's rates are the schedule of the new base rate at the same position, from its first step."""
    common = [*TINY, "logging.image_every=0", "logging.divergence_every=0", f"schedule.name={schedule}"]
    common += ["trainer.epochs=2", "schedule.milestones=[0.25,0.75]"]
    common += ["schedule.min_lr=0.001"] if schedule == "cosine" else []
    run = tmp_path / "run"
    assert train_main([str(VANILLA), *common, f"trainer.out_dir={run}", "trainer.max_steps=3"]) == 0
    rates = {}
    for lr in (0.05, 0.1):  # reference: a run that had the new rate from the start
        cfg = load_recipe(VANILLA, [*common, f"optim.lr={lr}", "trainer.max_steps=3"])
        with build_trainer(cfg, tmp_path / f"ref{lr}") as ref:
            ref.fit()
            rates[lr] = ref.update.lr
    cfg = load_recipe(run / "config.yaml", ["optim.lr=0.05", "trainer.max_steps=5"], saved_run=True)
    with build_trainer(cfg, run, resume=True) as resumed:
        assert resumed.update.lr == pytest.approx(rates[0.05], rel=1e-12)
        assert rates[0.05] != pytest.approx(rates[0.1])
        resumed.fit()
    cfg = load_recipe(VANILLA, [*common, "optim.lr=0.05", "trainer.max_steps=5"])
    with build_trainer(cfg, tmp_path / "ref5") as ref:
        ref.fit()
        assert resumed.update.lr == pytest.approx(ref.update.lr, rel=1e-12)


def test_a_resume_that_changes_nothing_of_the_update_stays_bit_identical(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert train(VANILLA, ref, "trainer.max_steps=4") == 0
    assert train(VANILLA, run, "trainer.max_steps=2") == 0
    assert train_main(["--resume", str(run), "trainer.max_steps=4"]) == 0
    a, b = load_checkpoint(run / "checkpoints" / "last.pt"), load_checkpoint(ref / "checkpoints" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
