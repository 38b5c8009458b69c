"""What a run reports, and to whom: the logger interface and the fan-out the training hooks call.

Every output of a run's progress (TensorBoard, ``scalars.csv``, Weights & Biases, MLflow) is a
:class:`RunLogger`: it receives the same calls with the same values, and keeps what it can show. Values are named
by their canonical tags (``loss/<domain>``, ``acc/<domain>``, ``loss/total``, ``lr``, ``throughput/images_per_s``,
``throughput/<domain>``, ``acc_test/<bn>``, ``acc_test_ema/<bn>``, ``acc5_test/<bn>`` and ``acc5_test_ema/<bn>``
(top-5, logged with six classes or more), ``x_diagnostics/bn_divergence_log10/<source>``: the tags of
``scalars.csv``); a logger may lay them out its own way (TensorBoard draws one sub-run per domain and
per BN, see :mod:`mbn.tblog`).

:class:`RunLoggers` hands each call to every logger, computing what they share once (image grids, the BN
divergence and its plots). A logger is a view of the run, not part of it: one that raises is named in one line
and dropped, and training goes on.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from contextlib import suppress
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.utils import make_grid

from mbn.errors import first_line

#: Tag group of the diagnostics, named to sort after every training curve (see :mod:`mbn.tblog`).
DIAGNOSTICS = "x_diagnostics"
#: Smallest divergence whose log10 is logged (a divergence of exactly 0 logs -12, not -inf).
DIVERGENCE_FLOOR = 1e-12


def divergence_tag(source: str) -> str:
    """Scalar tag of an auxiliary source's mean BN divergence (log10)."""
    return f"{DIAGNOSTICS}/bn_divergence_log10/{source}"


def divergence_image_tag(source: str) -> str:
    """Image tag of an auxiliary source's per-layer BN divergence plot."""
    return f"{DIAGNOSTICS}/bn_divergence_per_layer/{source}"


class RunLogger:
    """One output of a run's progress; every method does nothing here, so a logger overrides what it shows.

    The calls, in a run's order: :meth:`resume_at` and :meth:`start` when a session starts, :meth:`recipe` once
    per run, :meth:`scalars` and :meth:`images` while training, :meth:`final` with ``metrics.json``'s content,
    :meth:`close`.
    """

    #: Shown in the line that names a failing logger.
    name = "logger"
    #: Whether :meth:`images` is worth drawing for (grids and plots are made only when some logger wants them).
    wants_images = False

    def resume_at(self, step: int) -> None:
        """A resumed run restarts after ``step``: what was logged after it is logged again."""

    def start(self, domains: Sequence[str], sources: Sequence[str], divergence: bool) -> None:
        """A session starts: its domains, its BN sources (the main one first), whether divergence is logged."""

    def recipe(self, recipe: Mapping[str, Any], text: str) -> None:
        """The recipe as written (interpolations as their text: no secret leaves the run), and as YAML."""

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """``{tag: value}`` at ``step``."""

    def images(self, images: Mapping[str, Tensor], step: int) -> None:
        """``{tag: image}`` at ``step``: float (3, H, W) images in [0, 1] on the CPU."""

    def final(self, metrics: Mapping[str, Any]) -> None:
        """The run's final metrics (``metrics.json``), once training ends."""

    def flush(self) -> None:
        """Write out what is pending."""

    def close(self) -> None:
        """Flush and release files and threads."""


class RunLoggers:
    """Every logger of a run, called in turn; one that raises is named in one line and dropped.

    Args:
        loggers: The outputs (rank 0's; the other ranks get an empty list).
        perturbation_gain: Amplification of the ``samples_perturbation/<domain>`` images around mid-grey.
    """

    def __init__(self, loggers: Sequence[RunLogger], perturbation_gain: float = 10.0) -> None:
        self.loggers = list(loggers)
        self.gain = perturbation_gain

    def __iter__(self) -> Any:
        return iter(self.loggers)

    def _each(self, method: str, *args: Any) -> None:
        for logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as err:
                self.loggers.remove(logger)
                print(f"mbn: {logger.name} logging stopped ({first_line(err)}); training goes on", file=sys.stderr)
                with suppress(Exception):  # already reported; nothing more to do
                    logger.close()

    def resume_at(self, step: int) -> None:
        """See :meth:`RunLogger.resume_at`."""
        self._each("resume_at", step)

    def start(self, domains: Sequence[str], sources: Sequence[str], divergence: bool) -> None:
        """See :meth:`RunLogger.start`."""
        self._each("start", list(domains), list(sources), divergence)

    def recipe(self, recipe: Mapping[str, Any], text: str) -> None:
        """See :meth:`RunLogger.recipe`."""
        self._each("recipe", recipe, text)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """See :meth:`RunLogger.scalars`."""
        if values:
            self._each("scalars", dict(values), step)

    @property
    def wants_images(self) -> bool:
        """Whether some logger shows images."""
        return any(logger.wants_images for logger in self.loggers)

    def domain_images(self, domain: str, images: Tensor, source: Tensor | None, step: int, n: int = 16) -> None:
        """A grid of a domain's images (``samples/<domain>``), and of its change to its input.

        The change (``samples_perturbation/<domain>``, amplified around mid-grey) is drawn only when the domain
        changed another batch: not when ``images`` is ``source`` (or the same memory) or equals it, since a uniform
        grey card says nothing.
        """
        if not self.wants_images:
            return
        shown = images[:n].detach().float().clamp(0, 1).cpu()
        grids = {f"samples/{domain}": make_grid(shown, nrow=8)}
        if source is not None and source.shape == images.shape and not _same_tensor(images, source):
            delta = (images[:n].detach().float() - source[:n].detach().float()).cpu()
            if bool(delta.any()):
                grids[f"samples_perturbation/{domain}"] = make_grid((0.5 + self.gain * delta).clamp(0, 1))
        self._each("images", grids, step)

    def divergence(self, model: nn.Module, step: int) -> None:
        """Each auxiliary source's BN divergence: one log10 scalar (mean over layers) and a per-layer plot."""
        if not self.loggers:
            return
        from mbn.eval.divergence import bn_divergence

        scalars: dict[str, float] = {}
        plots: dict[str, Tensor] = {}
        for source, layers in bn_divergence(model).items():
            if not layers:
                continue
            scalars[divergence_tag(source)] = _log10(sum(layers.values()) / len(layers))
            if self.wants_images:
                from mbn.divergence_plot import divergence_plot

                image = torch.from_numpy(divergence_plot(source, layers, step)).permute(2, 0, 1)
                plots[divergence_image_tag(source)] = image.float() / 255
        self.scalars(scalars, step)
        if plots:
            self._each("images", plots, step)

    def final(self, metrics: Mapping[str, Any]) -> None:
        """See :meth:`RunLogger.final`."""
        self._each("final", metrics)

    def flush(self) -> None:
        """See :meth:`RunLogger.flush`."""
        self._each("flush")

    def close(self) -> None:
        """Close every logger (each once)."""
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            try:
                logger.close()
            except Exception as err:
                print(f"mbn: {logger.name} logging could not close ({first_line(err)})", file=sys.stderr)


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` are the same tensor or views of the same memory with the same layout (no data read)."""
    if a is b:
        return True
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def _log10(value: float) -> float:
    """log10 of a divergence, floored at :data:`DIVERGENCE_FLOOR`; NaN and inf pass through."""
    if math.isnan(value):
        return value
    return math.log10(max(value, DIVERGENCE_FLOOR))
