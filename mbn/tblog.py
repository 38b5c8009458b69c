"""TensorBoard output of a training run: per-domain curves, image grids, BN-statistics divergence.

Tags: ``loss/<domain>``, ``acc/<domain>``, ``loss/total``, ``lr``, ``throughput/images_per_s``,
``test_acc/<bn>``, ``bn_divergence/<source>/mean`` and ``bn_divergence/<source>/<layer>``,
images ``images/<domain>`` and ``perturbation/<domain>`` (the change a domain made to its input,
amplified by ``logging.perturbation_gain`` around mid-grey so adversarial noise is visible).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn
from torchvision.utils import make_grid

from mbn.eval.divergence import bn_divergence


class TensorBoardLogger:
    """Thin wrapper over ``SummaryWriter``; a disabled logger does nothing."""

    def __init__(self, log_dir: Path, enabled: bool = True, perturbation_gain: float = 10.0) -> None:
        self.writer = None
        self.gain = perturbation_gain
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard; keep it off the import path

            self.writer = SummaryWriter(str(log_dir))

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Write ``{tag: value}`` at ``step``."""
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def images(self, domain: str, images: Tensor, source: Tensor | None, step: int, n: int = 16) -> None:
        """Grid of a domain's images, and of its perturbation when it transformed another batch."""
        if self.writer is None:
            return
        shown = images[:n].detach().float().clamp(0, 1).cpu()
        self.writer.add_image(f"images/{domain}", make_grid(shown, nrow=8), step)
        if source is not None and source.shape == images.shape:
            delta = (images[:n] - source[:n]).detach().float().cpu()
            self.writer.add_image(f"perturbation/{domain}", make_grid((0.5 + self.gain * delta).clamp(0, 1)), step)

    def divergence(self, model: nn.Module, step: int) -> None:
        """Per-layer symmetric KL between each auxiliary BN's running statistics and the main BN's."""
        if self.writer is None:
            return
        for source, layers in bn_divergence(model).items():
            if not layers:
                continue
            self.writer.add_scalar(f"bn_divergence/{source}/mean", sum(layers.values()) / len(layers), step)
            for i, (layer, value) in enumerate(layers.items()):
                self.writer.add_scalar(f"bn_divergence/{source}/{i:02d}_{layer}", value, step)

    def flush(self) -> None:
        """Flush pending events to disk."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
