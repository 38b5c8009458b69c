"""Rebuild a trained model from a run directory or a checkpoint file, for evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mbn.builders import build_model, resolve_device
from mbn.config import RecipeCfg, RecipeError
from mbn.data import ArraySplit, DataStats, load_arrays, load_test_split
from mbn.errors import one_line
from mbn.imports import import_user_modules
from mbn.train.checkpoints import CheckpointError, load_model_state, read_checkpoint, resolve_checkpoint


@dataclass
class LoadedRun:
    """A trained model in eval mode with its recipe, data statistics, test split and location."""

    model: nn.Module
    cfg: DictConfig
    stats: DataStats
    test: ArraySplit
    sources: tuple[str, ...]
    checkpoint: Path
    run_dir: Path
    device: torch.device


def load_run(
    path: Path,
    device: str = "auto",
    overrides: list[str] | None = None,
    data_root: str | Path | None = None,
    weights: str = "model",
) -> LoadedRun:
    """Load the model of a run (its ``last.pt``) or of a checkpoint file, with the recipe stored inside.

    Only the test split is read: class names and normalisation come from the checkpoint (checkpoints
    written before mbn stored them fall back to loading the training data for its statistics).

    Args:
        path: run directory or checkpoint file.
        device: ``auto``, ``cpu`` or a CUDA device.
        overrides: dotlist overrides of the stored recipe, e.g. ``["data.test_limit=500"]``.
        data_root: evaluate on the dataset here instead of the recipe's ``data.root`` (a moved copy,
            or a relative root resolved from another working directory).
        weights: ``model`` (the trained weights) or ``ema`` (their moving average, runs with ``ema.decay > 0``).

    Raises:
        CheckpointError: bad path, unreadable file, or a checkpoint from an incompatible model.
        RecipeError: the run's test data cannot be loaded.
    """
    ckpt_path, run_dir = resolve_checkpoint(path)
    ckpt = read_checkpoint(ckpt_path, "evaluate")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RecipeCfg), ckpt["config"], OmegaConf.from_dotlist(overrides or []))
        if data_root is not None:
            cfg.data.root = str(data_root)
        stats = DataStats.from_dict(ckpt["data"]) if "data" in ckpt else None
    except Exception as err:
        raise CheckpointError(f"{ckpt_path}: stored recipe does not fit this mbn version ({err})") from None
    assert isinstance(cfg, DictConfig)
    import_user_modules(cfg.imports)  # the modules the run was trained with (the recipe's imports key)
    dev = resolve_device(device, "--device")
    try:
        if stats is not None:
            test = load_test_split(cfg.data, stats)
        else:
            _, test, stats = load_arrays(cfg.data)
    except (RecipeError, ValueError, FileNotFoundError) as err:
        raise RecipeError(f"{ckpt_path}: cannot load the run's test data: {one_line(err)}") from None
    sources = tuple(ckpt["sources"])
    model = build_model(cfg, stats.num_classes, stats.mean, stats.std, sources, heads=ckpt.get("heads"))
    if weights == "ema" and not isinstance(ckpt.get("ema"), dict):
        raise CheckpointError(f"{ckpt_path}: holds no weight average (trained with ema.decay=0); use --weights model")
    try:
        load_model_state(model, ckpt["ema" if weights == "ema" else "model"], ckpt_path)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(
            f"{ckpt_path}: checkpoint does not match the model ({str(err).splitlines()[-1].strip()})"
        ) from None
    model.to(dev).eval()
    return LoadedRun(model, cfg, stats, test, sources, ckpt_path, run_dir, dev)
