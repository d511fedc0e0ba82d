"""Clinician review records, stored in SQLite.

A radiologist's verdicts are human work that must not be lost, so every save is one
transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) on a WAL-mode database with ``synchronous=FULL``:
a crash or a killed app leaves either the whole review or none of it, and readers (the worklist
in another browser session) never block a writer.

Images are keyed by their DICOM SOP Instance UID, or by the SHA-256 of the file bytes for
PNG/JPEG (and DICOM without a UID). Beside the key each review keeps the image's file name
(the last path component only, never a folder) so an export can be mapped back to files;
nothing else identifying the patient (name, ID, birth date) is stored. The store is append-only:
each save adds a new review, triggers refuse UPDATE and DELETE, the latest review per image is
its current state and :meth:`ReviewStore.iter_history_rows` lists who changed what, when.

Must not import streamlit, pandas, torch or the other app modules: the store is the app's
foundation and is usable from scripts alone.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Mapping

from medxray.errors import DataError
from medxray.fileio import atomic_write_text

log = logging.getLogger(__name__)

VERDICTS: tuple[str, ...] = ("agree", "disagree", "unsure")
DB_FILENAME = "reviews.sqlite3"
SCHEMA_VERSION = 2
EXPORT_COLUMNS: tuple[str, ...] = (
    "review_id", "image_key", "key_kind", "file_name", "saved_at_utc", "reviewer", "identity_source",
    "model_version", "finding", "verdict", "probability", "threshold", "note",
)
HISTORY_COLUMNS: tuple[str, ...] = (
    "review_id", "image_key", "file_name", "saved_at_utc", "reviewer", "identity_source", "change",
    "finding", "previous", "new",
)
_MAX_NOTE_CHARS = 10_000
_MAX_REVIEWER_CHARS = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    image_key     TEXT NOT NULL,
    key_kind      TEXT NOT NULL CHECK (key_kind IN ('sop_instance_uid', 'sha256')),
    reviewer      TEXT NOT NULL,
    note          TEXT NOT NULL DEFAULT '',
    model_version TEXT NOT NULL DEFAULT '',
    saved_at_utc  TEXT NOT NULL,
    file_name     TEXT NOT NULL DEFAULT '',
    identity_source TEXT NOT NULL DEFAULT 'typed'
);
CREATE INDEX IF NOT EXISTS reviews_by_image ON reviews (image_key, id);
CREATE TABLE IF NOT EXISTS review_findings (
    review_id   INTEGER NOT NULL REFERENCES reviews (id) ON DELETE CASCADE,
    finding     TEXT NOT NULL,
    verdict     TEXT NOT NULL CHECK (verdict IN ('agree', 'disagree', 'unsure')),
    probability REAL,
    threshold   REAL,
    PRIMARY KEY (review_id, finding)
);
"""
# Append-only: a saved review is history; corrections are new reviews.
_APPEND_ONLY = """
CREATE TRIGGER IF NOT EXISTS reviews_no_update BEFORE UPDATE ON reviews
    BEGIN SELECT RAISE(ABORT, 'reviews are append-only'); END;
CREATE TRIGGER IF NOT EXISTS reviews_no_delete BEFORE DELETE ON reviews
    BEGIN SELECT RAISE(ABORT, 'reviews are append-only'); END;
CREATE TRIGGER IF NOT EXISTS findings_no_update BEFORE UPDATE ON review_findings
    BEGIN SELECT RAISE(ABORT, 'reviews are append-only'); END;
CREATE TRIGGER IF NOT EXISTS findings_no_delete BEFORE DELETE ON review_findings
    BEGIN SELECT RAISE(ABORT, 'reviews are append-only'); END;
"""
_ADDED_COLUMNS = (("file_name", "TEXT NOT NULL DEFAULT ''"), ("identity_source", "TEXT NOT NULL DEFAULT 'typed'"))


class ReviewError(DataError):
    """A review that cannot be saved as given (no reviewer, unknown verdict, no findings)."""


@dataclass(frozen=True)
class ImageKey:
    """How a review refers to an image: never by anything that names the patient."""

    value: str
    kind: str  # "sop_instance_uid" | "sha256"

    @classmethod
    def from_bytes(cls, data: bytes) -> "ImageKey":
        return cls(hashlib.sha256(data).hexdigest(), "sha256")

    @classmethod
    def for_image(cls, sop_instance_uid: str | None, data: bytes | None = None) -> "ImageKey":
        """SOP Instance UID when there is one (stable across re-exports), else the file hash."""
        uid = (sop_instance_uid or "").strip()
        if uid:
            return cls(uid, "sop_instance_uid")
        if data is None:
            raise ReviewError("an image needs a SOP Instance UID or its bytes to be reviewed")
        return cls.from_bytes(data)


