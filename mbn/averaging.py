"""Average the weights of a run's kept best checkpoints into one checkpoint (``mbn-avg-checkpoints``).

As timm's ``avg_checkpoints.py``: the checkpoints ``trainer.keep_best_k`` kept under ``RUN/best/`` (ranked in its
``ledger.json``) are read with ``weights_only=True``, and every floating tensor of the model is averaged in float64,
then cast back to its dtype. Integer buffers (BatchNorm's ``num_batches_tracked``) are taken from the newest
checkpoint (the highest step, so the largest count), not averaged. The weight average (``ema``) is averaged the
same way when every checkpoint has one, and left out otherwise. The result keeps the newest checkpoint's recipe,
BN sources, heads and data statistics, and leaves out the optimiser, schedule and session state: ``mbn-eval`` and
``mbn-export`` read it; it is not a checkpoint to resume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mbn.train.checkpoints import KEPT_DIR, CheckpointError, KeptEntry, read_checkpoint, read_ledger

#: Entries of a training checkpoint that an averaged one leaves out (it is evaluated and exported, not resumed).
_TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "meter", "clock", "last_window", "train_time", "wall_time")


class AverageError(ValueError):
    """The checkpoints cannot be averaged (none kept, too few, different models); the message says why."""


@dataclass(frozen=True)
class Averaged:
    """An averaged checkpoint and what went into it."""

    checkpoint: dict[str, Any]
    entries: list[KeptEntry]  # best first
    metric: str | None  # the tag the entries were ranked by
    ema: bool  # whether the weight average was averaged too (else left out)


def kept_entries(run_dir: Path, k: int | None = None) -> tuple[str | None, list[KeptEntry]]:
    """The ``k`` best kept checkpoints of ``run_dir`` (all with ``None``), best first, and their ranking's tag.

    Raises:
        AverageError: none kept, or fewer than ``k``.
        CheckpointError: an unreadable ledger.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AverageError(f"{run_dir}: no such run directory")
    metric, entries = read_ledger(run_dir / KEPT_DIR)
    if not entries:
        raise AverageError(
            f"{run_dir}: no kept checkpoints (no {run_dir / KEPT_DIR / 'ledger.json'}); train with "
            "trainer.keep_best_k=K to keep the K best"
        )
    if k is not None and k < 1:
        raise AverageError(f"--k: expected 1 or more, got {k}")
    if k is not None and k > len(entries):
        raise AverageError(f"{run_dir}: --k {k} but only {len(entries)} checkpoints are kept in {run_dir / KEPT_DIR}")
    return metric, entries[:k] if k is not None else entries


def average_states(states: Sequence[Mapping[str, Tensor]], names: Sequence[str], newest: int) -> dict[str, Tensor]:
    """The mean of ``states`` (state dicts of one model), key by key.

    Floating tensors are averaged in float64 and cast back to their dtype; other tensors (integer buffers such as
    ``num_batches_tracked``) are ``states[newest]``'s.

    Raises:
        AverageError: the state dicts differ in keys, shapes or dtypes (checkpoints of different models).
    """
    first = states[0]
    for state, name in zip(states[1:], names[1:], strict=True):
        if set(state) != set(first):
            key = sorted(set(state) ^ set(first))[0]
            raise AverageError(f"{names[0]} and {name}: checkpoints of different models ({key!r} in one only)")
        for key, tensor in first.items():
            other = state[key]
            if other.shape != tensor.shape or other.dtype != tensor.dtype:
                raise AverageError(
                    f"{names[0]} and {name}: checkpoints of different models ({key}: {tuple(tensor.shape)} "
                    f"{tensor.dtype} and {tuple(other.shape)} {other.dtype})"
                )
    out: dict[str, Tensor] = {}
    for key, tensor in first.items():
        if tensor.is_floating_point() or tensor.is_complex():
            wide = torch.complex128 if tensor.is_complex() else torch.float64
            total = torch.zeros(tensor.shape, dtype=wide)
            for state in states:
                total += state[key].detach().to("cpu", wide)
            out[key] = (total / len(states)).to(tensor.dtype)
        else:
            out[key] = states[newest][key].detach().cpu().clone()
    return out


def average_kept(run_dir: Path, k: int | None = None) -> Averaged:
    """Average the ``k`` best checkpoints ``run_dir`` kept (all with ``None``).

    Raises:
        AverageError: none kept, fewer than ``k``, checkpoints of different models or BN sources.
        CheckpointError: a kept checkpoint is missing or unreadable.
    """
    run_dir = Path(run_dir)
    metric, entries = kept_entries(run_dir, k)
    paths = [run_dir / KEPT_DIR / e.file for e in entries]
    ckpts: list[dict[str, Any]] = [dict(read_checkpoint(path, "evaluate")) for path in paths]
    names = [str(p) for p in paths]
    newest = max(range(len(entries)), key=lambda i: entries[i].step)
    for ckpt, name in zip(ckpts, names, strict=True):
        if list(ckpt["sources"]) != list(ckpts[0]["sources"]):
            raise AverageError(
                f"{names[0]} and {name}: checkpoints of different models (BN sources {list(ckpts[0]['sources'])} "
                f"and {list(ckpt['sources'])})"
            )
    out = {key: value for key, value in ckpts[newest].items() if key not in _TRAINING_ONLY}
    out["model"] = average_states([c["model"] for c in ckpts], names, newest)
    with_ema = all(isinstance(c.get("ema"), dict) for c in ckpts)
    if with_ema:
        out["ema"] = average_states([c["ema"] for c in ckpts], names, newest)
    else:
        out.pop("ema", None)
    state = dict(out.get("state") or {})
    # the averaged weights were never evaluated during training: no test accuracy is carried over
    state.update(test_acc={}, test_acc_ema={}, best_acc=-1.0, evaluated_step=-1)
    out["state"] = state
    out["averaged"] = {
        "steps": [e.step for e in entries],
        "metric": metric,
        "metrics": [e.metric for e in entries],
        "ema": with_ema,
        "integer_buffers": "newest",
    }
    return Averaged(out, entries, metric, with_ema)


__all__ = ["AverageError", "Averaged", "CheckpointError", "average_kept", "average_states", "kept_entries"]
