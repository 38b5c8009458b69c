"""Atomic checkpoint files, loaded with ``torch.load(..., weights_only=True)``.

A checkpoint is written through :mod:`mbn.fileio` (temporary file, fsync, ``os.replace``), so an interrupted
save never leaves a truncated ``last.pt``. Loading checks what it reads and reports every problem (an empty
or foreign file, a model of another shape, a missing entry) as one :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from mbn.errors import first_line


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or from an incompatible model."""


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain containers only).

    Raises:
        CheckpointError: missing or unreadable file, with the path in the message.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        with path.open("rb") as f:
            head = f.read(4)
        if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch.save's zip nor a legacy pickle
            raise CheckpointError(f"{path}: not a readable checkpoint (not a file torch.save wrote)") from None
        if "GLOBAL" not in str(err) and "allowed global" not in str(err):  # a damaged pickle, not a refused object
            raise CheckpointError(f"{path}: not a readable checkpoint (damaged: {_unpickler_reason(err)})") from None
        raise CheckpointError(
            f"{path}: holds objects other than tensors and plain containers; mbn loads checkpoints with "
            f"weights_only=True and runs no code from a file ({first_line(err).split('. ')[0]})"
        ) from None
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(err)})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not an mbn checkpoint (no 'model' entry)")
    return ckpt


def _unpickler_reason(err: Exception) -> str:
    """The reason in torch's weights_only error (``Unsupported operand 254``), without its advice paragraph."""
    text = str(err)
    _, found, reason = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in reason.splitlines() if line.strip()] if found else []
    return lines[0] if lines else first_line(err)


def load_model_state(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """``load_state_dict`` with a one-line error when the checkpoint belongs to another model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        detail = (missing or unexpected)[:3]
        kind = "missing" if missing else "unexpected"
        raise CheckpointError(f"{path}: checkpoint does not match the model ({kind} keys, e.g. {detail})")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.shape != own[key].shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise CheckpointError(
                f"{path}: checkpoint does not match the model ({key}: {got} in the checkpoint, "
                f"{tuple(own[key].shape)} in the model; another width or architecture?)"
            )
    model.load_state_dict(state)


def require_entries(ckpt: dict[str, Any], keys: tuple[str, ...], path: Path, what: str) -> None:
    """Every entry of ``keys`` is in the checkpoint, else a one-line error saying which are missing."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not {what} (missing {', '.join(repr(k) for k in missing)})")


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
