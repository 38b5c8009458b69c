"""Atomic file writes: the one way mbn writes a file that a later run or evaluation reads.

Every write goes to a temporary file in the target's directory (``.<name>.<random>.tmp``), is flushed and
fsync'ed, then moved over the target with ``os.replace`` and the directory entry fsync'ed. A crash, a kill or
a full disk at any point leaves either the old file or the new one, never a truncated mix; a failed write
removes its temporary file and raises :class:`WriteError` with one line naming the file and the cause.
Temporary files orphaned by ``kill -9`` are removed by :func:`remove_stale_temps` when a run starts.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from mbn.errors import first_line

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file


class WriteError(OSError):
    """A file could not be written (disk full, permissions, ...); the previous version is intact."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code  # ENOSPC for a full disk


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(f)`` on a binary temporary file next to ``path``, then move it over ``path``.

    Raises:
        WriteError: the write, flush, fsync or rename failed; ``path`` is unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as err:
        blocked = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocked} is not a directory" if blocked is not None else _reason(err)
        raise WriteError(f"cannot write {path}: {why}", err.errno) from None
    try:
        os.fchmod(fd, _FILE_MODE)  # mkstemp makes 0600; results are for the whole group to read
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)):  # torch.save reports an OSError as a RuntimeError
            raise WriteError(f"cannot write {path}: {_reason(err)}; the previous file is intact", _errno(err)) from err
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temps(directory: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Delete temporary files an interrupted :func:`atomic_write` of ``directory/<name>`` left; returns them.

    Only ``.<name>.<random>.tmp`` files of the given names are touched. Call only while no other process
    writes there (mbn holds the run directory's lock).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for name in names for p in directory.glob(f".{name}.*{TEMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def _errno(err: BaseException) -> int:
    cause = _os_error(err)
    return cause.errno if cause is not None and cause.errno is not None else errno.EIO


def _os_error(err: BaseException | None) -> OSError | None:
    seen = 0
    while err is not None and seen < 10:  # torch wraps the OSError of a failed write in a RuntimeError
        if isinstance(err, OSError):
            return err
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def _reason(err: BaseException) -> str:
    os_err = _os_error(err)
    if os_err is not None and os_err.errno is not None:
        return os.strerror(os_err.errno)
    return first_line(err)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported (e.g. Windows); the rename itself is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
