"""Atomic checkpoint files, loaded with ``torch.load(..., weights_only=True)``.

A checkpoint is written to a temporary file in the same directory, flushed to disk and moved over
the old one with ``os.replace``, so an interrupted save never leaves a truncated ``last.pt``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or from an incompatible model."""


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain containers only).

    Raises:
        CheckpointError: missing or unreadable file, with the path in the message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(err).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an mbn checkpoint (no 'model' entry)")
    return ckpt


def load_model_state(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """``load_state_dict`` with a one-line error when the checkpoint belongs to another model."""
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        detail = (result.missing_keys or result.unexpected_keys)[:3]
        kind = "missing" if result.missing_keys else "unexpected"
        raise CheckpointError(f"{path}: checkpoint does not match the model ({kind} keys, e.g. {detail})")
    # load_state_dict checks shapes itself and raises RuntimeError; strict=False already did both checks.


def resolve_checkpoint(path: Path) -> tuple[Path, Path]:
    """``(checkpoint file, run directory)`` for a run directory or a checkpoint path."""
    path = Path(path)
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.pt"
        if not ckpt.is_file():
            raise CheckpointError(f"{path}: not a run directory (expected {ckpt})")
        return ckpt, path
    if not path.is_file():
        raise CheckpointError(f"{path}: no such run directory or checkpoint file")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return path, run_dir
