"""Read what to export from a run or checkpoint: the plain network of one BN source, its labels and preprocessing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from mbn.errors import one_line
from mbn.export.preprocessing import Preprocessing

#: ``--weights`` values: the trained weights (``model`` is mbn-eval's name for them) or their moving average.
WEIGHTS = ("trained", "model", "ema")


class ExportError(ValueError):
    """An export cannot be done as asked; the message (one line) names the input and what was expected."""


@dataclass
class TrainedNetwork:
    """One BN source of a trained run as a plain network (no normalisation inside), in eval mode on the CPU."""

    net: nn.Module
    model_name: str  # the recipe's model.name: cifar_resnet20, timm.<name>, torchvision.<name>
    width: int
    class_names: tuple[str, ...]
    preprocessing: Preprocessing
    source: str
    sources: tuple[str, ...]
    weights: str  # trained | ema
    checkpoint: Path
    run_dir: Path
    cfg: DictConfig
    state: dict[str, Any] = field(default_factory=dict)  # the checkpoint's training position and accuracies

    @property
    def num_classes(self) -> int:
        """Number of output logits."""
        return len(self.class_names)

    @property
    def library(self) -> str:
        """``timm`` (timm models and mbn's CIFAR ResNets, registered with timm) or ``torchvision``."""
        return "torchvision" if self.model_name.startswith("torchvision.") else "timm"


def read_trained(path: Path, source: str | None = None, weights: str = "trained") -> TrainedNetwork:
    """The network of a run directory (its ``last.pt``) or a checkpoint, through ``source``'s BN.

    Args:
        path: run directory or checkpoint file written by mbn-train.
        source: the BN source to keep (default: the main one); the auxiliary BNs and heads are dropped.
        weights: ``trained`` (or ``model``) or ``ema`` (the weight average of runs with ``ema.decay > 0``).

    Raises:
        ExportError: bad path or checkpoint, an unknown source, EMA asked of a run without it.
    """
    from mbn.config import RecipeError
    from mbn.convert import export_model
    from mbn.eval.loading import read_stored_run, trained_model
    from mbn.models import ImageClassifier
    from mbn.train.checkpoints import CheckpointError

    if weights not in WEIGHTS:
        raise ExportError(f"--weights: expected one of {', '.join(WEIGHTS)}, got {weights!r}")
    weights = "ema" if weights == "ema" else "trained"
    try:
        stored = read_stored_run(Path(path))
    except (CheckpointError, RecipeError) as err:
        raise ExportError(str(err)) from None
    cfg, stats, ckpt_path, sources = stored.cfg, stored.stats, stored.checkpoint, stored.sources
    chosen = sources[0] if source is None else source
    if chosen not in sources:
        raise ExportError(f"--source: the run has no BN named {chosen!r}; its BNs: {', '.join(sources)}")
    if weights == "ema" and not isinstance(stored.ckpt.get("ema"), dict):
        raise ExportError(f"{ckpt_path}: holds no weight average (trained with ema.decay=0); use --weights trained")
    if stats is None:  # written before checkpoints held class names and normalisation: the training data has them
        from mbn.data import load_arrays

        try:
            _, _, stats = load_arrays(cfg.data)
        except (RecipeError, ValueError, FileNotFoundError) as err:
            raise ExportError(
                f"{ckpt_path}: predates stored class names and normalisation, and the run's data cannot be loaded "
                f"to recover them ({one_line(err)})"
            ) from None
    try:
        model = trained_model(stored, stats, "ema" if weights == "ema" else "model")
    except (RecipeError, CheckpointError) as err:
        raise ExportError(str(err)) from None
    plain = export_model(model.eval(), chosen)
    assert isinstance(plain, ImageClassifier)
    return TrainedNetwork(
        net=plain.net.eval(),
        model_name=str(cfg.model.name),
        width=int(cfg.model.width),
        class_names=stats.class_names,
        preprocessing=Preprocessing.of_run(cfg.data, stats.mean, stats.std, stats.image_size),
        source=chosen,
        sources=sources,
        weights=weights,
        checkpoint=ckpt_path,
        run_dir=stored.run_dir,
        cfg=cfg,
        state=dict(stored.ckpt.get("state") or {}),
    )
