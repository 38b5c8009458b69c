"""What the W&B and MLflow trackers share: their run ids in ``RUN_DIR/trackers.json``, names, metrics, images."""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mbn.fileio import atomic_write_text

#: Where the run ids of a run's trackers are kept (see :func:`read_tracker_ids`).
TRACKERS_FILE = "trackers.json"
#: Prefix of the final metrics (``metrics.json``'s numeric leaves) in the trackers.
FINAL = "final"


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
def uri_digest(uri: str) -> str:
    """SHA-256 of a tracking URI: what ``trackers.json`` keeps to tell the same store again.

    A URI may hold a password or token, which must not be written to the run directory.
    """
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()


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
