"""The node's on-disk state: received instances, the engine's input, the outbox and the ledgers.

Layout under ``work_dir`` (all writes atomic: temporary file + fsync + rename)::

    incoming/<study>/<series>/<sop>.dcm   received; the series may still be growing
    inbox/<study>/<series>/<sop>.dcm      series that went idle: the scoring engine's input folder
    scored/                               the engine's output (results.csv, run.json, cams/)
    outbox/<result sop>.dcm               SR / Secondary Capture objects waiting for a C-STORE
    node.csv                              the node's own rows: ``skipped`` (non-image objects, accepted
                                          but never scored) and ``no_result`` (scored, but the source's
                                          UIDs cannot be referenced)
    queued.log                            inbox files whose result objects are in the outbox
    sent.log                              result SOP Instance UIDs the destination acknowledged

File names are SOP Instance UIDs, so a duplicate send replaces a file with itself (idempotent).
A kill at any moment loses nothing: every state change is one rename or one flushed line.
Must not import pynetdicom, torch or the scoring engine.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from medxray.dicom.sr import is_valid_uid
from medxray.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

NODE_CSV = "node.csv"
NODE_COLUMNS = ("path", "status", "reason", "sop_instance_uid", "study_instance_uid",
                   "series_instance_uid", "modality", "sop_class_uid")


def path_name(uid: object) -> str:
    """A file/folder name for a UID: the UID itself when valid, else a stable hash of what was sent."""
    s = str(uid or "")
    if is_valid_uid(s):
        return s
    return "invalid-" + hashlib.sha1(s.encode("utf-8", "surrogateescape")).hexdigest()[:16] if s else "missing"


class Ledger:
    """An append-only set of lines (one flushed + fsynced line per entry); survives kill -9."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.items: set[str] = set()
        if path.exists():
            text = path.read_text(encoding="utf-8", errors="replace")
            complete = text[: text.rfind("\n") + 1]  # a half-written last line is dropped
            self.items = {ln for ln in complete.splitlines() if ln}

    def __contains__(self, item: str) -> bool:
        return item in self.items

    def add(self, item: str) -> None:
        with self._lock:
            if item in self.items:
                return
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(item + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self.items.add(item)


class Spool:
    """Thread-safe access to the node's folders; the SCP thread stores, the main loop promotes."""

    def __init__(self, work_dir: str | os.PathLike) -> None:
        self.work = Path(work_dir)
        self.incoming = self.work / "incoming"
        self.inbox = self.work / "inbox"
        self.scored = self.work / "scored"
        self.outbox = self.work / "outbox"
        for d in (self.incoming, self.inbox, self.scored, self.outbox):
            d.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.sent = Ledger(self.work / "sent.log")
        self.queued = Ledger(self.work / "queued.log")
        self._recorded = Ledger(self.work / "node.keys")
        now = time.monotonic()
        # series left in incoming/ by an earlier run restart their idle clock now
        self.last_seen: dict[Path, float] = {p.relative_to(self.incoming): now
                                             for p in self.incoming.glob("*/*") if p.is_dir()}

    # -- receiving -------------------------------------------------------------------------

    def store(self, data: bytes, study_uid: object, series_uid: object, sop_uid: object,
              direct: bool = False) -> Path:
        """Write one instance (complete DICOM file bytes) into incoming/ (or straight into inbox/
        with ``direct``, for pull mode), atomically; an existing file is replaced (idempotent)."""
        rel = Path(path_name(study_uid)) / path_name(series_uid)
        with self.lock:
            dest = (self.inbox if direct else self.incoming) / rel / f"{path_name(sop_uid)}.dcm"
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(dest, data)
            if not direct:
                self.last_seen[rel] = time.monotonic()
        return dest

    def record(self, row: dict[str, str]) -> bool:
        """One row in ``node.csv`` per instance and status (a re-send is not recorded twice)."""
        key = f"{row.get('status', '')}:{row.get('sop_instance_uid') or row.get('path', '')}"
        if key in self._recorded:
            return False
        with self.lock:
            path = self.work / NODE_CSV
            new = not path.exists()
            with open(path, "a", encoding="utf-8", newline="") as fh:
                w = csv.writer(fh, lineterminator="\n")
                if new:
                    w.writerow(NODE_COLUMNS)
                w.writerow([str(row.get(c, "")).replace("\n", " ") for c in NODE_COLUMNS])
                fh.flush()
                os.fsync(fh.fileno())
        self._recorded.add(key)
        return True

    # -- batching --------------------------------------------------------------------------

    def pending_series(self) -> int:
        return len(self.last_seen)

    def promote_idle(self, idle_seconds: float, now: float | None = None) -> int:
        """Move every series idle for ``idle_seconds`` from incoming/ to inbox/; returns files moved."""
        now = time.monotonic() if now is None else now
        moved = 0
        with self.lock:
            for rel, seen in list(self.last_seen.items()):
                if now - seen < idle_seconds:
                    continue
                src = self.incoming / rel
                dst = self.inbox / rel
                dst.mkdir(parents=True, exist_ok=True)
                for f in sorted(src.glob("*.dcm")) if src.is_dir() else []:
                    os.replace(f, dst / f.name)  # same file system: atomic
                    moved += 1
                for d in (src, src.parent):
                    try:
                        d.rmdir()
                    except OSError:
                        pass
                del self.last_seen[rel]
        if moved:
            _fsync_dir(self.inbox)
        return moved

    def inbox_files(self) -> list[str]:
        """Inbox files as posix paths relative to inbox/ (the engine's row keys)."""
        return sorted(p.relative_to(self.inbox).as_posix() for p in self.inbox.glob("*/*/*.dcm"))

    # -- outbox ----------------------------------------------------------------------------

    def outbox_files(self) -> list[Path]:
        return sorted(p for p in self.outbox.glob("*.dcm") if not p.name.startswith("."))

    def put_outbox(self, sop_uid: str, data_path: Path) -> Path | None:
        """Move a written result object into the outbox unless the destination already has it."""
        if sop_uid in self.sent:
            data_path.unlink(missing_ok=True)
            return None
        dest = self.outbox / f"{sop_uid}.dcm"
        os.replace(data_path, dest)
        return dest

    def tmp_path(self, name: str) -> Path:
        d = self.work / "tmp"
        d.mkdir(exist_ok=True)
        return d / name


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
