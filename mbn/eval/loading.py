"""Rebuild a trained model from a run directory or a checkpoint file, for evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mbn.builders import build_model, resolve_device
from mbn.config import RecipeCfg, RecipeError
from mbn.data import ArraySplit, DataStats, load_arrays, load_test_split
from mbn.errors import one_line
from mbn.imports import import_user_modules
from mbn.train.checkpoints import CheckpointError, load_model_state, read_checkpoint, resolve_checkpoint
from mbn.written_recipe import resolve_stored


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


@dataclass
class StoredRun:
    """A checkpoint mbn-train wrote, its recipe (this version's schema filled in) and its data statistics."""

    ckpt: dict[str, Any]
    cfg: DictConfig
    stats: DataStats | None  # None: written before checkpoints held class names and normalisation
    sources: tuple[str, ...]
    checkpoint: Path
    run_dir: Path


def read_stored_run(path: Path, overrides: list[str] | None = None) -> StoredRun:
    """Read a run directory's ``last.pt`` or a checkpoint file, and import the modules its recipe names.

    Raises:
        CheckpointError: bad path, unreadable file, or a recipe this version cannot read.
    """
    ckpt_path, run_dir = resolve_checkpoint(Path(path))
    ckpt = read_checkpoint(ckpt_path, "evaluate")
    try:
        cfg = OmegaConf.merge(
            OmegaConf.structured(RecipeCfg), resolve_stored(ckpt["config"]), OmegaConf.from_dotlist(overrides or [])
        )
        stats = DataStats.from_dict(ckpt["data"]) if isinstance(ckpt.get("data"), dict) else None
    except Exception as err:
        raise CheckpointError(f"{ckpt_path}: stored recipe does not fit this mbn version ({one_line(err)})") from None
    assert isinstance(cfg, DictConfig)
    import_user_modules(cfg.imports)  # the modules the run was trained with (the recipe's imports key)
    return StoredRun(dict(ckpt), cfg, stats, tuple(str(s) for s in ckpt["sources"]), ckpt_path, run_dir)


def trained_model(stored: StoredRun, stats: DataStats, weights: str = "model") -> nn.Module:
    """The run's model (converted, with its heads) holding its ``model`` or ``ema`` weights, on the CPU.

    Built with ``model.pretrained=false``: the weights come from the checkpoint, so nothing is downloaded.

    Raises:
        RecipeError: the stored model section cannot be built.
        CheckpointError: weights that do not fit the model.
    """
    build_cfg = OmegaConf.merge(stored.cfg, {"model": {"pretrained": False}})
    assert isinstance(build_cfg, DictConfig)
    heads = stored.ckpt.get("heads")
    model = build_model(build_cfg, stats.num_classes, stats.mean, stats.std, stored.sources, heads=heads)
    try:
        load_model_state(model, stored.ckpt["ema" if weights == "ema" else "model"], stored.checkpoint)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(
            f"{stored.checkpoint}: checkpoint does not match the model ({str(err).splitlines()[-1].strip()})"
        ) from None
    return model


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
            or a relative root resolved from another working directory); for a webdataset run, the evaluation
            shards' brace pattern instead of ``data.test_root``.
        weights: ``model`` (the trained weights) or ``ema`` (their moving average, runs with ``ema.decay > 0``).

    Raises:
        CheckpointError: bad path, unreadable file, or a checkpoint from an incompatible model.
        RecipeError: the run's test data cannot be loaded.
    """
    stored = read_stored_run(path, overrides)
    cfg, stats, ckpt_path = stored.cfg, stored.stats, stored.checkpoint
    if data_root is not None:
        if cfg.data.name == "webdataset":  # what is evaluated: the test shards' pattern
            cfg.data.test_root = str(data_root)
        else:
            cfg.data.root = str(data_root)
    dev = resolve_device(device, "--device")
    try:
        if stats is not None:
            test = load_test_split(cfg.data, stats)
        else:
            _, test, stats = load_arrays(cfg.data)
    except (RecipeError, ValueError, FileNotFoundError) as err:
        raise RecipeError(f"{ckpt_path}: cannot load the run's test data: {one_line(err)}") from None
    if weights == "ema" and not isinstance(stored.ckpt.get("ema"), dict):
        raise CheckpointError(f"{ckpt_path}: holds no weight average (trained with ema.decay=0); use --weights model")
    model = trained_model(stored, stats, weights)
    model.to(dev).eval()
    return LoadedRun(model, cfg, stats, test, stored.sources, ckpt_path, stored.run_dir, dev)


def load_timm_run(
    path: Path,
    recipe: Path,
    device: str = "auto",
    sources: Sequence[str] | None = None,
    weights: str = "model",
    data_root: str | Path | None = None,
) -> LoadedRun:
    """A checkpoint of timm's ``train.py`` (one BN source per ``--split-bn`` split), on a recipe's test data.

    The architecture is the checkpoint's (``arch``, else the recipe's ``model.name``); the normalisation is the
    recipe's ``data.mean``/``data.std`` when set, else what timm trained with (its ``--mean``/``--std``, else the
    architecture's pretrained config). Reports go to ``eval-<checkpoint name>/`` beside the checkpoint.

    Args:
        path: the timm checkpoint (``model_best.pth.tar``, ``last.pth.tar``, ...).
        recipe: an mbn recipe whose ``data`` section names the test set (its classes in the checkpoint's order).
        device: ``auto``, ``cpu`` or a CUDA device.
        sources: one name per split (default ``clean``, ``aug1``, ...).
        weights: ``model`` or ``ema`` (timm's ``state_dict_ema``).
        data_root: the dataset there instead of the recipe's ``data.root``.

    Raises:
        CheckpointError: unreadable checkpoint, or one that does not fit the model and data.
        RecipeError: a bad recipe, or test data that cannot be loaded.
    """
    from mbn.config import load_recipe
    from mbn.convert import load_split_bn, read_timm_checkpoint
    from mbn.models import ModelConfigError, create_model

    path = Path(path)
    try:
        ckpt = read_timm_checkpoint(path, ema=weights == "ema")
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    overrides = [f"model.name=timm.{ckpt.arch}", "model.pretrained=false"] if ckpt.arch else ["model.pretrained=false"]
    if data_root is not None:
        overrides.append(f"data.root={data_root}")
    cfg = load_recipe(recipe, overrides)
    try:
        _, test, stats = load_arrays(cfg.data)
    except (RecipeError, ValueError, FileNotFoundError) as err:
        raise RecipeError(f"{recipe}: cannot load the test data: {one_line(err)}") from None
    try:
        mean, std = _timm_normalisation(cfg, ckpt.args, stats)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: timm's args.mean / args.std: expected numbers ({err})") from None
    stats = DataStats(stats.class_names, mean, std, stats.image_size)
    try:
        model = create_model(cfg.model, stats.num_classes, stats.mean, stats.std)
        load_split_bn(model, {f"net.{k}": v for k, v in ckpt.state.items()}, sources)
    except ModelConfigError as err:
        raise RecipeError(f"key 'model.{err.field}': {err}") from None
    except (ValueError, RuntimeError) as err:  # names, keys or shapes (another class count)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise CheckpointError(f"{path}: does not fit {cfg.model.name} on the recipe's data ({lines[-1]})") from None
    from mbn.routing import model_sources

    dev = resolve_device(device, "--device")
    model.to(dev).eval()
    return LoadedRun(model, cfg, stats, test, model_sources(model), path, timm_report_dir(path), dev)


def timm_report_dir(checkpoint: Path) -> Path:
    """Where mbn-eval reports a timm checkpoint: ``<its folder>/eval-<name>/``, one folder per checkpoint."""
    name = checkpoint.name
    for suffix in (".pth.tar", ".safetensors", ".pth", ".pt", ".bin", ".tar"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return checkpoint.parent / f"eval-{name}"


def _timm_normalisation(cfg: DictConfig, args: dict, stats: DataStats) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if cfg.data.mean is not None and cfg.data.std is not None:
        return tuple(cfg.data.mean), tuple(cfg.data.std)
    if args.get("mean") is not None and args.get("std") is not None:
        return tuple(float(v) for v in args["mean"]), tuple(float(v) for v in args["std"])
    if str(cfg.model.name).startswith("timm."):
        from timm.models import get_pretrained_cfg

        pretrained = get_pretrained_cfg(str(cfg.model.name).removeprefix("timm."))
        if pretrained is not None:
            return tuple(float(v) for v in pretrained.mean), tuple(float(v) for v in pretrained.std)
    return stats.mean, stats.std
