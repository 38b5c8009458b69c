"""The small owners of mbn/train on their own: run length, the update ledger, domain windows, blame after a failure."""

from __future__ import annotations

import pytest

import mbn
from mbn.config import load_recipe
from mbn.gradnorm import SHARED
from mbn.train import build_trainer
from mbn.train.state import RunLength, TrainState
from mbn.train.step import UpdateLedger
from tests.runs import REPO, TINY, train


def test_run_length_says_when_epochs_steps_and_evaluations_end():
    length = RunLength(epochs=3, steps_per_epoch=4, accum_steps=2, max_steps=10, eval_every=2)
    assert (length.batches_per_epoch, length.total_steps, length.planned_steps) == (8, 12, 10)
    state = TrainState(step=9, epoch=2, batch=7)
    assert not length.done(state) and not length.epoch_done(state)
    state.step, state.batch = 10, 8
    assert length.done(state) and length.epoch_done(state)
    assert [length.eval_due(TrainState(epoch=e)) for e in (1, 2, 3)] == [False, True, True]  # every 2nd, and the last
    assert RunLength(epochs=3, steps_per_epoch=4).planned_steps == 12  # no max_steps


def test_the_ledger_counts_samples_per_parameter_owner():
    ledger = UpdateLedger()
    ledger.count(8.0, "clean")
    ledger.count(2.0, "adv", "rotation")
    ledger.count(1.0, "adv")
    assert ledger.counts == {SHARED: 11.0, ("bn", "clean"): 8.0, ("bn", "adv"): 3.0, ("head", "rotation"): 2.0}
    assert UpdateLedger().counts == {SHARED: 0.0} and not UpdateLedger().reused  # one fresh ledger per step


def test_a_domain_outside_its_window_runs_only_to_feed_another(tmp_path):
    extra = ["domains.adv.end=0.5", "domains.rot.type=rotation", "domains.rot.input=adv", "domains.rot.bn=clean"]
    cfg = load_recipe(REPO / "recipes" / "advprop.yaml", [*TINY, *extra])
    with build_trainer(cfg, tmp_path / "run") as trainer:
        step, total = trainer.step, trainer.length.total_steps
        early, late = step.position(0, 0), step.position(total - 1, 0)
        assert step.needed(early) == {"clean", "adv", "rot"} and step.needed(late) == {"clean", "adv", "rot"}
        assert [s.name for s in step.specs if step.active(s, late)] == ["clean", "rot"]  # adv only feeds rot
        assert step.position(3, 0, micro=1).draw == 3 * trainer.length.accum_steps + 1


def test_a_later_batch_that_breaks_the_contract_is_named_when_the_forward_fails(tmp_path, capsys, scratch_registry):
    @mbn.register_domain("bad_later_test")
    class BadLater(mbn.Domain):
        def generate(self, images, labels, ctx):
            return (images if ctx.step == 0 else images[:, :, :, :-1]), labels  # a narrower batch from step 1 on

    code = train(REPO / "recipes" / "vanilla.yaml", tmp_path / "run", "domains.bad.type=bad_later_test",
                 "domains.bad.bn=clean", "trainer.max_steps=3")  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "domain 'bad'" in err[0] and "generate() returned" in err[0], err


@pytest.mark.parametrize("micro", [0, 1])
def test_positions_of_micro_batches_draw_apart(tmp_path, micro):
    cfg = load_recipe(REPO / "recipes" / "vanilla.yaml", [*TINY, "optim.grad_accum_steps=2"])
    with build_trainer(cfg, tmp_path / "run") as trainer:
        at = trainer.step.position(5, 1, micro)
        assert (at.step, at.epoch, at.draw) == (5, 1, 10 + micro) and at.fraction == 5 / trainer.length.total_steps
