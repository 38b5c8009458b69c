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


def tensorboard_runs(tb: Path) -> dict[str, object]:
    """Every sub-run under a run's ``tb/`` (``""``: the root) as a loaded ``EventAccumulator``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {}
    for path in [tb, *sorted(p for p in tb.iterdir() if p.is_dir())]:
        if not list(path.glob("events.out.tfevents*")):
            continue
        acc = EventAccumulator(str(path), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
        acc.Reload()
        runs["" if path == tb else path.name] = acc
    return runs


def tensorboard_scalars(tb: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard holds for a run, under its canonical tag (``loss/adv``), as ``(step, value)``."""
    from mbn.tblog import canonical_tag

    out: dict[str, list[tuple[int, float]]] = {}
    for run, acc in tensorboard_runs(tb).items():
        for tag in acc.Tags()["scalars"]:  # type: ignore[attr-defined]
            events = acc.Scalars(tag)  # type: ignore[attr-defined]
            out[canonical_tag(run, tag)] = [(e.step, e.value) for e in events]
    return out


def tensorboard_images(tb: Path) -> set[str]:
    """The canonical tags of every image TensorBoard holds for a run (``samples/adv``)."""
    from mbn.tblog import canonical_tag

    return {canonical_tag(run, tag) for run, acc in tensorboard_runs(tb).items() for tag in acc.Tags()["images"]}  # type: ignore[attr-defined]
