"""Rebuild a trained model from a run directory or a checkpoint file, for evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mbn.builders import build_model, resolve_device
from mbn.checkpoint import CheckpointError, load_checkpoint, load_model_state
from mbn.config import RecipeCfg, RecipeError
from mbn.data import DataBundle, build_data


@dataclass
class LoadedRun:
    """A trained model in eval mode with its recipe, data and location."""

    model: nn.Module
    cfg: DictConfig
    data: DataBundle
    sources: tuple[str, ...]
    checkpoint: Path
    run_dir: Path
    device: torch.device


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


def load_run(path: Path, device: str = "auto", overrides: list[str] | None = None) -> LoadedRun:
    """Load the model of a run (its ``last.pt``) or of a checkpoint file, with the recipe stored inside.

    Raises:
        CheckpointError: bad path, unreadable file, or a checkpoint from an incompatible model.
    """
    ckpt_path, run_dir = resolve_checkpoint(path)
    ckpt = load_checkpoint(ckpt_path)
    if "config" not in ckpt or "sources" not in ckpt:
        raise CheckpointError(f"{ckpt_path}: checkpoint has no recipe; was it written by mbn-train?")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RecipeCfg), ckpt["config"], OmegaConf.from_dotlist(overrides or []))
    except Exception as err:
        raise CheckpointError(f"{ckpt_path}: stored recipe does not fit this mbn version ({err})") from None
    assert isinstance(cfg, DictConfig)
    dev = resolve_device(device)
    try:
        data = build_data(cfg.data, seed=cfg.trainer.seed, device=dev)
    except (RecipeError, ValueError, FileNotFoundError) as err:
        raise RecipeError(f"{ckpt_path}: cannot load the run's test data: {err}") from None
    sources = tuple(ckpt["sources"])
    model = build_model(cfg, data.num_classes, data.mean, data.std, sources)
    try:
        load_model_state(model, ckpt["model"], ckpt_path)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(
            f"{ckpt_path}: checkpoint does not match the model ({str(err).splitlines()[-1].strip()})"
        ) from None
    model.to(dev).eval()
    return LoadedRun(model, cfg, data, sources, ckpt_path, run_dir, dev)
