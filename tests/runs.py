"""Tiny training runs shared by the engine and reliability tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mbn.checkpoint import load_checkpoint
from mbn.cli.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
VANILLA = REPO / "recipes" / "vanilla.yaml"

# Tiny and fast: 64 synthetic images, batches of 16 -> 4 steps per epoch.
TINY = [
    "data.name=synthetic",
    "data.synthetic_train_size=64",
    "data.synthetic_test_size=32",
    "data.batch_size=16",
    "data.eval_batch_size=32",
    "data.num_workers=0",
    "model.name=cifar_resnet8",
    "model.width=8",
    "trainer.progress=none",
    "trainer.log_every=1",
    "logging.image_every=2",
    "logging.divergence_every=2",
]


def train(recipe: Path | str, out: Path, *extra: str) -> int:
    """``mbn-train RECIPE`` on the tiny setting into ``out``; returns the exit status."""
    return train_main([str(recipe), *TINY, f"trainer.out_dir={out}", *extra])


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The model state of a run's last checkpoint."""
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a failed command wrote on stderr (asserted: one line, no traceback)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err
