"""Exceptions a training run ends with, and the one-line messages mbn prints instead of tracebacks.

Kept free of heavy imports so the command-line tools can catch them before importing torch.
"""

from __future__ import annotations

import signal

#: Signals that stop training after the current step with a checkpoint (Ctrl-C; SLURM/Kubernetes preemption).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class RecipeError(ValueError):
    """A recipe or override is invalid; the message names the key (or file) and what was expected."""


class TrainingDivergedError(RuntimeError):
    """A domain's loss became NaN/inf; the last good checkpoint is kept."""


class TrainingInterruptedError(RuntimeError):
    """SIGINT (Ctrl-C), SIGTERM or SIGHUP: a checkpoint was saved and the run can be resumed.

    ``exit_code`` is the shell convention for the signal, 128 + its number (130 for Ctrl-C).
    """

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)


class StopSignal(BaseException):
    """SIGINT, SIGTERM or SIGHUP outside the trainer's own handling (before training, or a second one)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class DomainError(RuntimeError):
    """A domain plugin failed or returned something the trainer cannot train on; the message names it."""


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (an OSError's reason), else its type name."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def one_line(err: BaseException) -> str:
    """An exception's message on one line; one re-raised from a DataLoader worker gives the worker's own message."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:  # torch's worker ExceptionWrapper
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.splitlines()) if text else type(err).__name__
