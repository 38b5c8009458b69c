"""TensorBoard output of a training run: one sub-run per domain and per BN, so per-domain curves share a chart.

TensorBoard draws one line per *run* on a chart of one *tag*, in the run's colour, with the run's name in the
legend. So every per-domain quantity is written under the same tag by one writer per domain, and every per-BN
quantity by one writer per BN source::

    RUN_DIR/tb/                 loss/total, lr, throughput/total, the recipe (text and HParams), the chart layout
    RUN_DIR/tb/domain=clean/    loss/per_domain, train_acc/per_domain, throughput/per_domain, x_samples/*
    RUN_DIR/tb/domain=adv/      (the same tags)
    RUN_DIR/tb/bn=clean/        test_acc/per_bn, test_acc/per_bn_ema, test_acc5/per_bn, test_acc5/per_bn_ema,
                                x_diagnostics/* (auxiliary BNs)
    RUN_DIR/tb/bn=adv/

One chart, ``loss/per_domain``, then shows every domain's loss in its own colour with a legend
(``tb/domain=clean``, ``tb/domain=adv``), and the weighted total sits on a chart of its own, where its larger
scale squashes nothing. ``tensorboard --logdir runs`` over several runs overlays the same charts across runs.

Order. TensorBoard's default (Time Series) view and its Scalars tab sort tag groups (the part before the first
``/``) alphabetically; the groups are named to read in this order: ``loss``, ``lr``, ``test_acc``, ``test_acc5``
(top-5, with six classes or more), ``throughput``,
``train_acc``, then ``x_diagnostics`` (BN divergence: ``bn_divergence_log10``, the log10 of the symmetric KL
between an auxiliary BN's running statistics and the main BN's, averaged over layers; and
``bn_divergence_per_layer``, a bar plot) and ``x_samples`` (``images``: a grid of the domain's batch;
``perturbation``: the change the domain made to its input, amplified around mid-grey, written only where there
is one). :meth:`TensorBoardLogger.start` also writes a Custom Scalars layout (the CUSTOM SCALARS tab) in reading
order: losses, accuracies, learning rate and throughput, BN divergence.

HParams. The recipe (as written: interpolations stay text) is flattened to ``section.key`` hyper-parameters in the
root run's session, so TensorBoard's HParams tab lists every run of a ``--logdir`` with its recipe, and the last
value of every curve (test accuracy per BN, final losses) as metrics; a finished run's session is marked done.

``scalars.csv`` keeps the canonical tags (``loss/<domain>``, ...; :mod:`mbn.logger`), one column per quantity and
domain; this module maps each canonical tag to its sub-run and tag (:func:`tensorboard_place`).
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from torch import Tensor

from mbn.errors import first_line
from mbn.logger import DIAGNOSTICS, RunLogger

#: The root run's name (the run's ``tb/`` directory itself).
ROOT = ""


def domain_run(domain: str) -> str:
    """The sub-run (a directory under ``tb/``) of a domain's curves."""
    return f"domain={_dir_name(domain)}"


def bn_run(source: str) -> str:
    """The sub-run of a BN source's curves (test accuracy, divergence)."""
    return f"bn={_dir_name(source)}"


def _dir_name(name: str) -> str:
    return re.sub(r"[/\\\x00]", "_", name)


#: Canonical tag prefix -> (sub-run maker, TensorBoard tag); the part after the prefix names the domain or BN.
_PER_NAME: tuple[tuple[str, Callable[[str], str], str], ...] = (
    ("loss/", domain_run, "loss/per_domain"),
    ("acc/", domain_run, "train_acc/per_domain"),
    ("throughput/", domain_run, "throughput/per_domain"),
    ("acc_test/", bn_run, "test_acc/per_bn"),
    ("acc_test_ema/", bn_run, "test_acc/per_bn_ema"),
    ("acc5_test/", bn_run, "test_acc5/per_bn"),
    ("acc5_test_ema/", bn_run, "test_acc5/per_bn_ema"),
    (f"{DIAGNOSTICS}/bn_divergence_log10/", bn_run, f"{DIAGNOSTICS}/bn_divergence_log10"),
    (f"{DIAGNOSTICS}/bn_divergence_per_layer/", bn_run, f"{DIAGNOSTICS}/bn_divergence_per_layer"),
    ("samples/", domain_run, "x_samples/images"),
    ("samples_perturbation/", domain_run, "x_samples/perturbation"),
)
#: Canonical tags of the root run that are renamed there.
_ROOT_TAGS = {"loss/total": "loss/total", "throughput/images_per_s": "throughput/total"}


