"""Clinician review records, stored in SQLite.

A radiologist's verdicts are human work that must not be lost, so every save is one
transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) on a WAL-mode database with ``synchronous=FULL``:
a crash or a killed app leaves either the whole review or none of it, and readers (the worklist
in another browser session) never block a writer.

Images are keyed by something two patients cannot share: a DICOM image by its Study + Series +
SOP Instance UIDs together (``study_series_sop``: re-used SOP Instance UIDs exist, from broken
modality software and merged archives, and two patients' images sharing one must not share
reviews), a PNG/JPEG (and a DICOM without valid UIDs) by the SHA-256 of the file bytes.

Schema version 3 (this release) migrates older databases in place when opened: the ``reviews``
table is rebuilt to accept the new key kind (rows, ids and the append-only triggers kept), and a
``key_aliases`` table is added. A version-2 review is keyed by the SOP Instance UID alone
(``sop_instance_uid``), which does not say which study it belongs to; the app *adopts* it when it
meets the image (:meth:`ReviewStore.adopt_legacy`, called with the keys of a results folder): a
legacy key whose SOP Instance UID belongs to exactly one of the offered keys, and to no review
already saved under another study's key, gets an alias row (append-only, with the time), and
from then on its reviews read under the new key. A SOP UID offered with two studies is left
unadopted (a warning names how many), so two patients' reviews are never merged.

Beside the key each review keeps the image's file name
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
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from medxray.errors import DataError
from medxray.fileio import atomic_write_text

log = logging.getLogger(__name__)

VERDICTS: tuple[str, ...] = ("agree", "disagree", "unsure")
DB_FILENAME = "reviews.sqlite3"
SCHEMA_VERSION = 3
KEY_KINDS: tuple[str, ...] = ("study_series_sop", "sha256", "sop_instance_uid")  # the last: version 2, legacy
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")  # PS3.5 9.1
EXPORT_COLUMNS: tuple[str, ...] = (
    "review_id",
    "image_key",
    "key_kind",
    "file_name",
    "saved_at_utc",
    "reviewer",
    "identity_source",
    "model_version",
    "finding",
    "verdict",
    "probability",
    "threshold",
    "note",
)
HISTORY_COLUMNS: tuple[str, ...] = (
    "review_id",
    "image_key",
    "file_name",
    "saved_at_utc",
    "reviewer",
    "identity_source",
    "change",
    "finding",
    "previous",
    "new",
)
_MAX_NOTE_CHARS = 10_000
_MAX_REVIEWER_CHARS = 200

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reviews (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    image_key     TEXT NOT NULL,
    key_kind      TEXT NOT NULL CHECK (key_kind IN ('study_series_sop', 'sha256', 'sop_instance_uid')),
    reviewer      TEXT NOT NULL,
    note          TEXT NOT NULL DEFAULT '',
    model_version TEXT NOT NULL DEFAULT '',
    saved_at_utc  TEXT NOT NULL,
    file_name     TEXT NOT NULL DEFAULT '',
    identity_source TEXT NOT NULL DEFAULT 'typed',
    content_sha256 TEXT NOT NULL DEFAULT ''
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
CREATE TRIGGER IF NOT EXISTS aliases_no_update BEFORE UPDATE ON key_aliases
    BEGIN SELECT RAISE(ABORT, 'key aliases are append-only'); END;
CREATE TRIGGER IF NOT EXISTS aliases_no_delete BEFORE DELETE ON key_aliases
    BEGIN SELECT RAISE(ABORT, 'key aliases are append-only'); END;
"""
# Version 3: a version-2 key (SOP Instance UID alone) adopted under its study + series + SOP key,
# and the reviews as read: every query goes through reviews_keyed, so an adopted review reads
# under its new key while the row itself stays as it was saved (append-only).
_ALIASES = """
CREATE TABLE IF NOT EXISTS key_aliases (
    legacy_key     TEXT PRIMARY KEY,
    image_key      TEXT NOT NULL,
    key_kind       TEXT NOT NULL CHECK (key_kind IN ('study_series_sop', 'sha256')),
    adopted_at_utc TEXT NOT NULL
);
CREATE VIEW IF NOT EXISTS reviews_keyed AS
    SELECT r.id AS id, COALESCE(a.image_key, r.image_key) AS image_key,
           COALESCE(a.key_kind, r.key_kind) AS key_kind, r.reviewer AS reviewer, r.note AS note,
           r.model_version AS model_version, r.saved_at_utc AS saved_at_utc, r.file_name AS file_name,
           r.identity_source AS identity_source, r.content_sha256 AS content_sha256
    FROM reviews r LEFT JOIN key_aliases a ON r.key_kind = 'sop_instance_uid' AND a.legacy_key = r.image_key;
"""
_REVIEWS_COLUMNS = (
    "id, image_key, key_kind, reviewer, note, model_version, saved_at_utc, file_name, identity_source, content_sha256"
)
# columns later versions added: an older database gains them (empty) and keeps its rows
_ADDED_COLUMNS = (
    ("file_name", "TEXT NOT NULL DEFAULT ''"),
    ("identity_source", "TEXT NOT NULL DEFAULT 'typed'"),
    ("content_sha256", "TEXT NOT NULL DEFAULT ''"),
)


