"""The training step never waits on the host: no ``.item()``/``float()``/``.cpu()``/``.tolist()`` in a non-logging step.

Every host read of a tensor made by the step's own code (engine, meter, domains, attacks, heads, routing) is
counted per step; only the first step (the one-off check of each domain's output) and logging steps may read.
The data pipeline (``mbn/data/``) runs on the host by design and is not counted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mbn.train import build_trainer
from mbn.train.step import MultiDomainStep
from tests.runs import REPO, TINY

STEP_CODE = (str(REPO / "mbn"), str(REPO / "domains"))
NOT_STEP_CODE = (str(REPO / "mbn" / "data") + "/", str(REPO / "mbn" / "eval"), str(REPO / "mbn" / "tblog.py"))
READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    """``(step, what, where)`` of every host read of a tensor by step code."""
    reads: list[tuple[int, str, str]] = []
    step = [-1]

    def counting(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(STEP_CODE) and not caller.startswith(NOT_STEP_CODE):
                reads.append((step[0], name, f"{Path(caller).name}:{sys._getframe(1).f_lineno}"))
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    real_run = MultiDomainStep.run

    def run(self, batch, at, ledger, **kwargs):
        step[0] = at.step
        return real_run(self, batch, at, ledger, **kwargs)

    monkeypatch.setattr(MultiDomainStep, "run", run)
    return reads


@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        ("vanilla", []),
        ("advprop", []),
        ("advprop_ssl", []),
        ("advprop", ["ema.decay=0.9", "optim.grad_accum_steps=2"]),
        ("mixup_cutmix", []),
    ],
    ids=["vanilla", "advprop", "advprop_ssl", "advprop-ema-accumulation", "mixup_cutmix"],
)
@pytest.mark.slow
def test_no_host_sync_outside_logging_steps(recipe, extra, tmp_path, host_reads):
    from mbn.config import load_recipe

    steps, log_every = 7, 4
    overrides = [*TINY, f"trainer.log_every={log_every}", f"trainer.max_steps={steps}", "logging.image_every=0",
                 "logging.divergence_every=0"]  # fmt: skip
    if recipe in ("advprop", "advprop_ssl"):
        overrides.append("domains.adv.steps=2")
    overrides += [*extra, "data.synthetic_train_size=256"] if extra else []  # 7 steps of 2 batches: one epoch
    cfg = load_recipe(REPO / "recipes" / f"{recipe}.yaml", overrides)
    build_trainer(cfg, tmp_path / "run").fit()
    logging_steps = {s - 1 for s in range(1, steps + 1) if s % log_every == 0 or s == steps}
    in_steps = [r for r in host_reads if 0 < r[0] < steps and r[0] not in logging_steps]
    assert not in_steps, in_steps
    assert any(r[0] in logging_steps for r in host_reads)  # the counter works: logging steps do read
