"""Deprecated location (mbn 0.3): the training loop is the package :mod:`mbn.train`.

``Trainer(cfg, run_dir, resume=...)`` keeps working here and builds through :func:`mbn.train.build_trainer`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from omegaconf import DictConfig

from mbn.train.build import build_trainer
from mbn.train.loop import Trainer as _Trainer
from mbn.train.runtime import step_seed
from mbn.train.state import TrainState

__all__ = ["TrainState", "Trainer", "step_seed"]


def Trainer(cfg: DictConfig, run_dir: Path | str, *, resume: bool = False) -> _Trainer:  # noqa: N802
    """``build_trainer(cfg, run_dir, resume=resume)``: the 0.3 constructor's signature (deprecated)."""
    warnings.warn(
        "mbn.engine.Trainer(cfg, run_dir) is deprecated: use mbn.train.build_trainer(cfg, run_dir)",
        DeprecationWarning,
        stacklevel=2,
    )
    return build_trainer(cfg, run_dir, resume=resume)
