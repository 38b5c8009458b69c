"""Every rule about stop signals (Ctrl-C, SLURM/Kubernetes preemption) in one place.

- Before the trainer takes over, and after its first signal, SIGINT/SIGTERM/SIGHUP raise :class:`StopSignal`
  (:func:`signals_raise`, installed by ``mbn-train``): nothing is trained yet, or a second signal aborts.
- While the trainer trains (:meth:`Preemption.guard`), a signal finishes the current step, a checkpoint is saved
  and :class:`~mbn.errors.TrainingInterruptedError` says how to resume; a second signal acts as it would without
  mbn. Under torchrun the ranks agree on a stop after every step (a host-side max over the ranks), and repeats of
  the same preemption (SLURM signals every process; the agent forwards it again, and SIGTERMs the others once one
  rank exits) are absorbed until the ranks have stopped.
- A signal the user ignored (``nohup``, ``trap '' TERM``) stays ignored.
- DataLoader workers are forked with these signals blocked (:func:`stop_signals_blocked`) and then ignore them
  (:func:`ignore_stop_signals_in_worker`): a preemption reaching the whole process group must not kill a worker
  before the main process has saved its checkpoint and shut the workers down.

:mod:`mbn.data`'s loaders call the last two; this module imports nothing of the training loop, so they can.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mbn.distributed import DistContext, resume_command
from mbn.errors import STOP_SIGNALS, StopSignal, TrainingInterruptedError


def ignore_stop_signals_in_worker() -> None:
    """In a DataLoader worker: ignore stop signals (and drop those pending since the fork)."""
    stops = set(STOP_SIGNALS)
    for sig in stops:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # forked with them blocked (stop_signals_blocked): pending ones dropped
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """Hold stop signals while DataLoader workers are forked (delivered to this process when the block ends).

    A scheduler's SIGTERM to the process group could otherwise reach a worker between its fork and
    :func:`ignore_stop_signals_in_worker`, kill it, and fail the run instead of saving it.
    """
    if not hasattr(signal, "pthread_sigmask") or not in_main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def in_main_thread() -> bool:
    """Signal handlers can only be installed from the main thread."""
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signals_raise(absorb: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """Until the trainer takes over (and after its first signal), SIGINT/SIGTERM/SIGHUP raise :class:`StopSignal`.

    A signal arriving while ``absorb()`` is true is dropped.
    """
    if not in_main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        if not absorb():
            raise StopSignal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Preemption:
    """The trainer's stop requests: taken from signals, agreed by every rank, acted on between steps."""

    def __init__(self, dist: DistContext) -> None:
        self.dist = dist
        self.received: int | None = None  # the signal this process received
        self.signal: int | None = None  # the stop every rank agreed on (a single process: the signal received)
        # under torchrun (its agent exports TORCHELASTIC_RUN_ID): the agent; gone (kill -9), the ranks checkpoint and
        # stop. Ranks started otherwise (RANK/WORLD_SIZE by hand, a launcher that exits) are not watched.
        self.parent = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        self.orphaned = False

    @property
    def stopping(self) -> bool:
        """A stop signal was taken (agreed by every rank under torchrun): the trainer checkpoints and stops."""
        return self.signal is not None

    def agree(self) -> None:
        """Under torchrun, a signal received by any rank stops every rank after the same step (host-side flag).

        A rank whose torchrun agent is gone (killed with SIGKILL: no signal reaches the ranks) stops as if it had
        received SIGTERM, so no rank trains on unsupervised holding the run directory's lock.
        """
        if self.dist.enabled:
            if self.received is None and self.parent is not None and os.getppid() != self.parent:
                self.received, self.orphaned = int(signal.SIGTERM), True
            self.signal = self.dist.max_flag(self.received or 0) or None

    @contextlib.contextmanager
    def guard(self, save: Callable[[], None], run_dir: Path, step: Callable[[], int]) -> Iterator[None]:
        """Train inside: a stop signal finishes the step, ``save()`` runs once, and the block ends interrupted.

        Raises:
            TrainingInterruptedError: after the checkpoint, naming the signal, the step and the resume command.
        """
        if sys.platform == "win32" or not in_main_thread():
            yield
            return
        previous: dict[int, Any] = {}

        def request_stop(signum: int, frame: object) -> None:
            self.received = signum
            if self.dist.enabled:  # the ranks agree after the step; a repeat of the same preemption is no abort
                return
            self.signal = signum
            for sig, handler in previous.items():  # a second signal acts as it would without mbn
                signal.signal(sig, handler)

        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup / trap '' TERM: the user said ignore it
                previous[sig] = signal.signal(sig, request_stop)
        try:
            yield
            self.agree()  # a signal after the last step's agreement (every rank gets here)
            if self.signal is not None:
                save()  # still under request_stop: a repeat (or the agent's SIGTERM) cannot cut the save short
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self.signal is not None:
            why = (
                f"the torchrun agent (pid {self.parent}) is gone" if self.orphaned else signal.Signals(self.signal).name
            )
            raise TrainingInterruptedError(
                f"{why} at step {step()}; checkpoint saved, resume with: {resume_command(run_dir)}",
                self.signal,
            )
