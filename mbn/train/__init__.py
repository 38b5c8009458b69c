"""The training loop as small owners: the loop owns *when*, the step owns *what*, the builder owns *which*.

- :mod:`mbn.train.build`: a recipe becomes a :class:`Trainer` (the only reader of the recipe here);
- :mod:`mbn.train.loop`: :class:`Trainer`, the loop (epochs, optimisation steps, when hooks and stops run);
- :mod:`mbn.train.step`: the multi-domain step (domains -> one forward routed per BN -> objectives -> backward);
- :mod:`mbn.train.update`: the weight update (normalisation, clipping, scaler, schedule, EMA);
- :mod:`mbn.train.hooks`: logging, evaluation, checkpoint cadence, ``metrics.json``;
- :mod:`mbn.train.checkpoints`: the checkpoint schema, its save and restore;
- :mod:`mbn.train.preemption`: stop signals; :mod:`mbn.train.runtime`: device, ranks, forward, seeding.

See docs/architecture.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mbn.train.build import build_trainer
    from mbn.train.loop import Trainer
    from mbn.train.state import TrainState

__all__ = ["TrainState", "Trainer", "build_trainer"]

_LAZY = {"Trainer": "mbn.train.loop", "TrainState": "mbn.train.state", "build_trainer": "mbn.train.build"}


def __getattr__(name: str) -> Any:
    """Imported on first use: :mod:`mbn.train.checkpoints` (read by mbn-eval) does not load the whole loop."""
    if name not in _LAZY:
        raise AttributeError(f"module 'mbn.train' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
