"""The run directory's rules: one writer at a time, never overwrite another run, no orphaned temp files.

A training process holds an exclusive POSIX record lock (``fcntl.lockf``) on ``RUN_DIR/.lock`` from before it
reads or writes anything in the directory until it exits. The kernel drops the lock the moment the process dies,
even by ``kill -9``, and unlike ``flock`` a record lock is not inherited by forked DataLoader workers, so a stale
lock never blocks a resume. Within one process a registry of held directories refuses a second trainer. A
second process on the same directory is refused with one line naming the holder's pid. A new run refuses a
directory that already holds run files.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path
from types import TracebackType

from mbn.fileio import remove_stale_temps

LOCK_FILE = ".lock"
#: What a run writes; any of them in a directory means it holds (part of) a run.
RUN_FILES = ("config.yaml", "checkpoints", "best", "metrics.json", "tb", "scalars.csv", "trackers.json", "wandb")


class RunDirError(ValueError):
    """The run directory is in use by another process or already holds a run."""


class RunLock:
    """Exclusive lock of one run directory for the life of this object (or of the process)."""

    _held: set[str] = set()  # lock files this process holds (record locks never conflict within a process)

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._key = ""

    def acquire(self) -> RunLock:
        """Take the lock without waiting.

        Raises:
            RunDirError: another process (or trainer) holds it, or the lock file cannot be created.
        """
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; mbn runs unlocked there
            return self
        if self._fd is not None:
            return self
        fd = self._open()
        key = f"{os.fstat(fd).st_dev}:{os.fstat(fd).st_ino}"
        try:
            if key in RunLock._held:
                raise BlockingIOError
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
            os.close(fd)
            if key in RunLock._held:
                holder = f"pid {os.getpid()}, this process"
            raise RunDirError(
                f"{self.run_dir} is in use by another training process ({holder}); "
                "wait for it to end or choose another trainer.out_dir"
            ) from None
        with contextlib.suppress(OSError):  # the pid is for the message above only: a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd, self._key = fd, key
        RunLock._held.add(key)
        return self

    def _open(self) -> int:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)  # minus umask
        except OSError as err:
            why = "it is a symlink" if os.path.islink(self.path) else err.strerror
            raise RunDirError(f"{self.path}: cannot open the run directory's lock file ({why})") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            os.close(fd)
            raise RunDirError(f"{self.path}: the run directory's lock file is not a plain file (a link or special)")
        return fd

    def release(self) -> None:
        """Drop the lock (also dropped by the kernel when the process exits)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the record lock
            RunLock._held.discard(self._key)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def missing_dirs(path: str | Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, outermost first (what ``mkdir(parents=True)`` would create).

    The path is resolved first, so ``new/../kept`` names ``kept`` (which exists), never a directory to remove.
    """
    missing = []
    path = Path(path).resolve()
    for directory in (path, *path.parents):
        if os.path.lexists(directory):
            break
        missing.append(directory)
    return missing[::-1]


class NewRunDir:
    """What a new run creates before it starts training: directories and the lock file, removed if it never starts.

    A recipe, data or model error found while the trainer is built must leave nothing behind. Record the
    directories (:meth:`before_creating`) and the lock file (:meth:`lock_in`) just before they are made;
    :meth:`undo` then removes the lock file (only while holding its lock, so another run's is never removed) and
    each recorded directory that is still empty. Nothing that existed before is touched.
    """

    def __init__(self) -> None:
        self.dirs: list[Path] = []  # outermost first
        self.lock_file: Path | None = None

    def before_creating(self, path: str | Path) -> None:
        """Record ``path`` and its parents that do not exist yet (call just before creating them)."""
        self.dirs += [d for d in missing_dirs(path) if d not in self.dirs]

    def created(self, path: str | Path) -> None:
        """Record a directory this process has just created."""
        if Path(path) not in self.dirs:
            self.dirs.append(Path(path))

    def lock_in(self, run_dir: str | Path) -> None:
        """Record the run's lock file, unless one exists already (another run's, or left by an earlier one)."""
        path = Path(run_dir) / LOCK_FILE
        self.lock_file = None if os.path.lexists(path) else path

    def undo(self) -> None:
        """Remove the recorded lock file and the recorded directories still empty, innermost first; never raises."""
        lock_file, self.lock_file = self.lock_file, None
        if lock_file is not None and lock_file.is_file() and not lock_file.is_symlink():
            try:
                with RunLock(lock_file.parent):  # refused while another process holds it: its lock file stays
                    lock_file.unlink()
            except (RunDirError, OSError):
                pass
        dirs, self.dirs = self.dirs, []
        for directory in reversed(dirs):
            try:
                directory.rmdir()  # only an empty directory
            except OSError:
                break


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


#: Files whose interrupted atomic writes leave ``.<name>.<random>.tmp`` behind.
WRITTEN_FILES = {
    # scalars.csv: its resume rewrite
    ".": ("config.yaml", "metrics.json", "eval.json", "eval.md", "scalars.csv", "trackers.json"),
    "checkpoints": ("last.pt", "best.pt"),
    "best": ("ledger.json", "step-*.pt"),  # trainer.keep_best_k (mbn.train.checkpoints.KeptCheckpoints)
}


def clean_run_dir(run_dir: str | Path) -> list[Path]:
    """Remove temporary files an interrupted write of mbn's own files left (call while holding the lock)."""
    run_dir = Path(run_dir)
    return [p for sub, names in WRITTEN_FILES.items() for p in remove_stale_temps(run_dir / sub, names)]
