"""The results journal: ``results.csv``, its columns, and kill-safe appending.

One row per input file, flushed when the file is complete; an append is all-or-nothing (a
write that fails, e.g. on a full disk, is cut back to the previous length and raises
:class:`~medxray.errors.OutputError`); a reopened journal drops a half-written last line (a kill)
and duplicate rows; :meth:`ResultsJournal.forget` drops rows to redo; :meth:`ResultsJournal.finalize`
rewrites the file sorted by path. :func:`read_results` reads a (possibly damaged) results file back.

Must not import the engine, the workers, torch or DICOM code: only :mod:`medxray.errors`,
:mod:`medxray.fileio` and :mod:`medxray.labels`.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from medxray.errors import ConfigError, output_error
from medxray.fileio import atomic_write_text
from medxray.labels import CHESTXRAY14_FINDINGS

log = logging.getLogger(__name__)

RESULTS_NAME = "results.csv"

BASE_COLUMNS: tuple[str, ...] = (
    "path",
    "status",
    "reason",
    "sop_instance_uid",
    "study_instance_uid",
    "series_instance_uid",
    "modality",
    "view_position",
)
TAIL_COLUMNS: tuple[str, ...] = (
    "positive_findings",
    "model",
    "model_version",
    "warnings",
    "is_lateral",
    "rows",
    "columns",
    "window_center",
    "window_width",
    "cam_dir",
    "sr_file",
    "ood_distance",
)


def result_columns(label_names: Sequence[str]) -> list[str]:
    """The results.csv header for a model with these findings (one ``p_<Finding>`` each)."""
    return [*BASE_COLUMNS, *(f"p_{n}" for n in label_names), *TAIL_COLUMNS]


# The layout for the standard ChestX-ray14 head; a checkpoint with other labels gets its own.
RESULT_COLUMNS: list[str] = result_columns(CHESTXRAY14_FINDINGS)


def read_results(
    path: str | os.PathLike, columns: Sequence[str] | None = None
) -> tuple[list[str], list[list[str]], int]:
    """Complete rows of a results file: (header, rows, number of damaged/duplicate lines dropped).

    Only the last line can be damaged (a kill during a write); it is dropped, as is any row
    whose path already appeared (first one wins).
    """
    text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    end = text.rfind("\n")
    complete = text[: end + 1] if end >= 0 else ""
    dropped = 1 if len(text) > len(complete) else 0
    reader = csv.reader(io.StringIO(complete, newline=""))
    header = next(reader, None) or []
    if columns is not None and header and header != list(columns):
        raise ConfigError(
            f"{path} has another column layout (another model or medxray version); "
            "use a new --out folder or --overwrite"
        )
    rows: list[list[str]] = []
    seen: set[str] = set()
    try:
        for rec in reader:
            if len(rec) != len(header) or not rec[0]:
                dropped += 1
                continue
            if rec[0] in seen:
                dropped += 1
                continue
            seen.add(rec[0])
            rows.append(rec)
    except csv.Error:
        dropped += 1
    return header, rows, dropped


def csv_text(header: Sequence[str] | None, rows: Iterable[Sequence[str]]) -> str:
    """CSV text with ``\\n`` line ends: the header (unless None), then the rows."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    if header is not None:
        w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


class ResultsJournal:
    """Append-only results.csv: one flushed line per finished file, cleaned up on reopen.

    Raises :class:`~medxray.errors.OutputError` (one line, exit 2) when the folder is read-only or
    full; the file then holds only whole rows.
    """

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path = path
        self.columns = list(columns)
        self.done: dict[str, list[str]] = {}
        try:
            self._open()
        except OSError as exc:
            raise (output_error(exc, path.parent) or exc) from None
        self._since_sync = 0

    def _open(self) -> None:
        path = self.path
        if path.exists() and path.stat().st_size > 0:
            header, rows, dropped = read_results(path, self.columns)
            if not header:
                rows = []
            self.done = {r[0]: r for r in rows}
            if dropped or not header:
                log.info("results: dropped %d incomplete or duplicate line(s) left by an interrupted run", dropped)
                atomic_write_text(path, csv_text(self.columns, rows))
        else:
            atomic_write_text(path, csv_text(self.columns, []))
        # unbuffered: each row goes to the OS in one piece (survives a kill of this process)
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND)

    def write(self, row: dict[str, Any]) -> None:
        """Append one row, all or nothing: on a failed write the file is cut back to its length
        before, and :class:`~medxray.errors.OutputError` (full or read-only folder) is raised."""
        rec = [cell_text(row.get(c, "")) for c in self.columns]
        if rec[0] in self.done:
            return
        assert self._fd is not None, "journal is closed"
        data = memoryview(csv_text(None, [rec]).encode("utf-8", errors="surrogateescape"))
        before = os.fstat(self._fd).st_size
        try:
            while data:
                data = data[os.write(self._fd, data) :]
            self._since_sync += 1
            if self._since_sync >= 64:
                os.fsync(self._fd)
                self._since_sync = 0
        except OSError as exc:
            try:
                os.ftruncate(self._fd, before)  # never half a row (frees the space it took)
            except OSError:
                pass  # a reopened journal drops the damaged last line anyway
            raise (output_error(exc, self.path.parent) or exc) from None
        self.done[rec[0]] = rec

    def forget(self, paths: Iterable[str]) -> int:
        """Drop the rows of ``paths`` (to be redone), rewriting the file atomically; returns how many."""
        drop = {p for p in paths if p in self.done}
        if drop:
            for p in drop:
                del self.done[p]
            self._rewrite(sorted(self.done.values(), key=lambda r: r[0]))
            if self._fd is not None:  # the rewrite replaced the file: append to the new one
                os.close(self._fd)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        return len(drop)

    def _rewrite(self, rows: list[list[str]]) -> None:
        try:
            atomic_write_text(self.path, csv_text(self.columns, rows))
        except OSError as exc:
            raise (output_error(exc, self.path.parent) or exc) from None

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            except OSError:
                pass  # every row already reached the OS; a full disk here must not hide the real error
            finally:
                os.close(fd)

    def finalize(self, keep: Callable[[str], bool] | None = None) -> list[list[str]]:
        """Close and rewrite sorted by path; returns the rows (optionally only those ``keep`` accepts).

        The sorted rewrite needs room for a second copy: on a full or read-only folder the
        unsorted file (whole rows) stays and :class:`~medxray.errors.OutputError` is raised.
        """
        self.close()
        rows = sorted(self.done.values(), key=lambda r: r[0])
        self._rewrite(rows)
        return [r for r in rows if keep is None or keep(r[0])]


def cell_text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return s.replace("\r", " ").replace("\n", " ") if ("\n" in s or "\r" in s) else s