class ReviewError(DataError):
    """A review that cannot be saved as given (no reviewer, unknown verdict, no findings)."""


@dataclass(frozen=True)
class ImageKey:
    """How a review refers to an image: never by anything that names the patient, and never by
    anything two patients can share.

    ``kind`` "study_series_sop": ``value`` is ``<Study Instance UID>/<Series Instance UID>/<SOP
    Instance UID>`` (valid UIDs, PS3.5 9.1, hold no "/"); "sha256": the hex SHA-256 of the file
    bytes; "sop_instance_uid": a version-2 key, read only (never saved any more).
    """

    value: str
    kind: str  # one of KEY_KINDS

    @classmethod
    def from_bytes(cls, data: bytes) -> "ImageKey":
        return cls(hashlib.sha256(data).hexdigest(), "sha256")

    @classmethod
    def from_uids(
        cls, study_instance_uid: object, series_instance_uid: object, sop_instance_uid: object
    ) -> "ImageKey | None":
        """The study + series + SOP key, or None when one of the three is missing or not a valid UID."""
        uids = [
            str(u if u is not None else "").strip() for u in (study_instance_uid, series_instance_uid, sop_instance_uid)
        ]
        if not all(0 < len(u) <= 64 and _UID_RE.fullmatch(u) for u in uids):
            return None
        return cls("/".join(uids), "study_series_sop")

    @classmethod
    def for_image(
        cls,
        sop_instance_uid: str | None,
        data: bytes | None = None,
        *,
        study_instance_uid: str | None = None,
        series_instance_uid: str | None = None,
    ) -> "ImageKey":
        """Study + Series + SOP Instance UID when all three are valid (stable across re-exports),
        else the SHA-256 of the file bytes. Raises ReviewError when neither is available."""
        key = cls.from_uids(study_instance_uid, series_instance_uid, sop_instance_uid)
        if key is not None:
            return key
        if data is None:
            raise ReviewError("an image needs its Study, Series and SOP Instance UIDs or its bytes to be reviewed")
        return cls.from_bytes(data)

    @property
    def sop_instance_uid(self) -> str:
        """The SOP Instance UID part of a study + series + SOP key ("" for other kinds)."""
        return self.value.rsplit("/", 1)[-1] if self.kind == "study_series_sop" else ""


