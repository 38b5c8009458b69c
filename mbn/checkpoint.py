"""Deprecated location (mbn 0.3): checkpoints are owned by :mod:`mbn.train.checkpoints`."""

from mbn.train.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_model_state,
    require_entries,
    resolve_checkpoint,
)

__all__ = ["CheckpointError", "load_checkpoint", "load_model_state", "require_entries", "resolve_checkpoint"]
