"""TensorBoard output of a training run, laid out so the curves that matter come first; and ``scalars.csv``.

Scalars (also appended to ``scalars.csv`` by a :class:`~mbn.csvlog.CsvScalarLog` given as ``csv``):

- ``loss/<domain>``, ``loss/total``, ``acc/<domain>``, ``acc_test/<bn>`` and ``acc_test_ema/<bn>``, ``lr``,
  ``throughput/images_per_s`` and ``throughput/<domain>``: whatever the engine passes to :meth:`scalars`.
- ``x_diagnostics/bn_divergence_log10/<source>``: one per auxiliary BN source, the log10 of the symmetric KL
  between its running statistics and the main BN's, averaged over layers (:mod:`mbn.eval.divergence`). The
  divergence is often 1e-5 or less, which TensorBoard prints as 0; its log10 (-5.3) reads and plots well, and
  ``10 ** value`` recovers it. A divergence of 0 is floored at ``1e-12`` (log10 -12).

Order. TensorBoard's default (Time Series) view sorts tag groups, the part before the first ``/``,
alphabetically: ``acc`` (training), ``acc_test``, ``acc_test_ema``, ``loss``, ``lr``, ``samples``,
``samples_perturbation``, ``throughput``. The diagnostics group is named ``x_diagnostics`` so that it sorts
after all of them: ``x`` comes after ``t``, and a word reads as what it is, where a ``_`` prefix would sort
first and a symbol such as ``~`` is awkward to read and to type in the tag filter. Test accuracies have groups
of their own, so no domain or BN name can make two curves share a tag. :meth:`TensorBoardLogger.layout` also
writes a Custom Scalars layout (the CUSTOM SCALARS tab) in reading order: losses (every domain's and the total on
one chart), accuracies (train per domain; test per BN with its EMA), learning rate and throughput, BN divergence.

Images: ``samples/<domain>`` and ``samples_perturbation/<domain>`` (groups named to sort after ``acc``, ``loss``
and ``lr``), the latter the change a domain made to its input, amplified by
``logging.perturbation_gain`` around mid-grey so adversarial noise is visible, written only when there is a
change (never for the clean domain, whose output is its input); ``x_diagnostics/bn_divergence_per_layer/<source>``,
a bar plot of the per-layer divergence (log scale when it spans orders of magnitude) instead of one card per layer.

Text: ``recipe/text_summary`` (torch adds ``/text_summary``), the resolved recipe as a YAML code block
(:meth:`TensorBoardLogger.recipe`).
"""

from __future__ import annotations

import math
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torchvision.utils import make_grid

from mbn.errors import first_line
from mbn.eval.divergence import bn_divergence

if TYPE_CHECKING:
    from mbn.csvlog import CsvScalarLog

#: Tag group of the diagnostics, named to sort after every training curve (see the module docstring).
DIAGNOSTICS = "x_diagnostics"
#: Smallest divergence whose log10 is logged (a divergence of exactly 0 logs -12, not -inf).
DIVERGENCE_FLOOR = 1e-12


def divergence_tag(source: str) -> str:
    """Scalar tag of an auxiliary source's mean BN divergence (log10)."""
    return f"{DIAGNOSTICS}/bn_divergence_log10/{source}"