def key_of(value: str) -> ImageKey:
    """The :class:`ImageKey` a key value stands for (study + series + SOP keys hold two "/")."""
    if value.count("/") == 2 and ImageKey.from_uids(*value.split("/")) is not None:
        return ImageKey(value, "study_series_sop")
    if re.fullmatch(r"[0-9a-f]{64}", value):
        return ImageKey(value, "sha256")
    return ImageKey(value, "sop_instance_uid")


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
    content_sha256: str = ""  # SHA-256 of the file reviewed ("" before schema version 3)

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
            raise ReviewError(
                f"cannot create the review folder {self.folder}: {exc.strerror}; "
                "pass a writable folder with --reviews DIR"
            ) from None
        self.path = self.folder / DB_FILENAME
        self.timeout_s = timeout_s
        with closing(self._connect()) as conn:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":  # e.g. a network file system without shared memory
                log.warning("review database %s is in %s mode, not WAL", self.path, mode)
            conn.execute("PRAGMA foreign_keys=OFF")  # the version-3 rebuild drops and renames `reviews`
            try:
                conn.execute("BEGIN IMMEDIATE")  # one app process migrates; the others wait, then see v3
                _run_script(conn, _SCHEMA)
                have = {r[1] for r in conn.execute("PRAGMA table_info(reviews)")}
                for name, decl in _ADDED_COLUMNS:  # a version-1 database gains the columns, keeps its rows
                    if name not in have:
                        conn.execute(f"ALTER TABLE reviews ADD COLUMN {name} {decl}")
                before = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if _needs_key_rebuild(conn):
                    _rebuild_reviews_table(conn)
                    log.info(
                        "review database %s migrated from schema version %d to %d (study + series + SOP keys)",
                        self.path,
                        before,
                        SCHEMA_VERSION,
                    )
                conn.execute("DROP VIEW IF EXISTS reviews_keyed")  # re-created with today's columns
                _run_script(conn, _ALIASES)
                _run_script(conn, _APPEND_ONLY)
                if conn.execute("PRAGMA foreign_key_check").fetchall():
                    raise ReviewError(
                        f"the review database {self.path} has findings without a review; restore it from a backup"
                    )
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

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
        content_sha256: str = "",
    ) -> Review:
        """Append one review in a single transaction and return it as stored.

        ``file_name`` is reduced to its last path component (folders can name patients or wards).
        ``content_sha256``: the SHA-256 of the file reviewed, so a later look at the same image key
        can tell when the file changed since (a changed re-send keeps its UIDs).
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
        if key.kind not in ("study_series_sop", "sha256") or not key.value or key_of(key.value) != key:
            raise ReviewError(
                f"invalid image key {key!r} (a review is saved under study + series + SOP Instance UIDs or a SHA-256)"
            )
        probabilities = probabilities or {}
        thresholds = thresholds or {}
        file_name = Path(str(file_name or "").replace("\\", "/")).name[:255]
        saved_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with closing(self._connect()) as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
                cur = conn.execute(
                    "INSERT INTO reviews (image_key, key_kind, reviewer, note, model_version, saved_at_utc,"
                    " file_name, identity_source, content_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key.value,
                        key.kind,
                        reviewer,
                        note,
                        model_version or "",
                        saved_at,
                        file_name,
                        str(identity_source or "typed"),
                        str(content_sha256 or "")[:64],
                    ),
                )
                review_id = int(cur.lastrowid)
                conn.executemany(
                    "INSERT INTO review_findings (review_id, finding, verdict, probability, threshold)"
                    " VALUES (?, ?, ?, ?, ?)",
                    [
                        (review_id, f, v, _opt_float(probabilities.get(f)), _opt_float(thresholds.get(f)))
                        for f, v in chosen.items()
                    ],
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
                "identity_source, content_sha256 FROM reviews_keyed "
                f"{where} ORDER BY id",
                params,
            ).fetchall()
            ids = [r[0] for r in rows]
            findings: dict[int, dict[str, FindingVerdict]] = {i: {} for i in ids}
            if ids:
                fq = (
                    "SELECT review_id, finding, verdict, probability, threshold FROM review_findings "
                    "WHERE review_id IN (SELECT id FROM reviews_keyed " + where + ") ORDER BY review_id, rowid"
                )
                for rid, finding, verdict, p, t in conn.execute(fq, params):
                    findings[rid][finding] = FindingVerdict(finding, verdict, p, t)
        return [Review(r[0], r[1], r[2], r[3], r[4], r[5], r[6], findings[r[0]], r[7], r[8], r[9]) for r in rows]

    # the rows of one image: saved under its key, or under a legacy key adopted as it (index lookups)
    _BY_KEY = (
        "id IN (SELECT id FROM reviews WHERE image_key = ? AND (key_kind != 'sop_instance_uid' OR "
        "image_key NOT IN (SELECT legacy_key FROM key_aliases)) UNION ALL SELECT r.id FROM key_aliases a "
        "JOIN reviews r ON r.image_key = a.legacy_key AND r.key_kind = 'sop_instance_uid' "
        "WHERE a.image_key = ?)"
    )

    def history(self, image_key: str) -> list[Review]:
        """All reviews of one image, oldest first."""
        return self._reviews(f"WHERE {self._BY_KEY}", (image_key, image_key))

    def latest(self, image_key: str) -> Review | None:
        """The current review of one image (the most recent save), or None."""
        with closing(self._connect()) as conn:
            row = conn.execute(f"SELECT MAX(id) FROM reviews WHERE {self._BY_KEY}", (image_key, image_key)).fetchone()
        if row is None or row[0] is None:
            return None
        return self._reviews("WHERE id = ?", (int(row[0]),))[0]

    def latest_by_image(self, adopt: Iterable[str | None] | None = None) -> dict[str, Review]:
        """Current review of every reviewed image (for the worklist's review column).

        ``adopt``: the image keys the caller is about to look up (a results folder's rows); version-2
        reviews of their images are adopted first (:meth:`adopt_legacy`).
        """
        if adopt is not None:
            self.adopt_legacy(adopt)
        reviews = self._reviews("WHERE id IN (SELECT MAX(id) FROM reviews_keyed GROUP BY image_key)")
        return {r.image_key: r for r in reviews}

    def adopt_legacy(self, keys: Iterable[str | ImageKey | None]) -> int:
        """Give version-2 reviews (keyed by the SOP Instance UID alone) the study + series + SOP key
        of the image they belong to; returns how many legacy keys were adopted.

        ``keys``: the keys of images the caller has (e.g. every row of a results folder; None and
        non-DICOM keys are ignored). A legacy key is adopted only when its SOP Instance UID belongs
        to exactly one study + series among ``keys`` and among the keys reviews were already saved
        under; otherwise it is left as it is and a warning says how many were ambiguous (two
        patients' reviews are never merged). Each adoption is an append-only ``key_aliases`` row.
        """
        offered: dict[str, set[str]] = {}
        for k in keys:
            key = k if isinstance(k, ImageKey) else key_of(str(k)) if k else None
            if key is not None and key.kind == "study_series_sop":
                offered.setdefault(key.sop_instance_uid, set()).add(key.value)
        if not offered:
            return 0
        adopted = ambiguous = 0
        with closing(self._connect()) as conn:
            legacy = {
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT r.image_key FROM reviews r LEFT JOIN key_aliases a ON a.legacy_key = r.image_key "
                    "WHERE r.key_kind = 'sop_instance_uid' AND a.legacy_key IS NULL"
                )
            }
            wanted = [sop for sop in offered if sop in legacy]
            if not wanted:
                return 0
            saved: dict[str, set[str]] = {}
            for (value,) in conn.execute(
                "SELECT DISTINCT image_key FROM reviews_keyed WHERE key_kind = 'study_series_sop'"
            ):
                saved.setdefault(value.rsplit("/", 1)[-1], set()).add(value)
            now = datetime.now(timezone.utc).isoformat(timespec="seconds")
            try:
                conn.execute("BEGIN IMMEDIATE")
                for sop in wanted:
                    candidates = offered[sop] | saved.get(sop, set())
                    if len(candidates) != 1:
                        ambiguous += 1
                        continue
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO key_aliases (legacy_key, image_key, key_kind, "
                        "adopted_at_utc) VALUES (?, ?, 'study_series_sop', ?)",
                        (sop, next(iter(candidates)), now),
                    )
                    adopted += cur.rowcount
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        if adopted:
            log.info(
                "review keys: %d review key(s) of schema version 2 now read under study + series + SOP UIDs", adopted
            )
        if ambiguous:
            log.warning(
                "review keys: %d review key(s) of schema version 2 name a SOP Instance UID that more than "
                "one study/series uses; left unadopted so two patients' reviews are not merged",
                ambiguous,
            )
        return adopted

    def count(self) -> int:
        with closing(self._connect()) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM reviews").fetchone()[0])

    # -- export ------------------------------------------------------------------------------
    def iter_export_rows(self) -> Iterator[dict[str, object]]:
        """One row per (review, finding), every review including superseded ones."""
        for r in self._reviews():
            for fv in r.findings.values():
                yield {
                    "review_id": r.review_id,
                    "image_key": r.image_key,
                    "key_kind": r.key_kind,
                    "file_name": r.file_name,
                    "saved_at_utc": r.saved_at_utc,
                    "reviewer": r.reviewer,
                    "identity_source": r.identity_source,
                    "model_version": r.model_version,
                    "finding": fv.finding,
                    "verdict": fv.verdict,
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
            base = {
                "review_id": r.review_id,
                "image_key": r.image_key,
                "file_name": r.file_name,
                "saved_at_utc": r.saved_at_utc,
                "reviewer": r.reviewer,
                "identity_source": r.identity_source,
            }
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
        for row in self.iter_history_rows() if history else self.iter_export_rows():
            writer.writerow({k: _csv_safe(v) for k, v in row.items()})
        text = buf.getvalue()
        if path is not None:
            atomic_write_text(path, text)
        return text


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run a DDL script statement by statement inside the open transaction (``executescript``
    would COMMIT it first)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            conn.execute(pending)
            pending = ""
    if pending.strip():
        raise ValueError("incomplete SQL statement in a schema script")


def _needs_key_rebuild(conn: sqlite3.Connection) -> bool:
    """True while ``reviews`` still has the version-2 CHECK that refuses study + series + SOP keys."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'reviews'").fetchone()
    return row is not None and "study_series_sop" not in str(row[0])


def _rebuild_reviews_table(conn: sqlite3.Connection) -> None:
    """SQLite's way to change a CHECK constraint (https://www.sqlite.org/lang_altertable.html, "making
    other kinds of table schema changes"): create the new table, copy every row with its id, drop
    the old one (its triggers and index go with it), rename; inside the caller's transaction, with
    foreign keys off (review_findings keeps pointing at ``reviews`` by name). The rows are copied
    as they are: version-2 keys keep their kind ``sop_instance_uid``."""
    conn.execute("DROP VIEW IF EXISTS reviews_keyed")
    new_table = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS reviews (") : _SCHEMA.index(");") + 2]
    conn.execute(new_table.replace("IF NOT EXISTS reviews (", "reviews_v3 ("))
    conn.execute(f"INSERT INTO reviews_v3 ({_REVIEWS_COLUMNS}) SELECT {_REVIEWS_COLUMNS} FROM reviews")
    conn.execute("DROP TABLE reviews")
    conn.execute("ALTER TABLE reviews_v3 RENAME TO reviews")
    conn.execute("CREATE INDEX IF NOT EXISTS reviews_by_image ON reviews (image_key, id)")


def _opt_float(v: object) -> float | None:
    if v is None:
        return None
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
