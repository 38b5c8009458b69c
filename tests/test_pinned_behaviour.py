"""Behaviour pinned bit for bit: a few fixed-seed steps of the shipped recipes give the recorded weights.

The values in ``pinned_weights.json`` were recorded from mbn 0.3.1's single-class engine, before the training loop
became the ``mbn.train`` package. On the same torch build, machine and processor the weights (and the weight
average) must hash the same, bit for bit; the file holds one record per torch build, machine and processor (the first
is 0.3.1's own; others were recorded from a version that matched it bit for bit where it was recorded). With no record
for this processor, per-tensor sums must agree closely. Record again only when a change of behaviour is intended
(it adds or replaces this processor's record): ``python -m tests.test_pinned_behaviour --record``.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.common import cpu_model
from mbn.checkpoint import load_checkpoint
from tests.runs import REPO, train

PINNED = Path(__file__).with_name("pinned_weights.json")

#: recipe name -> (recipe file, overrides). Each case exercises a feature the redesign must not change.
CASES: dict[str, tuple[str, list[str]]] = {
    "advprop_ema": ("advprop.yaml", ["ema.decay=0.9", "ema.warmup=false"]),
    "fast_advprop_accum": ("fast_advprop.yaml", ["optim.grad_accum_steps=2", "data.batch_size=8"]),
    "advprop_ssl": ("advprop_ssl.yaml", []),
    "advprop_autoaug_smoothing": ("advprop_autoaug.yaml", ["optim.label_smoothing=0.1"]),
    "mixup_cutmix_sample_mean": ("mixup_cutmix.yaml", ["optim.grad_normalization=sample_mean"]),
    "advtrain_ssl_attack_clip": ("advtrain_ssl_attack.yaml", ["optim.grad_clip=1.0", "schedule.name=multistep"]),
    # Recorded from mbn 0.4.0's hand-written optimiser and schedule (e72e830), before timm's factories replaced
    # them: warm-up then cosine with a floor, a milestone, AdamW (8 steps in all, the schedule moves every step).
    "vanilla_cosine_past_warmup": (
        "vanilla.yaml",
        ["trainer.epochs=2", "schedule.warmup_epochs=0.25", "schedule.min_lr=0.001"],
    ),
    "vanilla_step_milestone": (
        "vanilla.yaml",
        ["trainer.epochs=2", "schedule.name=multistep", "schedule.milestones=[0.2,0.9]"],
    ),
    "vanilla_adamw_cosine": (
        "vanilla.yaml",
        ["trainer.epochs=2", "optim.name=adamw", "optim.lr=0.002", "schedule.warmup_epochs=0.25"],
    ),
}
STEPS = 3


def _digest(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, float]]:
    """A hash of every tensor's bytes (in key order), and each floating tensor's float64 sum."""
    h = hashlib.sha256()
    sums = {}
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        if t.is_floating_point():
            sums[key] = float(t.double().sum())
    return h.hexdigest(), sums


def _run(name: str, out: Path) -> dict[str, tuple[str, dict[str, float]]]:
    recipe, extra = CASES[name]
    rc = train(REPO / "recipes" / recipe, out, f"trainer.max_steps={STEPS}", "trainer.seed=7", *extra)
    assert rc == 0, f"{name}: mbn-train exited {rc}"
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["state"]["step"] == STEPS
    result = {"model": _digest(ckpt["model"])}
    if "ema" in ckpt:
        result["ema"] = _digest(ckpt["ema"])
    return result


def _environment() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": cpu_model(),  # another processor takes other kernels (AVX2 / AVX-512): other rounding
        "python": platform.python_version()[:4],
    }


def _record_for(environment: dict[str, str]) -> dict | None:
    """The pinned record taken on this torch build, machine and processor, if there is one."""
    keys = ("torch", "machine", "cpu")
    for record in json.loads(PINNED.read_text())["records"]:
        if all(record["environment"].get(k) == environment[k] for k in keys):
            return record
    return None


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_recipes_train_to_the_pinned_weights(name: str, tmp_path: Path) -> None:
    record = _record_for(_environment())
    if record is not None and name not in record["cases"]:
        record = None  # a case recorded later, on another processor: compare its sums only
    first = next(r for r in json.loads(PINNED.read_text())["records"] if name in r["cases"])  # the oldest record
    expected = (record or first)["cases"][name]
    got = _run(name, tmp_path / name)
    assert sorted(got) == sorted(expected), f"{name}: entries {sorted(got)} != pinned {sorted(expected)}"
    for entry, (digest, sums) in got.items():
        want_digest, want_sums = expected[entry]
        assert sorted(sums) == sorted(want_sums), f"{name}/{entry}: state-dict keys changed"
        if record is not None:  # the promise: bit for bit on the same torch, machine and processor
            assert digest == want_digest, f"{name}/{entry}: weights differ from the pinned run"
        else:  # another build or processor rounds differently, and sign-gradient attacks amplify it: close only
            torch.testing.assert_close(
                torch.tensor([sums[k] for k in sorted(sums)], dtype=torch.float64),
                torch.tensor([want_sums[k] for k in sorted(sums)], dtype=torch.float64),
                rtol=0.05,
                atol=0.1,
            )


def _record() -> None:
    """Add (or replace) the record of this torch build, machine and processor; the others are kept."""
    import tempfile

    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(CASES):
            cases[name] = _run(name, Path(tmp) / name)
            print(name, {k: v[0][:12] for k, v in cases[name].items()}, flush=True)
    environment = _environment()
    mine = _record_for(environment)
    records = [r for r in json.loads(PINNED.read_text())["records"] if r != mine]
    records.append({"environment": environment, "cases": cases})
    PINNED.write_text(json.dumps({"records": records}, indent=1) + "\n")


if __name__ == "__main__":
    if "--record" not in sys.argv:
        raise SystemExit("usage: python -m tests.test_pinned_behaviour --record")
    _record()
