"""The training loop: *when* each part runs. It builds nothing (:func:`mbn.train.build.build_trainer` does).

Every epoch's batches come in a fixed order from ``(trainer.seed, epoch)``; every ``optim.grad_accum_steps`` of them
make one optimisation step (:meth:`Trainer.train_step`): the update opens its ledger, the step runs each micro-batch
(:mod:`mbn.train.step`), the update applies the gradients (:mod:`mbn.train.update`), the hooks log, evaluate and
checkpoint (:mod:`mbn.train.hooks`), and the ranks agree whether a stop signal ends the run
(:mod:`mbn.train.preemption`).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from mbn.data import DataBundle
from mbn.distributed import DistContext
from mbn.rundir import RunLock
from mbn.train.checkpoints import RunCheckpoints
from mbn.train.hooks import TrainHooks
from mbn.train.preemption import Preemption
from mbn.train.runtime import Batch, Runtime
from mbn.train.state import RunLength, TrainState
from mbn.train.step import MultiDomainStep, StepOutput, StepStats
from mbn.train.update import Update


class Trainer:
    """Trains what :func:`~mbn.train.build.build_trainer` assembled from a recipe: ``fit()`` until the run's end.

    The trainer holds ``run_dir``'s lock (:class:`mbn.rundir.RunLock`, rank 0) until :meth:`fit` returns or
    :meth:`close` is called. Under ``torchrun`` every rank builds a trainer and trains its shard of each epoch.
    """

    def __init__(
        self,
        *,
        cfg: DictConfig,
        run_dir: Path,
        data: DataBundle,
        runtime: Runtime,
        step: MultiDomainStep,
        update: Update,
        hooks: TrainHooks,
        checkpoints: RunCheckpoints,
        length: RunLength,
        state: TrainState | None = None,
        resumed: bool = False,
        lock: RunLock | None = None,
    ) -> None:
        self.cfg, self.run_dir, self.data, self.runtime = cfg, Path(run_dir), data, runtime
        self.step, self.update, self.hooks, self.checkpoints, self.length = step, update, hooks, checkpoints, length
        self.state = state or TrainState()
        self.resumed, self.lock = resumed, lock
        self.preemption = Preemption(runtime.dist)
        self._timed = False  # whether this session's first step was timed

    # ------------------------------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train until ``trainer.epochs`` or ``trainer.max_steps``; returns the final metrics."""
        state, length = self.state, self.length
        try:
            finished = length.done(state) or state.epoch >= length.epochs
            idle = self.resumed and finished and state.evaluated_step == state.step
            if idle and self.dist.is_main:  # a finished run: its config.yaml keeps the recipe it was trained with
                print(self._nothing_to_train(), flush=True)
            self.hooks.start(state, resumed=self.resumed, idle=idle)
            save = lambda: self.checkpoints.save_on_every_rank(self.save_checkpoint)  # noqa: E731
            with self.preemption.guard(save, self.run_dir, lambda: state.step):
                while state.epoch < length.epochs and not length.done(state) and not self.stopping:
                    self.train_one_epoch(state.epoch)
                    if length.epoch_done(state):
                        state.epoch, state.batch = state.epoch + 1, 0
                        self.hooks.after_epoch(state)
                if not self.stopping and state.evaluated_step != state.step:  # max_steps mid-epoch
                    self.hooks.evaluate(state)
                    self.save_checkpoint()
            return self.hooks.finish(state, idle=idle)
        finally:
            self.close()

    def train_one_epoch(self, epoch: int) -> None:
        """Train on ``epoch``'s batches from ``state.batch`` on; returns early at max_steps or on a stop signal.

        Each optimisation step takes ``optim.grad_accum_steps`` batches (micro-batches): every one is generated,
        forwarded (BN statistics per micro-batch) and back-propagated on its own, and the step applies their
        summed gradients, scaled to the mean over all of them. An epoch's last incomplete group is dropped.
        """
        self.model.train()
        self.hooks.clock.start()
        batches = self.data.train.epoch_batches(epoch, self.state.batch)
        stack = contextlib.ExitStack()
        if hasattr(batches, "close"):  # the loader's workers stop when the step count is reached or on a return
            stack.callback(batches.close)
        with stack:
            remaining = itertools.islice(batches, max(0, self.length.batches_per_epoch - self.state.batch))
            for group in _groups(remaining, self.length.accum_steps):
                last, stats = self.train_step(group)
                self.hooks.after_step(self.state, last, stats)
                self.preemption.agree()
                if self.length.done(self.state) or self.stopping:
                    return

    def train_step(self, group: Sequence[Batch]) -> tuple[StepOutput, list[StepStats]]:
        """One optimisation step over ``group``'s micro-batches.

        Returns the last micro-batch's output (its batches feed the image grids) and every micro-batch's statistics;
        an earlier micro-batch's images are released once the next one's output replaces it.
        """
        ledger = self.update.begin()
        stats = []
        timed = not self._timed  # a session's first step: its time per domain is logged (a slow one shows at once)
        self._timed = True
        for micro, batch in enumerate(group):
            at = self.step.position(self.state.step, self.state.epoch, micro)
            with self.runtime.no_sync(keep_local=micro < len(group) - 1):  # DDP: one all-reduce per step
                out = self.step.run(batch, at, ledger, timed=timed and micro == 0)
            stats.append(out.stats)
        self.update.apply(ledger, self.state.step + 1)
        self.state.step += 1
        self.state.batch += len(group)
        return out, stats

    def save_checkpoint(self) -> None:
        """``last.pt`` (and ``best.pt``) now (:meth:`TrainHooks.save_checkpoint`)."""
        self.hooks.save_checkpoint(self.state)

    def close(self) -> None:
        """Close the logs, drop DDP and release the run directory's lock."""
        self.hooks.close()
        self.runtime.close()
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------- read-only
    @property
    def model(self) -> nn.Module:
        """The trained model (unwrapped)."""
        return self.runtime.model

    @property
    def dist(self) -> DistContext:
        """This process's place among the ranks."""
        return self.runtime.dist

    @property
    def sources(self) -> tuple[str, ...]:
        """The BN sources, main first."""
        return self.checkpoints.sources

    @property
    def ckpt_dir(self) -> Path:
        """``RUN/checkpoints``."""
        return self.checkpoints.dir

    @property
    def stopping(self) -> bool:
        """A stop signal was taken (agreed by every rank under torchrun): the trainer checkpoints and stops."""
        return self.preemption.stopping

    @property
    def epoch_done(self) -> bool:
        """Every optimisation step of the current epoch is done."""
        return self.length.epoch_done(self.state)

    def _nothing_to_train(self) -> str:
        max_steps = self.length.max_steps
        return (
            f"mbn-train: nothing to train: the run is at step {self.state.step} (epoch {self.state.epoch}) "
            f"and this recipe stops at {self.length.planned_steps} steps ({self.length.epochs} epochs"
            + (f", trainer.max_steps={max_steps})" if max_steps else ")")
            + "; raise trainer.epochs or trainer.max_steps to train on"
        )


def _groups(batches: Iterator[Batch], k: int) -> Iterator[list[Batch]]:
    """``k`` batches at a time; a last incomplete group is dropped."""
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == k:
            yield group
            group = []
