"""``scalars.csv``: every scalar a run logs, in long format, for pandas, spreadsheets and plotting scripts.

One row per value, ``step,tag,value``, under a header written once::

    step,tag,value
    1,loss/clean,2.3025851249694824
    1,lr,0.1

Tags are the canonical tags of :mod:`mbn.logger` (``loss/<domain>``, ``acc_test/<bn>``, ...); values are
written at full precision (``repr`` of the
float: it reads back bit for bit), never rounded. ``pandas.read_csv(path).pivot(index="step", columns="tag",
values="value")`` gives one column per tag.

Rows are appended and flushed at every call, so a crash loses at most the row being written; a resumed run calls
:meth:`CsvScalarLog.truncate_after` with the step of its checkpoint, which rewrites the file atomically without
the rows the resumed run logs again (and without a partial last line). Like TensorBoard, the CSV is a view of
the run, not part of it: when it cannot be written (a full disk) one line is printed and logging to it stops;
training goes on.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

from mbn.errors import first_line
from mbn.fileio import atomic_write_text
from mbn.logger import RunLogger

HEADER = ("step", "tag", "value")


class CsvScalarLog(RunLogger):
    """Append ``step,tag,value`` rows to ``path``; a disabled log does nothing.

    The file is opened on the first write (appending to what a resumed run kept), line buffered and flushed at
    every :meth:`scalars` call.

    Args:
        path: The CSV file (``RUN_DIR/scalars.csv``); its directory is created when needed.
        enabled: False: write nothing (the other ranks of a distributed run).
    """

    name = "scalars.csv"

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._file: IO[str] | None = None
        self._writer: Any = None  # a csv.writer over self._file

    # ------------------------------------------------------------------------------------------- writing
    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Append one row per ``{tag: value}`` at ``step``, then flush."""
        if not self.enabled or not values:
            return
        try:
            writer = self._open()
            for tag, value in values.items():
                writer.writerow((int(step), tag, repr(float(value))))
            assert self._file is not None
            self._file.flush()
        except (OSError, ValueError) as err:  # ValueError: a file closed under us
            self._stop(err)

    def _open(self) -> Any:
        if self._writer is not None:
            return self._writer
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_line(self.path)  # a crash mid-row: the next row must start on its own line
        self._file = open(self.path, "a", newline="", encoding="utf-8", buffering=1)  # noqa: SIM115 (kept open)
        self._writer = csv.writer(self._file, lineterminator="\n")
        if self._file.tell() == 0:
            self._writer.writerow(HEADER)
        return self._writer

    def _stop(self, err: BaseException) -> None:
        self.enabled = False
        self._close_file()
        print(f"mbn: CSV scalar log stopped: cannot write {self.path} ({first_line(err)})", file=sys.stderr)

    # -------------------------------------------------------------------------------------------- resume
    def resume_at(self, step: int) -> None:
        """A resumed run logs the steps after ``step`` again: the rows after it are dropped (:meth:`truncate_after`)."""
        self.truncate_after(step)

    def truncate_after(self, step: int) -> None:
        """Keep only the rows with ``step <= step``: a resumed run logs the later steps again.

        The file is rewritten atomically (the old one stays whole if that fails); a missing file is left missing;
        a partial last line (a crash mid-write) and any row that does not parse are dropped. Call it before the
        resumed run logs anything.
        """
        if not self.enabled:
            return
        self._close_file()
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as err:
            self._stop(err)
            return
        kept = [row for row in _complete_rows(data) if row[0] <= step]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows((s, tag, text) for s, tag, text in kept)
        try:
            atomic_write_text(self.path, out.getvalue())
        except OSError as err:  # WriteError is an OSError
            self._stop(err)

    # ------------------------------------------------------------------------------------------ closing
    def flush(self) -> None:
        """Flush the file (rows are already flushed at every call)."""
        if self._file is not None:
            try:
                self._file.flush()
            except (OSError, ValueError) as err:
                self._stop(err)

    def close(self) -> None:
        """Close the file; a later :meth:`scalars` call reopens it for appending."""
        self.flush()
        self._close_file()

    def _close_file(self) -> None:
        file, self._file, self._writer = self._file, None, None
        if file is not None:
            with suppress(OSError, ValueError):  # already reported, or nothing left to lose
                file.close()


def read_scalars(path: Path) -> list[tuple[int, str, float]]:
    """The ``(step, tag, value)`` rows of a ``scalars.csv`` (a partial last line left out)."""
    return [(step, tag, float(text)) for step, tag, text in _complete_rows(Path(path).read_bytes())]


def _complete_rows(data: bytes) -> list[tuple[int, str, str]]:
    """Rows of complete lines: the part after the last newline is a row cut by a crash, even when it parses."""
    end = data.rfind(b"\n")
    text = data[: end + 1].decode("utf-8", errors="replace")
    rows: list[tuple[int, str, str]] = []
    for fields in csv.reader(io.StringIO(text, newline="")):
        if len(fields) != 3 or tuple(fields) == HEADER:
            continue
        try:
            step, _ = int(fields[0]), float(fields[2])
        except ValueError:
            continue
        rows.append((step, fields[1], fields[2]))
    return rows


def _drop_partial_line(path: Path) -> None:
    """Cut a last line without its newline (a crash mid-row) off ``path``, in place; nothing if none."""
    try:
        with open(path, "rb+") as f:
            size = f.seek(0, io.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            chunk = 1 << 16
            pos = size
            while pos > 0:  # find the last newline, reading backwards
                start = max(0, pos - chunk)
                f.seek(start)
                found = f.read(pos - start).rfind(b"\n")
                if found >= 0:
                    f.truncate(start + found + 1)
                    return
                pos = start
            f.truncate(0)
    except FileNotFoundError:
        return