def divergence_image_tag(source: str) -> str:
    """Image tag of an auxiliary source's per-layer BN divergence plot."""
    return f"{DIAGNOSTICS}/bn_divergence_per_layer/{source}"


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
    """Thin wrapper over ``SummaryWriter``; a disabled logger does nothing (but still feeds ``csv``).

    TensorBoard is a view of the run, not part of it: when an event file cannot be written (a full disk), the
    logger prints one line and stops logging, and training goes on to its checkpoints.

    Args:
        log_dir: The event files' directory (``RUN_DIR/tb``), created with the first event written.
        enabled: False: write no event file (``logging.tensorboard=false``, the other ranks).
        perturbation_gain: Amplification of the ``samples_perturbation/<domain>`` images around mid-grey.
        csv: Where every scalar also goes, TensorBoard enabled or not; the logger closes it.
    """

    def __init__(
        self,
        log_dir: Path,
        enabled: bool = True,
        perturbation_gain: float = 10.0,
        csv: CsvScalarLog | None = None,
    ) -> None:
        self._writer: Any = None  # the SummaryWriter, made on the first write (see :attr:`writer`)
        self._on = enabled  # False: disabled, or stopped by a write error
        self._purge_step: int | None = None  # a resumed run's first step logged again (see resume_at)
        self.gain = perturbation_gain
        self.log_dir = log_dir
        self.csv = csv
        if enabled:
            _install_thread_hook()

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter``, created (with ``log_dir``) on first use; None when disabled or stopped.

        Nothing is created when the logger is built: a run that fails before it logs anything (a recipe or data
        error found after the hooks were built, a full disk at ``config.yaml``) leaves no ``tb/``, which would
        make :func:`mbn.rundir.check_new_run_dir` refuse the corrected command in the same directory.
        """
        if self._writer is None and self._on:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard; keep it off the import path

            with self._guard():
                self._writer = SummaryWriter(str(self.log_dir), purge_step=self._purge_step)
        return self._writer

    def resume_at(self, step: int) -> None:
        """A run resumed from a checkpoint at ``step``: drop what was logged after it, in TensorBoard and the CSV.

        The steps after the checkpoint are trained and logged again (bit-identically); TensorBoard's ``purge_step``
        hides the old events from ``step + 1`` on, and the CSV is cut back, so both hold each step once.
        """
        if self.csv is not None:
            self.csv.truncate_after(step)
        if self._on and step > 0:
            self._purge_step = step + 1  # the writer made on the next write purges from there
            if self._writer is not None:
                writer, self._writer = self._writer, None
                with self._guard():
                    writer.close()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except Exception as err:
            writer, self._writer, self._on = self._writer, None, False
            print(f"mbn: TensorBoard logging stopped: cannot write {self.log_dir} ({first_line(err)})", file=sys.stderr)
            if writer is not None:
                with suppress(Exception):
                    writer.close()

    @property
    def _csv_on(self) -> bool:
        return self.csv is not None and self.csv.enabled

    def layout(self, domains: Sequence[str], sources: Sequence[str], divergence: bool = True) -> None:
        """Write the Custom Scalars layout: losses, accuracies, learning rate and throughput, BN divergence.

        Call once when training starts (again on resume: the same layout). Every chart holds at least one tag
        that every run logs, so no chart stays empty (the EMA and other-BN test curves join when logged).

        Args:
            domains: The domains whose ``loss/<domain>``, ``acc/<domain>`` and ``throughput/<domain>`` are logged.
            sources: The BN sources, the main one first; the others are the auxiliary sources of the divergence.
            divergence: Whether :meth:`divergence` will log anything (``logging.divergence_every > 0``, separate
                running statistics); False leaves the BN divergence category out rather than empty.
        """
        writer = self.writer
        if writer is None:
            return
        layout: dict[str, dict[str, list[Any]]] = {
            "losses": {"loss (every domain and total)": _chart([f"loss/{d}" for d in domains] + ["loss/total"])},
            "accuracies": {
                "train accuracy per domain": _chart([f"acc/{d}" for d in domains]),
                "test accuracy per BN (and its EMA weights)": _chart(
                    [tag for bn in sources for tag in (f"acc_test/{bn}", f"acc_test_ema/{bn}")]
                ),
            },
            "learning rate and throughput": {
                "learning rate": _chart(["lr"]),
                "images per second (all domains)": _chart(["throughput/images_per_s"]),
                "images per second per domain": _chart([f"throughput/{d}" for d in domains]),
            },
        }
        if divergence and len(sources) > 1:
            layout["BN divergence"] = {
                "log10 symmetric KL to the main BN (mean over layers)": _chart([divergence_tag(s) for s in sources[1:]])
            }
        with self._guard():
            writer.add_custom_scalars(layout)

    def recipe(self, yaml_text: str, step: int = 0) -> None:
        """The resolved recipe as text (tag ``recipe/text_summary``), a YAML code block; once, at step 0."""
        writer = self.writer
        if writer is None:
            return
        longest = max((len(m) for m in re.findall(r"`+", yaml_text)), default=0)
        fence = "`" * max(3, longest + 1)  # a fence longer than any backtick run inside
        with self._guard():
            writer.add_text("recipe", f"{fence}yaml\n{yaml_text.rstrip()}\n{fence}", step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Write ``{tag: value}`` at ``step`` to TensorBoard and to ``csv``."""
        if self.csv is not None:
            self.csv.scalars(values, step)
        writer = self.writer
        if writer is not None:
            with self._guard():
                for tag, value in values.items():
                    writer.add_scalar(tag, value, step)

    def images(self, domain: str, images: Tensor, source: Tensor | None, step: int, n: int = 16) -> None:
        """Grid of a domain's images, and of its perturbation when it changed another batch.

        No perturbation image is written when ``images`` is ``source`` (or the same memory), or equals it: a
        uniform grey card says nothing.
        """
        writer = self.writer
        if writer is None:
            return
        shown = images[:n].detach().float().clamp(0, 1).cpu()
        with self._guard():
            writer.add_image(f"samples/{domain}", make_grid(shown, nrow=8), step)
            if source is None or source.shape != images.shape or _same_tensor(images, source):
                return
            delta = (images[:n].detach().float() - source[:n].detach().float()).cpu()
            if not bool(delta.any()):
                return
            grid = make_grid((0.5 + self.gain * delta).clamp(0, 1))
            writer.add_image(f"samples_perturbation/{domain}", grid, step)

    def divergence(self, model: nn.Module, step: int) -> None:
        """Each auxiliary source's BN divergence: one log10 scalar (mean over layers) and a per-layer plot."""
        if not self._on and not self._csv_on:
            return
        for source, layers in bn_divergence(model).items():
            if not layers:
                continue
            mean = sum(layers.values()) / len(layers)
            self.scalars({divergence_tag(source): _log10(mean)}, step)
            writer = self.writer
            if writer is not None:
                image = _divergence_plot(source, layers, step)
                with self._guard():
                    writer.add_image(divergence_image_tag(source), image, step, dataformats="HWC")

    def flush(self) -> None:
        """Flush pending events (and the CSV) to disk."""
        if self.csv is not None:
            self.csv.flush()
        if self._writer is not None:  # nothing written yet: nothing to flush (and no tb/ made for it)
            with self._guard():
                self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file and the CSV."""
        if self.csv is not None:
            self.csv.close()
        writer, self._writer, self._on = self._writer, None, False
        if writer is not None:
            with self._guard():
                writer.close()


def _chart(tags: Sequence[str]) -> list[Any]:
    """A multiline chart of exactly ``tags`` (Custom Scalars reads each entry as a regular expression)."""
    return ["Multiline", [f"^{re.escape(tag)}$" for tag in tags]]


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


#: Most layer names written under the bars; deeper models get every k-th name.
_MAX_LABELS = 40


def _divergence_plot(source: str, layers: Mapping[str, float], step: int) -> Any:
    """An RGB (H, W, 3) uint8 bar plot of the per-layer divergence, drawn with Agg (no pyplot, no global state)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names, values = _short_names(list(layers)), [float(v) for v in layers.values()]
    n = len(names)
    finite = [v for v in values if math.isfinite(v)]
    positive = [v for v in finite if v > 0]
    log = bool(positive) and len(positive) == len(finite) and max(positive) / min(positive) >= 100
    fig = Figure(figsize=(min(16.0, max(7.0, 0.2 * n + 2.5)), 5.0), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(n), [v if math.isfinite(v) else math.nan for v in values], color="tab:blue", width=0.8)
    if log:
        ax.set_yscale("log")
    every = max(1, math.ceil(n / _MAX_LABELS))
    ticks = list(range(0, n, every))
    ax.set_xticks(ticks, [f"{i}: {names[i]}" if every > 1 else names[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, n - 0.4)
    mean = sum(finite) / len(finite) if finite else math.nan
    ax.set_xlabel("layer, in model order" + (f" (one in {every} named)" if every > 1 else ""))
    ax.set_ylabel("symmetric KL to the main BN" + (" (log scale)" if log else ""))
    ax.set_title(f"BN divergence of '{source}' per layer, step {step}\nmean over {n} layers: {mean:.3g}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _short_names(names: list[str]) -> list[str]:
    """Layer names without the dotted prefix they all share (``net.``)."""
    parts = [name.split(".") for name in names]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return [".".join(p[shared:]) for p in parts]
