"""Training features beside the domains: weight EMA, gradient accumulation, weight-decay groups."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import mbn
from mbn.checkpoint import load_checkpoint
from mbn.cli.train import main as train_main
from mbn.config import load_recipe
from mbn.ema import WeightEma
from mbn.optim import param_groups
from mbn.train import Trainer, build_trainer
from tests.nets import bn_free_classifier
from tests.runs import TINY, train

REPO = Path(__file__).resolve().parents[1]
ADVPROP = REPO / "recipes" / "advprop.yaml"
QUICK = REPO / "recipes" / "quickstart.yaml"
VANILLA = REPO / "recipes" / "vanilla.yaml"


def _hand_ema(start: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]], decay: float):
    ema = {k: v.clone() for k, v in start.items()}
    for state in states:
        for k, v in state.items():
            ema[k] = decay * ema[k] + (1 - decay) * v if v.is_floating_point() else v.clone()
    return ema


# ------------------------------------------------------------------------------------------------ EMA
def test_ema_equals_hand_computed_average_on_a_tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    ema = WeightEma(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    states = []
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()  # moves weights and BN statistics
        opt.step()
        ema.update(model)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    expected = _hand_ema(start, states, 0.9)
    got = ema.module.state_dict()
    assert got["1.num_batches_tracked"].item() == 5
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(got["0.weight"], model.state_dict()["0.weight"])  # an average, not a copy
    assert all(not p.requires_grad for p in ema.module.parameters())


def test_ema_averages_a_tensor_shared_by_several_sources_once():
    torch.manual_seed(0)
    model = mbn.convert_model(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), ["clean", "adv"], share_affine=True)
    ema = WeightEma(model, decay=0.5)
    start = model[1].bns["clean"].weight.detach().clone()
    with torch.no_grad():
        model[1].bns["clean"].weight.add_(1.0)  # shared: also adv's weight
    ema.update(model)
    averaged = ema.module[1].bns["clean"].weight
    torch.testing.assert_close(averaged, start + 0.5)  # once: start + 0.5 * 1, not 0.75
    assert ema.module[1].bns["adv"].weight is averaged


def _trainer(tmp_path: Path, *extra: str, recipe: Path = ADVPROP) -> Trainer:
    cfg = load_recipe(recipe, [*TINY, f"trainer.out_dir={tmp_path / 'run'}", *extra])
    return build_trainer(cfg, tmp_path / "run")


def test_ema_in_training_equals_hand_average_of_each_steps_weights(tmp_path):
    trainer = _trainer(tmp_path, "ema.decay=0.8", "trainer.max_steps=3")
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    states = []
    apply = trainer.update.apply

    def recording_apply(ledger, step) -> None:
        apply(ledger, step)
        states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})

    trainer.update.apply = recording_apply  # type: ignore[method-assign]
    metrics = trainer.fit()
    assert len(states) == 3
    torch.testing.assert_close(
        trainer.update.ema.module.state_dict(), _hand_ema(start, states, 0.8), rtol=1e-5, atol=1e-6
    )
    assert set(metrics["test_acc_ema"]) == {"clean"} and 0 <= metrics["test_acc_ema"]["clean"] <= 1


@pytest.mark.slow
def test_ema_survives_resume_bit_identically_and_is_reported(tmp_path):
    from tests.runs import tensorboard_scalars

    assert train(ADVPROP, tmp_path / "full", "ema.decay=0.9", "trainer.max_steps=6") == 0
    assert train(ADVPROP, tmp_path / "part", "ema.decay=0.9", "trainer.max_steps=3") == 0
    assert train_main(["--resume", str(tmp_path / "part"), "trainer.max_steps=6"]) == 0
    full, resumed = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    torch.testing.assert_close(resumed["ema"], full["ema"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["model"], full["model"], rtol=0, atol=0)
    assert not torch.equal(full["ema"]["net.fc.weight"], full["model"]["net.fc.weight"])
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["test_acc_ema"]["clean"] == full["state"]["test_acc_ema"]["clean"]
    assert "acc_test_ema/clean" in tensorboard_scalars(tmp_path / "full" / "tb")


def test_ema_off_by_default_changes_nothing(tmp_path):
    assert train(QUICK, tmp_path / "run", "trainer.max_steps=2") == 0
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert "ema" not in ckpt
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test_acc_ema"] is None


@pytest.mark.parametrize("bad", ["ema.decay=1.0", "ema.decay=-0.1"])
def test_exception_ema_decay_out_of_range(bad, tmp_path, capsys):
    assert train(QUICK, tmp_path / "run", bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ema.decay" in err[0]


def test_exception_resume_cannot_turn_ema_on(tmp_path, capsys):
    assert train(QUICK, tmp_path / "run", "trainer.max_steps=1") == 0
    assert train_main(["--resume", str(tmp_path / "run"), "ema.decay=0.9"]) == 2
    assert "ema.decay" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- accumulation
@pytest.fixture
def bn_free_model(monkeypatch):
    monkeypatch.setattr("mbn.builders.create_model", bn_free_classifier)


@pytest.mark.parametrize("normalization", ["domain_mean", "sample_mean"])
def test_accumulating_k_micro_batches_equals_one_batch_k_times_larger(bn_free_model, tmp_path, normalization):
    common = ["trainer.max_steps=2", f"optim.grad_normalization={normalization}", "optim.weight_decay=0.01"]
    big = _trainer(tmp_path / "big", *common, "data.batch_size=32", recipe=VANILLA)
    small = _trainer(tmp_path / "small", *common, "data.batch_size=8", "optim.grad_accum_steps=4", recipe=VANILLA)
    assert big.length.steps_per_epoch == small.length.steps_per_epoch == 2
    big.fit()
    small.fit()
    assert small.state.step == big.state.step == 2 and small.state.epoch == 1
    with _trainer(tmp_path / "fresh", *common, "data.batch_size=32", recipe=VANILLA) as fresh:
        before = fresh.model.state_dict()
    after = small.model.state_dict()
    assert not torch.allclose(before["net.fc.weight"], after["net.fc.weight"])  # it trained
    torch.testing.assert_close(after, big.model.state_dict(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_accumulation_resumes_bit_identically_and_drops_the_incomplete_group(tmp_path):
    extra = ["optim.grad_accum_steps=3"]  # 4 batches per epoch: one step of 3, the 4th batch dropped
    assert train(ADVPROP, tmp_path / "full", *extra, "trainer.max_steps=3") == 0
    assert train(ADVPROP, tmp_path / "part", *extra, "trainer.max_steps=2") == 0
    assert train_main(["--resume", str(tmp_path / "part"), "trainer.max_steps=3"]) == 0
    full, resumed = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    assert full["state"]["step"] == 3 and full["state"]["epoch"] == 3 and full["state"]["batch"] == 0
    torch.testing.assert_close(resumed["model"], full["model"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["optimizer"]["state"], full["optimizer"]["state"], rtol=0, atol=0)


def test_exception_accumulation_longer_than_an_epoch(tmp_path, capsys):
    assert train(QUICK, tmp_path / "run", "optim.grad_accum_steps=5") == 2  # 4 batches per epoch
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optim.grad_accum_steps" in err[0]


# ----------------------------------------------------------------------------------- weight decay
def test_no_weight_decay_on_bn_and_biases_by_default(tmp_path):
    trainer = _trainer(tmp_path, recipe=ADVPROP)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    groups = trainer.update.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, trainer.cfg.optim.weight_decay]
    undecayed = {names[id(p)] for p in groups[0]["params"]}
    decayed = {names[id(p)] for p in groups[1]["params"]}
    assert any(".bns.adv.weight" in n for n in undecayed) and "net.fc.bias" in undecayed
    assert all(".bns." not in n and not n.endswith(".bias") for n in decayed)
    assert "net.fc.weight" in decayed and len(undecayed) + len(decayed) == len(names)
    trainer.close()


def test_decay_norm_and_bias_true_decays_every_parameter():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optim = OmegaConf.create({"decay_norm_and_bias": True, "weight_decay": 0.1})
    assert [len(g["params"]) for g in param_groups(model, optim)] == [4]
    optim.decay_norm_and_bias = False
    assert [len(g["params"]) for g in param_groups(model, optim)] == [3, 1]


@pytest.mark.slow
def test_a_run_saved_before_the_key_resumes_decaying_every_parameter(tmp_path):
    run = tmp_path / "run"
    assert train(QUICK, run, "trainer.max_steps=1", "optim.decay_norm_and_bias=true") == 0
    for path in (run / "config.yaml",):  # as mbn < 0.3 wrote it: no such key
        text = path.read_text().replace("  decay_norm_and_bias: true\n", "")
        assert "decay_norm_and_bias" not in text
        path.write_text(text)
    ckpt_path = run / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(ckpt_path)
    del ckpt["config"]["optim"]["decay_norm_and_bias"]
    torch.save(ckpt, ckpt_path)
    assert train_main(["--resume", str(run), "trainer.max_steps=2"]) == 0
    resumed = load_checkpoint(ckpt_path)
    assert len(resumed["optimizer"]["param_groups"]) == 1
    assert resumed["config"]["optim"]["decay_norm_and_bias"] is True


@pytest.mark.slow
def test_mbn_eval_scores_the_weight_average(tmp_path, capsys):
    from mbn.cli.eval import main as eval_main

    run = tmp_path / "run"
    assert train(QUICK, run, "ema.decay=0.5", "trainer.max_steps=2") == 0
    assert eval_main([str(run), "--weights", "ema", "--clean"]) == 0
    report = json.loads((run / "ema" / "eval.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert report["weights"] == "ema"
    assert report["clean_acc"] == pytest.approx(metrics["test_acc_ema"]["clean"])
    assert not (run / "eval.json").exists()  # the trained weights' report is another file

    plain = tmp_path / "plain"
    assert train(QUICK, plain, "trainer.max_steps=1") == 0
    capsys.readouterr()
    assert eval_main([str(plain), "--weights", "ema"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ema.decay" in err[0]


# ------------------------------------------------------------------------------------------- CSV log
@pytest.mark.slow
def test_csv_log_holds_every_logged_scalar_once_across_a_resume(tmp_path):
    from mbn.csvlog import read_scalars
    from tests.runs import tensorboard_scalars

    assert train(ADVPROP, tmp_path / "full", "trainer.max_steps=6", "ema.decay=0.9") == 0
    assert train(ADVPROP, tmp_path / "part", "trainer.max_steps=3", "ema.decay=0.9") == 0
    with (tmp_path / "part" / "scalars.csv").open("a") as f:
        f.write("4,loss/clean,9.0\n5,loss/cl")  # logged after the checkpoint, then killed mid-line
    assert train_main(["--resume", str(tmp_path / "part"), "trainer.max_steps=6"]) == 0
    full, part = (read_scalars(tmp_path / r / "scalars.csv") for r in ("full", "part"))

    def training(rows):  # throughput is wall-clock; the stopped run also evaluated at its stop
        return [r for r in rows if r[1].startswith(("loss/", "acc/", "lr"))]

    assert training(part) == training(full)
    assert [r[0] for r in part if r[1] == "loss/clean"] == list(range(1, 7))  # once each, the killed rows gone
    assert {r for r in full if r[1].startswith("acc_test")} <= set(part)
    events = tensorboard_scalars(tmp_path / "full" / "tb")  # under the canonical tags: the CSV's
    tags = {tag for _, tag, _ in full}
    assert tags == set(events)
    assert {"loss/total", "lr", "acc_test/clean", "acc_test_ema/clean"} <= tags
    for step, tag, value in full:
        if not tag.startswith("throughput"):
            logged = dict(events[tag])
            assert logged[step] == pytest.approx(value, rel=1e-6), tag  # TensorBoard keeps float32


@pytest.mark.slow
def test_a_resume_after_a_crash_leaves_each_step_once_in_tensorboard_and_the_csv(tmp_path):
    """Steps logged after the last checkpoint are trained and logged again: TensorBoard purges the old ones."""
    import shutil

    from mbn.csvlog import read_scalars
    from tests.runs import tensorboard_runs, tensorboard_scalars

    run = tmp_path / "run"
    assert train(ADVPROP, run, "trainer.max_steps=2") == 0
    ckpt = run / "checkpoints" / "last.pt"
    shutil.copy(ckpt, tmp_path / "step2.pt")
    assert train_main(["--resume", str(run), "trainer.max_steps=4"]) == 0
    shutil.copy(tmp_path / "step2.pt", ckpt)  # as if killed before the checkpoint at step 4 was written
    assert train_main(["--resume", str(run), "trainer.max_steps=5"]) == 0
    events = tensorboard_scalars(run / "tb")  # every sub-run purged from step 3 on
    for tag in ("loss/clean", "acc/adv", "lr"):
        assert [step for step, _ in events[tag]] == [1, 2, 3, 4, 5], tag
    csv_rows = {(step, tag) for step, tag, _ in read_scalars(run / "scalars.csv")}
    tb_rows = {(step, tag) for tag, logged in events.items() for step, _ in logged}
    assert csv_rows == tb_rows
    assert len(tensorboard_runs(run / "tb")[""].Tensors("recipe/text_summary")) == 1  # once, not once per session
