"""Optimisers and schedules through timm's factories: today's updates kept, timm's added, exact resume, clear errors.

The runs of mbn 0.4's hand-written SGD/AdamW and cosine/step schedules are pinned bit for bit in
``tests/test_pinned_behaviour.py`` (``vanilla_cosine_past_warmup``, ``vanilla_step_milestone``,
``vanilla_adamw_cosine``, recorded before timm's factories replaced them); here the learning rates themselves.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from omegaconf import OmegaConf

from mbn.cli.train import main as train_main
from mbn.config import ScheduleCfg, load_recipe
from mbn.optim import StepSchedule, build_optimizer
from mbn.train.checkpoints import load_checkpoint
from tests.runs import VANILLA, one_line_error, train


def _mbn_04_factor(step: int, total: int, warmup: int, name: str, milestones, gamma, min_lr, base) -> float:
    """mbn 0.4's ``lr_factor`` as it was (the reference the timm-built schedule must reproduce)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if name == "cosine":
        floor = min_lr / base
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if name == "step":
        return gamma ** sum(progress >= m for m in milestones)
    return 1.0


def _schedule(**keys) -> object:
    return OmegaConf.structured(ScheduleCfg(**keys))


@pytest.mark.parametrize(
    ("name", "keys", "total", "per_epoch"),
    [
        ("cosine", {"warmup_epochs": 1.0}, 977, 39),
        ("cosine", {"warmup_epochs": 0.5, "min_lr": 1e-4}, 5000, 100),
        ("cosine", {}, 12345, 300),
        ("step", {"milestones": [0.3, 0.6, 0.9], "gamma": 0.2, "warmup_epochs": 2.0}, 1000, 10),
        ("step", {"milestones": [0.5, 0.75]}, 390, 39),
        ("constant", {"warmup_epochs": 1.0}, 200, 20),
    ],
)
def test_timm_schedules_give_mbn_04s_learning_rates(name, keys, total, per_epoch):
    """Every step's rate equals mbn 0.4's in float32 (what SGD's update uses), to 1e-12 (1e-15 near 0) in float64."""
    base = 0.256
    schedule = _schedule(name="multistep" if name == "step" else name, **keys)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=base, momentum=0.9)
    sched = StepSchedule(optimizer, schedule, total, per_epoch)
    warmup = round(schedule.warmup_epochs * per_epoch)
    got, want = [], []
    for step in range(total + 3):
        got.append(optimizer.param_groups[0]["lr"])
        want.append(base * _mbn_04_factor(step, total, warmup, name, keys.get("milestones", [0.5, 0.75]),
                                          keys.get("gamma", 0.1), keys.get("min_lr", 0.0), base))  # fmt: skip
        sched.step()
    got32, want32 = torch.tensor(got, dtype=torch.float32), torch.tensor(want, dtype=torch.float32)
    assert torch.equal(got32, want32), (got32 != want32).nonzero()[:5]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)  # fmt: skip
    if warmup:
        assert got[:warmup] == want[:warmup]  # mbn's own warm-up: the same arithmetic


def test_sgd_and_adamw_are_todays_torch_optimisers():
    cfg = load_recipe(VANILLA, ["optim.name=adamw", "optim.lr=0.002", "optim.betas=[0.8,0.99]"])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    adamw = build_optimizer(model, cfg.optim)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.8, 0.99)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.0, 5e-4]  # no decay on BN and biases
    sgd = build_optimizer(model, load_recipe(VANILLA).optim)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    plain = build_optimizer(model, load_recipe(VANILLA, ["optim.nesterov=false"]).optim)
    assert type(plain) is torch.optim.SGD and not plain.defaults["nesterov"]


def _lrs(run) -> list[float]:
    with open(run / "scalars.csv") as f:
        return [float(row["value"]) for row in csv.DictReader(f) if row["tag"] == "lr"]


RMSPROP = [
    "trainer.epochs=2",  # 4 steps per epoch
    "optim.name=rmsproptf",
    "optim.lr=0.01",
    "optim.weight_decay=1e-5",
    "optim.kwargs.eps=0.001",
    "schedule.name=step",
    "schedule.decay_epochs=0.5",  # every 2 steps
    "schedule.gamma=0.5",
    "schedule.warmup_epochs=0.25",
]


