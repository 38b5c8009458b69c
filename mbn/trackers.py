"""Optional experiment trackers (Weights & Biases, MLflow) chosen by the recipe's ``logging`` section.

``logging.wandb.enabled`` and ``logging.mlflow.enabled`` add a :class:`~mbn.wandblog.WandbLogger` and an
:class:`~mbn.mlflowlog.MlflowLogger` to the run's outputs (rank 0 only): they get the same scalars, images,
recipe and final metrics as TensorBoard and ``scalars.csv``. Neither package is imported before a tracker starts
its run, so ``import mbn`` never needs them; :func:`check_trackers` refuses a recipe that enables one that is not
installed, in one line, before anything is written.

A tracker's run id is kept in ``RUN_DIR/trackers.json`` (``{"wandb": {"id": ...}, "mlflow": {"run_id": ...,
"tracking_uri": ...}}``) when its run starts, so ``mbn-train --resume`` continues the same W&B and MLflow runs.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mbn.config import RecipeError
from mbn.extras import require
from mbn.fileio import atomic_write_text
from mbn.logger import RunLogger

#: Where the run ids of a run's trackers are kept (see :func:`read_tracker_ids`).
TRACKERS_FILE = "trackers.json"
#: ``logging.wandb.mode`` values (W&B's own).
WANDB_MODES = ("online", "offline", "disabled")
#: Prefix of the final metrics (``metrics.json``'s numeric leaves) in the trackers.
FINAL = "final"


def check_trackers(logging: Any) -> None:
    """Refuse a ``logging`` section that enables a tracker whose package is not installed, or a bad W&B mode.

    Nothing is imported (the packages are looked up with :func:`importlib.util.find_spec`).

    Raises:
        RecipeError: one line naming the key, and the ``pip install`` command when a package is missing.
    """
    mode = logging.wandb.mode
    if mode is not None and mode not in WANDB_MODES:  # None: W&B's own choice (WANDB_MODE, else online)
        raise RecipeError(f"key 'logging.wandb.mode': expected one of {list(WANDB_MODES)}, got {mode!r}")
    if wandb_wanted(logging):
        require("wandb", "key 'logging.wandb.enabled': Weights & Biases logging", install="pip install wandb")
    if logging.mlflow.enabled:
        require("mlflow", "key 'logging.mlflow.enabled': MLflow logging", install="pip install mlflow")


def wandb_wanted(logging: Any) -> bool:
    """Whether the recipe asks for W&B logging (``mode=disabled`` asks for none: W&B itself would log nothing)."""
    return bool(logging.wandb.enabled) and logging.wandb.mode != "disabled"


def trackers(logging: Any, run_dir: Path) -> list[RunLogger]:
    """The trackers ``logging.wandb`` / ``logging.mlflow`` enable; nothing is imported or written yet.

    Raises:
        RecipeError: an enabled tracker's package is not installed (:func:`check_trackers`).
    """
    check_trackers(logging)
    out: list[RunLogger] = []
    if wandb_wanted(logging):
        from mbn.wandblog import WandbLogger

        out.append(WandbLogger(logging.wandb, Path(run_dir)))
    if logging.mlflow.enabled:
        from mbn.mlflowlog import MlflowLogger

        out.append(MlflowLogger(logging.mlflow, Path(run_dir)))
    return out


# ------------------------------------------------------------------------------------------- run ids
def read_tracker_ids(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``RUN_DIR/trackers.json``: ``{tracker: {what identifies its run}}``; empty when missing or unreadable."""
    try:
        data = json.loads((Path(run_dir) / TRACKERS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): dict(v) for k, v in data.items() if isinstance(v, dict)}


def write_tracker_ids(run_dir: Path, tracker: str, ids: Mapping[str, Any]) -> None:
    """Record ``ids`` as ``tracker``'s entry of ``RUN_DIR/trackers.json`` (written atomically; others kept)."""
    data = read_tracker_ids(run_dir)
    data[tracker] = dict(ids)
    atomic_write_text(Path(run_dir) / TRACKERS_FILE, json.dumps(data, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------- shared helpers
def run_name(name: str | None, run_dir: Path) -> str:
    """The tracker's run name: ``name``, else the run directory's name."""
    return str(name) if name else Path(run_dir).resolve().name


def final_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric leaves of ``metrics.json`` as ``{"final/test_acc/clean": value}`` (booleans and text left out)."""
    out: dict[str, float] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, Mapping):
            for name, value in node.items():
                walk(value, f"{key}/{name}")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out[key] = float(node)

    walk(metrics, FINAL)
    return out


def image_array(image: Tensor) -> np.ndarray:
    """A float ``(3, H, W)`` image in [0, 1] as the ``(H, W, 3)`` uint8 array trackers take."""
    pixels = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


_NOT_IN_NAME = re.compile(r"[^\w.\- /]")


def path_name(tag: str) -> str:
    """``tag`` as a name MLflow accepts (metric, parameter, artifact path): other characters become ``_``.

    MLflow allows letters, digits, ``_ - . /`` and spaces, and refuses a name that a path would normalise into
    another one (``a//b``, ``./a``, ``..``); such parts become ``_``. At most 250 characters.
    """
    parts = [_NOT_IN_NAME.sub("_", part) for part in tag.split("/")]
    parts = [part if part.strip(".") and part.strip() else "_" for part in parts]
    name = "/".join(parts)[:250]
    return name if posixpath.normpath(name) == name else name.replace("/", "_")