def tensorboard_place(tag: str) -> tuple[str, str]:
    """Where a canonical tag goes in TensorBoard: ``(sub-run, tag)``.

    ``loss/adv`` -> ``("domain=adv", "loss/per_domain")``; tags of the whole run (``loss/total``, ``lr``, ...) stay
    in the root run ``""``.
    """
    if tag in _ROOT_TAGS:
        return ROOT, _ROOT_TAGS[tag]
    for prefix, run, tb_tag in _PER_NAME:
        if tag.startswith(prefix) and len(tag) > len(prefix):
            return run(tag[len(prefix) :]), tb_tag
    return ROOT, tag


def canonical_tag(run: str, tag: str) -> str:
    """The canonical tag of TensorBoard's ``(sub-run, tag)``: the inverse of :func:`tensorboard_place`."""
    if not run:
        return next((canonical for canonical, tb_tag in _ROOT_TAGS.items() if tb_tag == tag), tag)
    name = run.split("=", 1)[1]
    prefix = next(prefix for prefix, _, tb_tag in _PER_NAME if tb_tag == tag and run.startswith(prefix_of(tb_tag)))
    return prefix + name


def prefix_of(tb_tag: str) -> str:
    """``domain=`` or ``bn=``: the sub-runs that hold ``tb_tag``."""
    maker = next(maker for _, maker, tag in _PER_NAME if tag == tb_tag)
    return maker("")


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


class TensorBoardLogger(RunLogger):
    """One ``SummaryWriter`` per sub-run, each made on its first write; a disabled logger does nothing.

    TensorBoard is a view of the run, not part of it: when an event file cannot be written (a full disk), the
    logger prints one line and stops logging, and training goes on to its checkpoints.

    Args:
        log_dir: The event files' directory (``RUN_DIR/tb``), created with the first event written.
        enabled: False: write no event file (``logging.tensorboard=false``, the other ranks).
    """

    name = "TensorBoard"
    wants_images = True

    def __init__(self, log_dir: Path, enabled: bool = True) -> None:
        self._writers: dict[str, Any] = {}  # sub-run -> SummaryWriter, each made on its first write
        self._on = enabled  # False: disabled, or stopped by a write error
        self._purge_step: int | None = None  # a resumed run's first step logged again (see resume_at)
        self.log_dir = log_dir
        if enabled:
            _install_thread_hook()

    def writer(self, run: str = ROOT) -> Any:
        """The ``SummaryWriter`` of sub-run ``run`` (``""``: the root), created on first use; None when off.

        Nothing is created when the logger is built: a run that fails before it logs anything (a recipe or data
        error found after the hooks were built, a full disk at ``config.yaml``) leaves no ``tb/``, which would
        make :func:`mbn.rundir.check_new_run_dir` refuse the corrected command in the same directory.
        """
        if run not in self._writers and self._on:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard; keep it off the import path

            with self._guard():
                path = self.log_dir / run if run else self.log_dir
                self._writers[run] = SummaryWriter(str(path), purge_step=self._purge_step)
        return self._writers.get(run)

    def resume_at(self, step: int) -> None:
        """A run resumed from a checkpoint at ``step``: hide what was logged after it.

        The steps after the checkpoint are trained and logged again (bit-identically); TensorBoard's ``purge_step``
        hides the old events from ``step + 1`` on, in every sub-run, so each step is shown once.
        """
        if self._on and step > 0:
            self._purge_step = step + 1  # the writers made on the next writes purge from there
            writers, self._writers = self._writers, {}
            for writer in writers.values():
                with self._guard():
                    writer.close()

    @contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            yield
        except Exception as err:
            writers, self._writers, self._on = self._writers, {}, False
            print(f"mbn: TensorBoard logging stopped: cannot write {self.log_dir} ({first_line(err)})", file=sys.stderr)
            for writer in writers.values():
                with suppress(Exception):
                    writer.close()

    def start(self, domains: Sequence[str], sources: Sequence[str], divergence: bool = True) -> None:
        """Write the Custom Scalars layout: losses, accuracies, learning rate and throughput, BN divergence.

        Called when every session starts (a resume writes the same layout). Each chart selects its tag in every
        sub-run, so it holds one line per domain (or BN); the EMA and other-BN test curves join when logged.

        Args:
            domains: The run's domains (their sub-runs carry the per-domain tags).
            sources: The BN sources, the main one first; the others are the auxiliary sources of the divergence.
            divergence: Whether BN divergence is logged (``logging.divergence_every > 0``, separate running
                statistics); False leaves the BN divergence category out rather than empty.
        """
        writer = self.writer()
        if writer is None:
            return
        layout: dict[str, dict[str, list[Any]]] = {
            "losses": {
                "loss per domain": _chart("loss/per_domain"),
                "total loss (weighted sum over domains)": _chart("loss/total"),
            },
            "accuracies": {
                "train accuracy per domain": _chart("train_acc/per_domain"),
                "test accuracy per BN": _chart("test_acc/per_bn"),
                "test accuracy per BN, EMA weights": _chart("test_acc/per_bn_ema"),
                "test top-5 accuracy per BN": _chart("test_acc5/per_bn"),
                "test top-5 accuracy per BN, EMA weights": _chart("test_acc5/per_bn_ema"),
            },
            "learning rate and throughput": {
                "learning rate": _chart("lr"),
                "images per second (all domains)": _chart("throughput/total"),
                "images per second per domain": _chart("throughput/per_domain"),
            },
        }
        if divergence and len(sources) > 1:
            layout["BN divergence"] = {
                "log10 symmetric KL to the main BN (mean over layers)": _chart(f"{DIAGNOSTICS}/bn_divergence_log10")
            }
        with self._guard():
            writer.add_custom_scalars(layout)

    def recipe(self, recipe: Mapping[str, Any], text: str) -> None:
        """The recipe as a YAML code block (tag ``recipe/text_summary``) and as HParams; once, at step 0."""
        writer = self.writer()
        if writer is None:
            return
        longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
        fence = "`" * max(3, longest + 1)  # a fence longer than any backtick run inside
        with self._guard():
            writer.add_text("recipe", f"{fence}yaml\n{text.rstrip()}\n{fence}", 0)
            writer.file_writer.add_summary(_session_start(hparams_of(recipe)))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Write each canonical ``{tag: value}`` at ``step`` in its sub-run (:func:`tensorboard_place`)."""
        self._write("add_scalar", values, step)

    def images(self, images: Mapping[str, Tensor], step: int) -> None:
        """Write each canonical ``{tag: (3, H, W) image}`` at ``step`` in its sub-run."""
        self._write("add_image", images, step)

    def _write(self, add: str, items: Mapping[str, Any], step: int) -> None:
        """``SummaryWriter.<add>(tag, item, step)`` for each item, in the sub-run its canonical tag names."""
        for tag, item in items.items():
            run, tb_tag = tensorboard_place(tag)
            writer = self.writer(run)
            if writer is None:  # off, or stopped by a write error
                return
            with self._guard():
                getattr(writer, add)(tb_tag, item, step)

    def final(self, metrics: Mapping[str, Any]) -> None:
        """Mark the run's HParams session as finished."""
        writer = self.writer()
        if writer is None:
            return
        with self._guard():
            writer.file_writer.add_summary(_session_end())

    def flush(self) -> None:
        """Flush pending events to disk."""
        for writer in list(self._writers.values()):  # nothing written yet: nothing to flush (and no tb/ made)
            with self._guard():
                writer.flush()

    def close(self) -> None:
        """Flush and close every event file."""
        writers, self._writers, self._on = self._writers, {}, False
        for writer in writers.values():
            with self._guard():
                writer.close()


