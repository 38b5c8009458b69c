"""Optional experiment trackers (Weights & Biases, MLflow) chosen by the recipe's ``logging`` section.

``logging.wandb.enabled`` and ``logging.mlflow.enabled`` add a :class:`~mbn.wandblog.WandbLogger` and an
:class:`~mbn.mlflowlog.MlflowLogger` to the run's outputs (rank 0 only): they get the same scalars, images,
recipe and final metrics as TensorBoard and ``scalars.csv``. Neither package is imported before a tracker starts
its run, so ``import mbn`` never needs them; :func:`check_trackers` refuses a recipe that enables one that is not
installed, in one line, before anything is written.

A tracker's run id is kept in ``RUN_DIR/trackers.json`` (``{"wandb": {"id": ...}, "mlflow": {"run_id": ...,
"tracking_uri_sha256": ...}}``) when its run starts, so ``mbn-train --resume`` continues the same W&B and MLflow runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mbn.config import RecipeError
from mbn.extras import require
from mbn.logger import RunLogger

#: ``logging.wandb.mode`` values (W&B's own).
WANDB_MODES = ("online", "offline", "disabled")


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
    """Whether the recipe asks for W&B logging.

    ``mode=disabled`` asks for none (W&B itself would log nothing), nor does no mode with ``WANDB_MODE=disabled``.
    """
    mode = logging.wandb.mode or os.environ.get("WANDB_MODE")
    return bool(logging.wandb.enabled) and mode != "disabled"


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
