"""The run directory's rules: one writer at a time, never overwrite another run, no orphaned temp files.

A training process holds an exclusive lock on ``RUN_DIR/.lock`` (``fcntl.flock``) from before it reads or
writes anything in the directory until it exits; the kernel drops the lock when the process dies, even by
``kill -9``, so a stale lock never blocks a resume. A second process on the same directory is refused with
one line naming the holder's pid. A new run refuses a directory that already holds run files.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import TracebackType

from mbn.fileio import remove_stale_temps

LOCK_FILE = ".lock"
#: What a run writes; any of them in a directory means it holds (part of) a run.
RUN_FILES = ("config.yaml", "checkpoints", "metrics.json", "tb")


class RunDirError(ValueError):
    """The run directory is in use by another process or already holds a run."""


class RunLock:
    """Exclusive lock of one run directory for the life of this object (or of the process)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock without waiting.

        Raises:
            RunDirError: another process holds it (the message names its pid and host).
        """
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; mbn runs unlocked there
            return self
        if self._fd is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunDirError(f"{self.run_dir}: cannot create the run directory's lock ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown pid"
            os.close(fd)
            raise RunDirError(
                f"{self.run_dir} is in use by another training process ({holder}); "
                "wait for it to end or choose another trainer.out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (also dropped by the kernel when the process exits)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def check_new_run_dir(run_dir: str | Path) -> None:
    """A new run may not write into a directory that holds another run's files, finished or not.

    Raises:
        RunDirError: the directory holds a run (resume it) or an unfinished one with no checkpoint (delete it).
    """
    run_dir = Path(run_dir)
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found:
        return
    if (run_dir / "checkpoints" / "last.pt").is_file():
        raise RunDirError(
            f"key 'trainer.out_dir': {run_dir} already holds a run; resume it with "
            f"`mbn-train --resume {run_dir}` or choose another out_dir"
        )
    raise RunDirError(
        f"key 'trainer.out_dir': {run_dir} holds an unfinished run with no checkpoint ({', '.join(found)}); "
        "delete it or choose another out_dir"
    )


def clean_run_dir(run_dir: str | Path) -> list[Path]:
    """Remove temporary files an interrupted write left in the run directory (call while holding its lock)."""
    run_dir = Path(run_dir)
    return remove_stale_temps(run_dir) + remove_stale_temps(run_dir / "checkpoints")