def _chart(tag: str) -> list[Any]:
    """A multiline chart of ``tag`` in every sub-run (Custom Scalars reads the entry as a regular expression)."""
    return ["Multiline", [f"^{re.escape(tag)}$"]]


#: Longest text value of a hyper-parameter (a long list is cut, with an ellipsis).
_HPARAM_TEXT = 200


def hparams_of(recipe: Mapping[str, Any]) -> dict[str, bool | float | str]:
    """The recipe's leaves as ``{"section.key": value}``: numbers, booleans and text; lists as JSON, None as text.

    Domains are keyed by name (``domains.adv.eps``); a key holding dots stays one name after its section.
    """
    out: dict[str, bool | float | str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, bool):
            out[prefix] = node
        elif isinstance(node, (int, float)):
            out[prefix] = float(node)
        elif isinstance(node, str):
            out[prefix] = node[:_HPARAM_TEXT]
        else:
            text = json.dumps(node, default=str)
            out[prefix] = text if len(text) <= _HPARAM_TEXT else text[: _HPARAM_TEXT - 1] + "…"

    walk(recipe, "")
    return out


def _hparams_summary(tag: str, **info: Any) -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **info)
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString())
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


def _session_start(hparams: Mapping[str, bool | float | str]) -> Any:
    """The HParams session start: the run's hyper-parameters.

    No experiment summary is written, so that TensorBoard builds the HParams table from every run's own session
    and runs of different recipes are listed side by side.
    """
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for key, value in hparams.items():
        if isinstance(value, bool):
            info.hparams[key].bool_value = value
        elif isinstance(value, float):
            info.hparams[key].number_value = value
        else:
            info.hparams[key].string_value = value
    return _hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=info)


def _session_end() -> Any:
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
    return _hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=info)