@dataclass(frozen=True)
class FindingVerdict:
    finding: str
    verdict: str
    probability: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class Review:
    """One saved review of one image."""

    review_id: int
    image_key: str
    key_kind: str
    reviewer: str
    note: str
    model_version: str
    saved_at_utc: str
    findings: dict[str, FindingVerdict] = field(default_factory=dict)
    file_name: str = ""
    identity_source: str = "typed"

    @property
    def verdicts(self) -> dict[str, str]:
        return {name: fv.verdict for name, fv in self.findings.items()}


def _csv_safe(value: object) -> object:
    """Neutralise spreadsheet formulas in free text (CSV injection) without losing the text."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


class ReviewStore:
    """SQLite review store in a folder; safe to use from several Streamlit sessions at once.

    A new connection is opened per operation: sqlite3 connections must not cross threads and
    Streamlit runs every session in its own thread, while opening a local SQLite file is cheap.
    """

    def __init__(self, folder: str | os.PathLike, *, timeout_s: float = 10.0) -> None:
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReviewError(f"cannot create the review folder {self.folder}: {exc.strerror}; "
                              "pass a writable folder with --reviews DIR") from None
        self.path = self.folder / DB_FILENAME
        self.timeout_s = timeout_s
        with closing(self._connect()) as conn:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # e.g. a network file system without shared memory
                log.warning("review database %s is in %s mode, not WAL", self.path, mode)
            with conn:
                conn.executescript(_SCHEMA)
                have = {r[1] for r in conn.execute("PRAGMA table_info(reviews)")}
                for name, decl in _ADDED_COLUMNS:  # a version-1 database gains the columns, keeps its rows
                    if name not in have:
                        conn.execute(f"ALTER TABLE reviews ADD COLUMN {name} {decl}")
                conn.executescript(_APPEND_ONLY)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise ReviewError(f"cannot open the review database {self.path}: {exc}") from None
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=FULL")  # a saved review survives power loss
        return conn

    # -- writing -----------------------------------------------------------------------------
    def save(
        self,
        key: ImageKey,
        verdicts: Mapping[str, str],
        *,
        reviewer: str,
        note: str = "",
        model_version: str = "",
        probabilities: Mapping[str, float] | None = None,
        thresholds: Mapping[str, float] | None = None,
        file_name: str = "",
        identity_source: str = "typed",
    ) -> Review:
        """Append one review in a single transaction and return it as stored.

        ``file_name`` is reduced to its last path component (folders can name patients or wards).
        """
        reviewer = (reviewer or "").strip()
        if not reviewer:
            raise ReviewError("enter the reviewer's name before saving a review")
        if len(reviewer) > _MAX_REVIEWER_CHARS:
            raise ReviewError(f"the reviewer name is longer than {_MAX_REVIEWER_CHARS} characters")
        note = note or ""
        if len(note) > _MAX_NOTE_CHARS:
            raise ReviewError(f"the note is longer than {_MAX_NOTE_CHARS} characters; shorten it")
        chosen = {f: v for f, v in verdicts.items() if v}
        if not chosen:
            raise ReviewError("choose agree, disagree or unsure for at least one finding before saving")
        bad = sorted({v for v in chosen.values() if v not in VERDICTS})
        if bad:
            raise ReviewError(f"unknown verdict(s) {bad}; use one of {list(VERDICTS)}")
        if key.kind not in ("sop_instance_uid", "sha256") or not key.value:
            raise ReviewError(f"invalid image key {key!r}")
        probabilities = probabilities or {}
        thresholds = thresholds or {}
        file_name = Path(str(file_name or "").replace("\\", "/")).name[:255]
        saved_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with closing(self._connect()) as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.execute(
                    "INSERT INTO reviews (image_key, key_kind, reviewer, note, model_version, saved_at_utc,"
                    " file_name, identity_source) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (key.value, key.kind, reviewer, note, model_version or "", saved_at, file_name,
                     str(identity_source or "typed")),
                )
                review_id = int(cur.lastrowid)
                conn.executemany(
                    "INSERT INTO review_findings (review_id, finding, verdict, probability, threshold)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [(review_id, f, v, _opt_float(probabilities.get(f)), _opt_float(thresholds.get(f)))
                     for f, v in chosen.items()],
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        log.info("saved review %d (%d findings, key kind %s)", review_id, len(chosen), key.kind)
        review = self.latest(key.value)
        assert review is not None and review.review_id == review_id
        return review

    # -- reading -----------------------------------------------------------------------------
    def _reviews(self, where: str = "", params: tuple = ()) -> list[Review]:
        with closing(self._connect()) as conn:
            rows = conn.execute(
                "SELECT id, image_key, key_kind, reviewer, note, model_version, saved_at_utc, file_name, "
                "identity_source FROM reviews "
                f"{where} ORDER BY id", params,
            ).fetchall()
            ids = [r[0] for r in rows]
            findings: dict[int, dict[str, FindingVerdict]] = {i: {} for i in ids}
            if ids:
                fq = ("SELECT review_id, finding, verdict, probability, threshold FROM review_findings "
                      "WHERE review_id IN (SELECT id FROM reviews " + where + ") ORDER BY review_id, rowid")
                for rid, finding, verdict, p, t in conn.execute(fq, params):
                    findings[rid][finding] = FindingVerdict(finding, verdict, p, t)
        return [Review(r[0], r[1], r[2], r[3], r[4], r[5], r[6], findings[r[0]], r[7], r[8]) for r in rows]

    def history(self, image_key: str) -> list[Review]:
        """All reviews of one image, oldest first."""
        return self._reviews("WHERE image_key = ?", (image_key,))

    def latest(self, image_key: str) -> Review | None:
        """The current review of one image (the most recent save), or None."""
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT MAX(id) FROM reviews WHERE image_key = ?", (image_key,)).fetchone()
        if row is None or row[0] is None:
            return None
        return self._reviews("WHERE id = ?", (int(row[0]),))[0]

    def latest_by_image(self) -> dict[str, Review]:
        """Current review of every reviewed image (for the worklist's review column)."""
        reviews = self._reviews("WHERE id IN (SELECT MAX(id) FROM reviews GROUP BY image_key)")
        return {r.image_key: r for r in reviews}

    def count(self) -> int:
        with closing(self._connect()) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM reviews").fetchone()[0])

    # -- export ------------------------------------------------------------------------------
    def iter_export_rows(self) -> Iterator[dict[str, object]]:
        """One row per (review, finding), every review including superseded ones."""
        for r in self._reviews():
            for fv in r.findings.values():
                yield {
                    "review_id": r.review_id, "image_key": r.image_key, "key_kind": r.key_kind,
                    "file_name": r.file_name, "saved_at_utc": r.saved_at_utc, "reviewer": r.reviewer,
                    "identity_source": r.identity_source, "model_version": r.model_version,
                    "finding": fv.finding, "verdict": fv.verdict,
                    "probability": "" if fv.probability is None else f"{fv.probability:.6f}",
                    "threshold": "" if fv.threshold is None else f"{fv.threshold:.6f}",
                    "note": r.note,
                }

    def iter_history_rows(self, image_key: str | None = None) -> Iterator[dict[str, object]]:
        """The audit trail: one row per change a save made (who, when, what changed), oldest first.

        ``change`` is ``verdict`` (``finding`` went from ``previous`` to ``new``; "" = not set),
        ``note`` or ``first review``. A save that changed nothing still gets one ``unchanged`` row.
        """
        before: dict[str, Review] = {}
        reviews = self.history(image_key) if image_key is not None else self._reviews()
        for r in reviews:
            prev = before.get(r.image_key)
            base = {"review_id": r.review_id, "image_key": r.image_key, "file_name": r.file_name,
                    "saved_at_utc": r.saved_at_utc, "reviewer": r.reviewer, "identity_source": r.identity_source}
            old = prev.verdicts if prev else {}
            new = r.verdicts
            changed = [f for f in list(new) + [f for f in old if f not in new] if old.get(f, "") != new.get(f, "")]
            kind = "first review" if prev is None else "verdict"
            for f in changed:
                yield {**base, "change": kind, "finding": f, "previous": old.get(f, ""), "new": new.get(f, "")}
            note_changed = (prev.note if prev else "") != r.note
            if note_changed:
                yield {**base, "change": "note", "finding": "", "previous": prev.note if prev else "", "new": r.note}
            if not changed and not note_changed:
                yield {**base, "change": "unchanged", "finding": "", "previous": "", "new": ""}
            before[r.image_key] = r

    def export_csv(self, path: str | os.PathLike | None = None, *, history: bool = False) -> str:
        """All reviews as CSV text (also written to ``path`` when given); formulas neutralised.

        ``history=True`` exports the audit trail (:meth:`iter_history_rows`) instead.
        """
        buf = io.StringIO()
        columns = HISTORY_COLUMNS if history else EXPORT_COLUMNS
        writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in (self.iter_history_rows() if history else self.iter_export_rows()):
            writer.writerow({k: _csv_safe(v) for k, v in row.items()})
        text = buf.getvalue()
        if path is not None:
            atomic_write_text(path, text)
        return text


def _opt_float(v: object) -> float | None:
    if v is None:
        return None
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
