"""TensorBoard output of a training run: per-domain curves, image grids, BN-statistics divergence.

Tags: ``loss/<domain>``, ``acc/<domain>``, ``loss/total``, ``lr``, ``throughput/images_per_s``,
``test_acc/<bn>``, ``bn_divergence/<source>/mean`` and ``bn_divergence/<source>/<layer>``,
images ``images/<domain>`` and ``perturbation/<domain>`` (the change a domain made to its input,
amplified by ``logging.perturbation_gain`` around mid-grey so adversarial noise is visible).
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from torch import Tensor, nn
from torchvision.utils import make_grid

from mbn.errors import first_line
from mbn.eval.divergence import bn_divergence

_previous_excepthook: Callable[[threading.ExceptHookArgs], object] | None = None


def _quiet_writer_thread(args: threading.ExceptHookArgs) -> None:
    """Silence TensorBoard's writer thread, which re-raises a write error (a full disk) as a thread traceback.

    The logger reports that error as one line the next time it is called.
    """
    if type(args.thread).__name__ == "_AsyncWriterThread":
        return
    assert _previous_excepthook is not None
    _previous_excepthook(args)


def _install_thread_hook() -> None:
    global _previous_excepthook
    if _previous_excepthook is None:
        _previous_excepthook = threading.excepthook
        threading.excepthook = _quiet_writer_thread


class TensorBoardLogger:
    """Thin wrapper over ``SummaryWriter``; a disabled logger does nothing.

    TensorBoard is a view of the run, not part of it: when an event file cannot be written (a full disk), the
    logger prints one line and stops logging, and training goes on to its checkpoints.
    """

    def __init__(self, log_dir: Path, enabled: bool = True, perturbation_gain: float = 10.0) -> None:
        self.writer = None
        self.gain = perturbation_gain
        self.log_dir = log_dir
        if enabled:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard; keep it off the import path

            _install_thread_hook()
            with self._guard():
                self.writer = SummaryWriter(str(log_dir))

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except Exception as err:
            writer, self.writer = self.writer, None
            print(f"mbn: TensorBoard logging stopped: cannot write {self.log_dir} ({first_line(err)})", file=sys.stderr)
            if writer is not None:
                with suppress(Exception):
                    writer.close()

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Write ``{tag: value}`` at ``step``."""
        if self.writer is not None:
            with self._guard():
                for tag, value in values.items():
                    self.writer.add_scalar(tag, value, step)

    def images(self, domain: str, images: Tensor, source: Tensor | None, step: int, n: int = 16) -> None:
        """Grid of a domain's images, and of its perturbation when it transformed another batch."""
        if self.writer is None:
            return
        shown = images[:n].detach().float().clamp(0, 1).cpu()
        with self._guard():
            self.writer.add_image(f"images/{domain}", make_grid(shown, nrow=8), step)
            if source is not None and source.shape == images.shape:
                delta = (images[:n] - source[:n]).detach().float().cpu()
                grid = make_grid((0.5 + self.gain * delta).clamp(0, 1))
                self.writer.add_image(f"perturbation/{domain}", grid, step)

    def divergence(self, model: nn.Module, step: int) -> None:
        """Per-layer symmetric KL between each auxiliary BN's running statistics and the main BN's."""
        if self.writer is None:
            return
        for source, layers in bn_divergence(model).items():
            if not layers or self.writer is None:
                continue
            with self._guard():
                self.writer.add_scalar(f"bn_divergence/{source}/mean", sum(layers.values()) / len(layers), step)
                for i, (layer, value) in enumerate(layers.items()):
                    self.writer.add_scalar(f"bn_divergence/{source}/{i:02d}_{layer}", value, step)

    def flush(self) -> None:
        """Flush pending events to disk."""
        if self.writer is not None:
            with self._guard():
                self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            with self._guard():
                self.writer.close()
            self.writer = None