@pytest.mark.slow
def test_rmsproptf_with_exponential_decay_trains_and_resumes_bit_identically(tmp_path):
    assert train(VANILLA, tmp_path / "full", *RMSPROP) == 0
    assert train(VANILLA, tmp_path / "part", *RMSPROP, "trainer.max_steps=3") == 0
    assert train_main(["--resume", str(tmp_path / "part"), "trainer.max_steps=8"]) == 0
    full, resumed = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    assert full["state"]["step"] == resumed["state"]["step"] == 8
    torch.testing.assert_close(resumed["model"], full["model"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["optimizer"], full["optimizer"], rtol=0, atol=0)
    assert "square_avg" in next(iter(full["optimizer"]["state"].values()))  # timm's RMSpropTF trained
    # one warm-up step at 0.01 * 1/1, then timm's step schedule: 0.01 halved every 2 steps (logged: steps 1-7 of 0-7)
    expected = [0.01 * 0.5 ** ((s - 1) // 2) for s in range(1, 8)]
    lrs = _lrs(tmp_path / "full")
    assert lrs[:7] == pytest.approx(expected, rel=1e-12), lrs
    assert _lrs(tmp_path / "part")[:7] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.name=adamx"], "key 'optim.name': 'adamx' is not an optimiser timm names"),
        (["optim.name=rmsproptf", "optim.kwargs.epsilon=0.001"], "key 'optim.kwargs.epsilon': rmsproptf"),
        (["optim.kwargs.lr=0.5"], "key 'optim.kwargs.lr': set it as optim.lr"),
        (["schedule.kwargs.cycle=2"], "key 'schedule.kwargs.cycle': timm's schedules take no argument"),
        (["schedule.name=step"], "key 'schedule.decay_epochs'"),
        (["schedule.name=plateau"], "key 'schedule.name'"),
        (["model.name=timm.resnet18", "model.kwargs.drop_path=0.1"], "key 'model.kwargs.drop_path': timm.resnet18"),
        (["model.kwargs.drop_rate=0.1"], "key 'model.kwargs.drop_rate': cifar_resnet8 takes no keyword arguments"),
        (["model.name=timm.resnet18", "model.kwargs.drop_rate=-1"], "key 'model.kwargs.drop_rate': a probability"),
        (["model.name=timm.resnet18", "model.kwargs.in_chans=1"], "key 'model.kwargs.in_chans': set by mbn"),
        # values timm's schedule only trips over after the warm-up: the schedule is built when the recipe loads
        (["schedule.warmup_epochs=1", "schedule.kwargs.k_decay=abc"], "key 'schedule.kwargs': timm's 'cosine'"),
        (["schedule.name=poly", "schedule.kwargs.k_decay=-1"], "key 'schedule.kwargs': timm's 'poly' schedule refused"),
        (["schedule.kwargs.noise=abc"], "key 'schedule.kwargs': timm's 'cosine' schedule refused"),
        (["schedule.kwargs.cycle_limit=3"], "key 'schedule.kwargs.cycle_limit': mbn sets it"),
        (["schedule.name=step", "schedule.decay_epochs=1e-6"], "key 'schedule.decay_epochs': 1e-06 epochs is"),
        (["optim.name=adamw", "optim.kwargs.betas=[0.9]"], "key 'optim.kwargs.betas': adamw takes 2 betas"),
        (["optim.name=adan", "optim.betas=[0.8,0.9]"], "key 'optim.betas': adan takes other betas"),
        (["optim.name=adahessian"], "key 'optim.name': adahessian is a second-order optimiser"),
    ],
)
def test_unknown_optimiser_schedule_or_argument_is_one_line(overrides, expected, tmp_path, capsys):
    assert train(VANILLA, tmp_path / "run", *overrides) == 2
    err = one_line_error(capsys)
    assert expected in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_drop_path_and_drop_rate_reach_the_model():
    from timm.layers import DropPath

    from mbn.builders import build_model

    cfg = load_recipe(VANILLA, ["model.name=timm.resnet18", "model.kwargs.drop_path_rate=0.2",
                                "model.kwargs.drop_rate=0.3"])  # fmt: skip
    model = build_model(cfg, 10, [0.5] * 3, [0.25] * 3, ["clean"])
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rates and max(rates) == pytest.approx(0.2) and all(0 <= r <= 0.2 for r in rates)
    assert model.net.drop_rate == 0.3
    plain = build_model(load_recipe(VANILLA, ["model.name=timm.resnet18"]), 10, [0.5] * 3, [0.25] * 3, ["clean"])
    assert not [m for m in plain.modules() if isinstance(m, DropPath) and m.drop_prob > 0]


def test_a_saved_lambda_lr_state_resumes_at_its_step():
    """Checkpoints of mbn < 0.5 hold torch's LambdaLR state: its ``last_epoch`` is the step to go on from."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = StepSchedule(optimizer, _schedule(warmup_epochs=1.0), 100, 10)
    sched.load_state_dict({"last_epoch": 37, "base_lrs": [0.5], "_step_count": 38})
    assert sched.last_step == 37
    assert (
        optimizer.param_groups[0]["lr"]
        == sched.lr_at(37)[0]
        == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 27 / 90)))
    )
    with pytest.raises(ValueError, match="not a count of steps"):
        sched.load_state_dict({"step": -1})


def test_betas_left_at_the_default_keep_an_optimisers_own():
    model = torch.nn.Linear(3, 2)
    lion = build_optimizer(model, load_recipe(VANILLA, ["optim.name=lion", "optim.lr=1e-4"]).optim)
    assert lion.defaults["betas"] == (0.9, 0.99)  # Lion's own, not AdamW's 0.999
    set_lion = build_optimizer(model, load_recipe(VANILLA, ["optim.name=lion", "optim.betas=[0.8,0.9]"]).optim)
    assert set_lion.defaults["betas"] == (0.8, 0.9)
    adan = build_optimizer(model, load_recipe(VANILLA, ["optim.name=adan", "optim.kwargs.betas=[0.9,0.9,0.9]"]).optim)
    assert adan.defaults["betas"] == (0.9, 0.9, 0.9)


def test_timms_schedule_noise_is_applied_seeded():
    rates = []
    for noise in (None, [0.0, 1.0]):
        kwargs = {} if noise is None else {"noise": noise, "noise_seed": 3}
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = StepSchedule(optimizer, _schedule(kwargs=kwargs), 50, 10)
        rates.append([sched.lr_at(s)[0] for s in range(50)])
    plain, noisy = rates
    assert plain != noisy and all(abs(n - p) <= 0.67 * p + 1e-12 for n, p in zip(noisy, plain, strict=True))
    again = StepSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1),
                         _schedule(kwargs={"noise": [0.0, 1.0], "noise_seed": 3}), 50, 10)  # fmt: skip
    assert [again.lr_at(s)[0] for s in range(50)] == noisy  # a function of the step: resumes exactly


@pytest.mark.slow
def test_keep_best_k_may_change_on_resume(tmp_path):
    assert train(VANILLA, tmp_path / "run", "trainer.max_steps=4", "trainer.keep_best_k=2") == 0
    assert train_main(["--resume", str(tmp_path / "run"), "trainer.max_steps=8", "trainer.keep_best_k=1"]) == 0


def test_without_warmup_prefix_the_schedule_counts_from_step_zero():
    """EfficientNet's schedule (TF, timm's default): x0.97 every 2.4 epochs from step 0, the warm-up over its start."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.016)
    schedule = _schedule(name="step", decay_epochs=2.4, gamma=0.97, warmup_epochs=5.0, warmup_prefix=False)
    sched = StepSchedule(optimizer, schedule, 350 * 10, 10)
    assert sched.lr_at(0)[0] == pytest.approx(0.016 / 50) and sched.lr_at(49)[0] == pytest.approx(0.016)
    for step in (50, 99, 1000, 3499):
        assert sched.lr_at(step)[0] == pytest.approx(0.016 * 0.97 ** (step // 24), rel=1e-12)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.016)  # a fresh one: its rate is the base
    prefixed = StepSchedule(
        optimizer, _schedule(name="step", decay_epochs=2.4, gamma=0.97, warmup_epochs=5.0), 3500, 10
    )
    assert prefixed.lr_at(50)[0] == pytest.approx(0.016)  # mbn's default: the decay starts after the warm-up
