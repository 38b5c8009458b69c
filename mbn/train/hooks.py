"""What happens around the steps: logging, evaluation, checkpoints, ``metrics.json``.

Three events (:meth:`TrainHooks.after_step`, :meth:`~TrainHooks.after_epoch`, :meth:`~TrainHooks.finish`) and the
calls they make: the logging window (read on logging steps only, the step's one host sync), the run's loggers
(TensorBoard, ``scalars.csv``, trackers: :mod:`mbn.logger`), progress lines, image grids and BN divergence, test
accuracy at its cadence, mid-epoch and epoch checkpoints (with the session's clock and open window), and the final
metrics.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from mbn.config import DomainSpec, save_recipe
from mbn.data import DataBundle
from mbn.errors import DomainError, TrainingDivergedError
from mbn.eval.accuracy import TopK, topk_accuracy
from mbn.fileio import atomic_write_text
from mbn.logger import RunLogger, RunLoggers
from mbn.meter import NonFiniteError, StepMeter, TrainClock
from mbn.objective import CLASSES
from mbn.progress import Progress, accuracy_line, step_line
from mbn.train.checkpoints import STATE_ERRORS, Checkpoint, RunCheckpoints, state_does_not_fit
from mbn.train.runtime import Runtime, out_of_memory_message
from mbn.train.state import RunLength, TrainState
from mbn.train.step import StepOutput, StepStats
from mbn.train.update import Update
from mbn.written_recipe import recipe_as_written, recipe_yaml


@dataclass(frozen=True)
class HookSettings:
    """What the hooks do and how often (the builder reads them from the recipe's ``trainer``/``logging`` keys)."""

    log_every: int = 1  # steps per logging window (trainer.log_every)
    image_every: int = 0  # image grids every this many steps (logging.image_every; 0: never)
    divergence_every: int = 0  # BN divergence every this many steps (logging.divergence_every; 0: never)
    checkpoint_every_steps: int = 0  # mid-epoch checkpoints (trainer.checkpoint_every_steps; 0: epochs only)
    eval_all_bns: bool = False  # test accuracy through every BN, not only the main one
    perturbation_gain: float = 10.0  # logging.perturbation_gain
    progress: str = "plain"  # trainer.progress
    divergence_layout: bool = True  # a BN-divergence chart in TensorBoard's layout
    budget_of: str | None = None  # trainer.budget_of, reported in metrics.json


class TrainHooks:
    """Logging, evaluation and checkpoint cadence of one run; rank 0 alone writes and prints.

    Args:
        cfg: the recipe, saved as ``config.yaml`` and logged as text once per run.
        settings: what to log and how often.
        run_dir: the run directory.
        runtime, update, checkpoints: what the hooks read (model, learning rate) and write (checkpoints).
        data: the test split and class count.
        specs: the recipe's domains; length: how long the run trains.
        loggers: where scalars, images, the recipe and the final metrics go (rank 0's; none on the others).
    """

    def __init__(
        self,
        cfg: DictConfig,
        settings: HookSettings,
        run_dir: Path,
        runtime: Runtime,
        update: Update,
        checkpoints: RunCheckpoints,
        data: DataBundle,
        specs: Sequence[DomainSpec],
        length: RunLength,
        loggers: Sequence[RunLogger] = (),
    ) -> None:
        self.cfg, self.settings, self.run_dir = cfg, settings, run_dir
        self.runtime, self.update, self.checkpoints = runtime, update, checkpoints
        self.data, self.specs, self.length = data, list(specs), length
        self.sources = checkpoints.sources
        main = runtime.dist.is_main  # the other ranks write nothing and print nothing
        self.log = RunLoggers(loggers if main else (), settings.perturbation_gain)
        self.progress = Progress(settings.progress if main else "none", total=length.planned_steps)
        self.meter = StepMeter([s.name for s in self.specs], runtime.device, runtime.dist)
        self.clock = TrainClock(runtime.device, runtime.dist.world_size)  # images of every rank
        self.last_window: dict[str, float] = {}
        self.init_report: dict[str, Any] | None = None
        self._wall_before = self._wall_at_save = 0.0  # wall time of earlier sessions of a resumed run
        self._wall_start: float | None = None
        self._last_line = time.perf_counter()  # when a progress line was last printed (the heartbeat's clock)

    # ---------------------------------------------------------------------------------------- events
    def start(self, state: TrainState, *, resumed: bool, idle: bool) -> None:
        """Before the first step of this session: the recipe saved, the loggers started (rank 0)."""
        if idle or not self.runtime.dist.is_main:
            self._wall_start = time.perf_counter()
            return
        save_recipe(self.cfg, self.run_dir / "config.yaml")  # after every check passed: never a bad recipe
        self.log.resume_at(state.step)  # a resume logs the steps after its checkpoint again
        self.log.start([s.name for s in self.specs], list(self.sources), self.settings.divergence_layout)
        if not resumed:  # once per run, not once per session
            self.log.recipe(recipe_as_written(self.cfg), recipe_yaml(self.cfg))
        self._wall_start = time.perf_counter()

    def after_step(self, state: TrainState, last: StepOutput, stats: Sequence[StepStats]) -> None:
        """After optimisation step ``state.step``: its micro-batches' statistics, logging, images, checkpoints."""
        for micro in stats:
            self.meter.add(state.step, micro.losses, micro.accs, micro.finite)
            self.clock.count(micro.sizes)
        self.progress.update()
        step, log, every = state.step, self.settings, self.settings.log_every
        if stats and stats[0].seconds:  # a session's first step: where its time went, before any logging window
            self._say(f"step {step}: {_time_split(stats[0].seconds)}")
        elif step % every and time.perf_counter() - self._last_line > HEARTBEAT_S:
            self._say(f"epoch {state.epoch} step {step}: still training ({self.length.planned_steps} steps planned)")
        if step % every == 0 or self.length.done(state):
            self.check_finite()
            # a max_steps stop between logging steps peeks at the window: a resumed run closes it as an
            # uninterrupted run would, so both report the same means
            means = self.meter.read(reset=step % every == 0)  # the step's only host sync
            self.clock.lap()
            weights = {s.name: s.weight for s in self.specs}
            means["loss/total"] = sum(weights[n] * means[f"loss/{n}"] for n in weights if f"loss/{n}" in means)
            means["lr"] = self.update.lr
            means.update(self.clock.throughput())
            with self.clock.paused():  # a slow tracker never shows as slow training
                self.log.scalars(means, step)
            losses = {s.name: means[f"loss/{s.name}"] for s in self.specs if f"loss/{s.name}" in means}
            speed = means.get("throughput/images_per_s")
            self._say(step_line(state.epoch, step, losses, self.update.lr, speed))
            self.progress.show({k[5:]: v for k, v in means.items() if k.startswith("loss/")})
            self.last_window = means
        with self.clock.paused():
            if log.image_every and (step % log.image_every == 0 or step == 1):
                for name, made in last.batches.items():
                    self.log.domain_images(name, made.images, made.source, step)
            if log.divergence_every and step % log.divergence_every == 0 and len(self.sources) > 1:
                self.log.divergence(self.runtime.model, step)
        save_every = self.settings.checkpoint_every_steps
        if save_every and step % save_every == 0 and not self.length.epoch_done(state):
            self.save_checkpoint(state)

    def _say(self, line: str) -> None:
        """A progress line; the heartbeat counts from here."""
        self.progress.log(line)
        self._last_line = time.perf_counter()

    def after_epoch(self, state: TrainState) -> None:
        """After an epoch's last step: test accuracy when due, then a checkpoint."""
        if self.length.eval_due(state):
            self.evaluate(state)
        self.save_checkpoint(state)

    def finish(self, state: TrainState, *, idle: bool) -> dict[str, Any]:
        """The final metrics, written to ``metrics.json`` (rank 0; an idle resume keeps the one there)."""
        metrics = self.final_metrics(state, self._wall_at_save)
        if self.runtime.dist.is_main and not (idle and (self.run_dir / "metrics.json").is_file()):
            atomic_write_text(self.run_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            self.log.final(metrics)
        return metrics

    # ------------------------------------------------------------------------------- what they call
    def evaluate(self, state: TrainState) -> dict[str, float]:
        """Test accuracy through the main BN (and every BN with ``trainer.eval_all_bns``), on rank 0."""
        self.clock.stop()
        sources = self.sources if self.settings.eval_all_bns else self.sources[:1]
        runtime, test = self.runtime, self.data.test
        scores: dict[str, TopK] = {}
        ema_scores: dict[str, TopK] = {}
        if runtime.dist.is_main:  # rank 0 evaluates; every rank keeps its result
            try:  # one pass per BN gives top-1 and top-5
                scores = {
                    bn: topk_accuracy(runtime.model, test, bn, runtime.to_device, runtime.autocast) for bn in sources
                }
                if self.update.ema is not None:
                    average = self.update.ema.module
                    ema_scores = {
                        bn: topk_accuracy(average, test, bn, runtime.to_device, runtime.autocast) for bn in sources
                    }
            except (RuntimeError, MemoryError) as err:
                message = out_of_memory_message(err, f"in the evaluation forward on {runtime.device}", _EVAL_KEYS)
                if message is None:
                    raise
                raise DomainError(message) from err
        scores, ema_scores = runtime.dist.broadcast_object((scores, ema_scores))
        acc = {bn: s.top1 for bn, s in scores.items()}
        ema = {bn: s.top1 for bn, s in ema_scores.items()}
        state.test_acc, state.test_acc_ema, state.evaluated_step = acc, ema, state.step
        state.best_acc = max(state.best_acc, acc[self.sources[0]])
        logged = {f"acc_test/{bn}": a for bn, a in acc.items()} | {f"acc_test_ema/{bn}": a for bn, a in ema.items()}
        # top-5 beside top-1 (none with five classes or fewer: every prediction would be in the top 5)
        logged |= {f"acc5_test/{bn}": s.top5 for bn, s in scores.items() if s.top5 is not None}
        logged |= {f"acc5_test_ema/{bn}": s.top5 for bn, s in ema_scores.items() if s.top5 is not None}
        self.log.scalars(logged, state.step)
        self.progress.log(accuracy_line(state.step, acc, ema))
        return acc

    def save_checkpoint(self, state: TrainState) -> None:
        """``last.pt`` (and ``best.pt``) with this session's clock and open logging window.

        Raises:
            TrainingDivergedError: a step since the last check had a non-finite loss, or the weights (parameters,
                BN statistics, weight average, optimiser state) are not finite; nothing is written.
        """
        self.check_finite()
        self.checkpoints.check_finite_weights(state.step)
        self.clock.stop()
        wall = self.wall_time()
        meter = self.meter.state_dict()  # a collective under torchrun: every rank computes it
        self._wall_at_save = wall
        session = {
            "train_time": self.clock.train_time,
            "wall_time": wall,
            "clock": self.clock.state_dict(),
            "last_window": dict(self.last_window),
            "meter": meter,  # the open logging window: a resumed run logs the same means
        }
        self.checkpoints.save(state, session)

    def load_session(self, ckpt: Checkpoint, path: Path) -> None:
        """A resumed run's clock, wall time and logging window, as its checkpoint left them."""
        try:
            self.clock.load_state_dict(ckpt.get("clock", {"train_time": ckpt.get("train_time", 0.0)}))
            self._wall_before = self._wall_at_save = float(ckpt.get("wall_time", 0.0))
            self.last_window = {str(k): float(v) for k, v in ckpt.get("last_window", {}).items()}
            self.meter.load_state_dict(ckpt.get("meter", {}))
        except STATE_ERRORS as err:
            raise state_does_not_fit(path, err) from None

    def check_finite(self) -> None:
        """Stop on a non-finite loss since the last check (one host sync: logging steps and checkpoints only)."""
        try:
            self.meter.check_finite()
        except NonFiniteError as err:
            kept = self.checkpoints.kept_note()
            if err.what == "images":  # the domain made them: no learning rate rescues that
                raise TrainingDivergedError(f"{err} (its generate() returned NaN/inf); {kept}") from None
            raise TrainingDivergedError(f"{err}; {kept}; {self.checkpoints.rescue_note()}") from None

    def wall_time(self) -> float:
        """Wall-clock seconds of this run, over every session."""
        start = self._wall_start
        return self._wall_before + (time.perf_counter() - start if start is not None else 0.0)

    def final_metrics(self, state: TrainState, wall: float) -> dict[str, Any]:
        """``metrics.json``: steps, the last logging window per domain, test accuracies, throughput."""
        window = self.last_window
        return {
            "steps": state.step,
            "epochs": self.length.epochs,
            "budget_of": self.settings.budget_of,
            "epochs_completed": state.epoch,
            "train": {
                s.name: {"loss": window.get(f"loss/{s.name}"), "acc": window.get(f"acc/{s.name}")} for s in self.specs
            },
            "test_acc": state.test_acc,
            "test_acc_main": state.test_acc.get(self.sources[0]),
            "test_acc_ema": state.test_acc_ema if self.update.ema is not None else None,
            "sources": list(self.sources),
            "heads": {CLASSES: self.data.num_classes, **self.checkpoints.heads},
            "init_from": self.init_report,
            **self.clock.summary(),
            "wall_time_s": wall,
            "device": str(self.runtime.device),
            "world_size": self.runtime.dist.world_size,
        }

    def close(self) -> None:
        """Close the progress display and the loggers (TensorBoard's writer threads, scalars.csv)."""
        self.progress.close()
        self.log.close()


#: What to lower when the evaluation forward runs out of memory.
_EVAL_KEYS = "lower data.eval_batch_size"

#: Seconds without a progress line after which a step prints one (a slow domain, a long logging window).
HEARTBEAT_S = 30.0


def _time_split(seconds: dict[str, float]) -> str:
    """``1.23 s (generate: adv 1.1 s, clean 0.00 s)`` from a timed step's seconds."""
    domains = ", ".join(f"{name} {t:.2f} s" for name, t in seconds.items() if name != "step")
    return f"{seconds.get('step', 0.0):.2f} s (generate: {domains}; the rest: forward and backward)"
