"""The node's on-disk state: received instances, the engine's input, the outbox and the ledgers.

Layout under ``work_dir`` (all writes atomic: temporary file + fsync + rename)::

    incoming/<study>/<series>/<sop>.dcm   received; the series may still be growing
    inbox/<study>/<series>/<sop>.dcm      series that went idle: the scoring engine's input folder
    .../<sop>.v<sha256[:16]>.dcm          a changed re-send of an instance already in inbox/ (a new version)
    scored/                               the engine's output (results.csv, run.json, cams/)
    outbox/<result sop>.dcm               SR / Secondary Capture objects waiting for a C-STORE
    node.csv                              the node's own rows: ``skipped`` (non-image objects, accepted
                                          but never scored), ``no_result`` (scored, but the source's
                                          UIDs cannot be referenced), ``duplicate_sop_uid`` (an instance
                                          whose SOP Instance UID another study/series already used:
                                          stored and scored on its own) and ``new_version`` (a changed
                                          re-send, scored as a new version)
    queued.log                            inbox files whose result objects are in the outbox
    sent.log                              result SOP Instance UIDs the destination acknowledged

An instance's identity is its Study + Series + SOP Instance UID (the folder path) and its content:
the SHA-256 of the received data set, File Meta Information excluded (:func:`dataset_sha256`).
An identical re-send is a no-op. A changed re-send of an instance still in incoming/ (not scored
yet) replaces it; one of an instance already in inbox/ (scored or being scored) is stored beside it
under a versioned name and scored on its own, so every results row keeps describing the file at
its path. Two studies (or series) whose instances share a SOP Instance UID are two folders, two
files and two results rows; the second is recorded in node.csv as ``duplicate_sop_uid``.
A kill at any moment loses nothing: every state change is one rename or one flushed line.
Must not import pynetdicom, torch or the scoring engine.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import struct
import threading
import time
from pathlib import Path
from typing import BinaryIO

from medxray.dicom.sr import is_valid_uid
from medxray.fileio import atomic_output, atomic_write_bytes

log = logging.getLogger(__name__)

NODE_CSV = "node.csv"
NODE_COLUMNS = (
    "path",
    "status",
    "reason",
    "sop_instance_uid",
    "study_instance_uid",
    "series_instance_uid",
    "modality",
    "sop_class_uid",
)


STATUS_DUPLICATE_SOP_UID = "duplicate_sop_uid"
STATUS_NEW_VERSION = "new_version"
_VERSION_RE = re.compile(r"(?P<sop>.+)\.v(?P<digest>[0-9a-f]{16})")
_META_SCAN_BYTES = 1 << 20  # File Meta Information is a few hundred bytes; past 1 MiB it is not one
# explicit VRs whose length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_HASH_CHUNK = 1 << 20


def _dataset_offset(head: bytes) -> int:
    """Where the data set starts in DICOM file bytes ``head``: after the 128-byte preamble, "DICM" and
    the File Meta Information group (0002,xxxx), always Explicit VR Little Endian (PS3.10 7.1).
    0 when there is no "DICM" marker (a bare data set). Walks the group element by element, so
    a missing or wrong (0002,0000) group length does not matter."""
    if len(head) < 132 or head[128:132] != b"DICM":
        return 0
    pos = 132
    while pos + 8 <= len(head):
        group = struct.unpack_from("<H", head, pos)[0]
        if group != 0x0002:
            return pos
        vr = head[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(head):
                break
            length = struct.unpack_from("<I", head, pos + 8)[0]
            pos += 12 + length
        else:
            length = struct.unpack_from("<H", head, pos + 6)[0]
            pos += 8 + length
    return min(pos, len(head))


def dataset_sha256(data: bytes | bytearray | memoryview | str | os.PathLike) -> str:
    """Hex SHA-256 of a received instance's encoded data set, File Meta Information excluded.

    ``data`` is the complete DICOM file (bytes, or a path read in 1 MiB chunks). Why the data set
    and not the pixel data alone: what the scorer sees depends on more than the pixels (Photometric
    Interpretation, Rescale, VOI LUT / window, Bits Stored), and the result objects copy the patient
    and study modules, so a re-send that corrects any of them must be scored again; why without the
    File Meta Information: the receiver writes it (implementation UID, source AE title), it is not
    the sender's content. A re-send in another transfer syntax counts as changed (it is scored once
    more: extra work, never a stale result).
    """
    h = hashlib.sha256()
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        h.update(view[_dataset_offset(bytes(view[:_META_SCAN_BYTES])) :])
        return h.hexdigest()
    with open(data, "rb") as fh:
        head = fh.read(_META_SCAN_BYTES)
        h.update(head[_dataset_offset(head) :])
        _hash_rest(h, fh)
    return h.hexdigest()


def _hash_rest(h: "hashlib._Hash", fh: BinaryIO) -> None:
    while True:
        chunk = fh.read(_HASH_CHUNK)
        if not chunk:
            return
        h.update(chunk)


def sop_name_of(file_name: str) -> str:
    """The SOP part (:func:`path_name`) of a spool file name: ``<sop>.dcm`` or ``<sop>.v<digest16>.dcm``."""
    stem = file_name[:-4] if file_name.endswith(".dcm") else file_name
    m = _VERSION_RE.fullmatch(stem)
    return m.group("sop") if m else stem


def is_version_name(file_name: str) -> bool:
    """True for a changed re-send's file (``<sop>.v<digest16>.dcm``), False for a first version."""
    stem = file_name[:-4] if file_name.endswith(".dcm") else file_name
    return _VERSION_RE.fullmatch(stem) is not None


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
        self.lock = threading.RLock()  # record() is also called while holding it (promote_idle)
        self.sent = Ledger(self.work / "sent.log")
        self.queued = Ledger(self.work / "queued.log")
        self._recorded = Ledger(self.work / "node.keys")
        now = time.monotonic()
        # series left in incoming/ by an earlier run restart their idle clock now
        self.last_seen: dict[Path, float] = {
            p.relative_to(self.incoming): now for p in self.incoming.glob("*/*") if p.is_dir()
        }
        # SOP name -> the <study>/<series> folders holding an instance with it (duplicate detection)
        self._where: dict[str, set[Path]] = {}
        files = [(root, f) for root in (self.incoming, self.inbox) for f in root.glob("*/*/*.dcm")]
        for root, f in files:
            self._where.setdefault(sop_name_of(f.name), set()).add(f.parent.relative_to(root))
        self._digests: dict[Path, str] = {}  # spool file -> dataset_sha256, filled on demand
        self._recover_flags(files)

    def _recover_flags(self, files: list[tuple[Path, Path]]) -> None:
        """Write the node.csv rows a kill between storing a file and recording it left out (record()
        skips rows already there): a new version per versioned file, ``duplicate_sop_uid`` for every
        study/series folder of a shared SOP UID but the one whose file arrived first (by mtime)."""
        first_seen: dict[str, dict[Path, tuple[float, Path]]] = {}
        for root, f in files:
            rel_file = f.relative_to(root)
            if is_version_name(f.name) and f"{STATUS_NEW_VERSION}:{rel_file.as_posix()}" not in self._recorded:
                study, series = rel_file.parts[0], rel_file.parts[1]
                self._record_new_version(root, f, self._digest_of(f), study, series, sop_name_of(f.name))
            sop = sop_name_of(f.name)
            if len(self._where.get(sop, ())) > 1:
                try:
                    mtime = f.stat().st_mtime
                except OSError:
                    continue
                folders = first_seen.setdefault(sop, {})
                rel = rel_file.parent
                if rel not in folders or mtime < folders[rel][0]:
                    folders[rel] = (mtime, rel_file)
        for sop, folders in first_seen.items():
            for _, rel_file in sorted(folders.values())[1:]:
                self._record_duplicate(rel_file, rel_file.parts[0], rel_file.parts[1], sop, len(folders) - 1)

    # -- receiving -------------------------------------------------------------------------

    def store(
        self,
        data: bytes | str | os.PathLike,
        study_uid: object,
        series_uid: object,
        sop_uid: object,
        direct: bool = False,
    ) -> Path:
        """Write one instance (complete DICOM file: bytes, or the path of a received file, which is
        copied) into incoming/ (or straight into inbox/ with ``direct``, for pull mode), atomically.

        Returns the file that now holds this content. An identical re-send (same UIDs, same
        :func:`dataset_sha256`) writes nothing. A changed re-send replaces a version not scored yet
        (still in incoming/) and is stored beside a version already in inbox/ as
        ``<sop>.v<digest16>.dcm`` (node.csv: ``new_version``). An instance whose SOP Instance UID
        is already used under another study/series is stored under its own folder as usual and
        recorded in node.csv as ``duplicate_sop_uid``. Raises OSError when the disk refuses.
        """
        rel = Path(path_name(study_uid)) / path_name(series_uid)
        sop = path_name(sop_uid)
        digest = dataset_sha256(data)
        root = self.inbox if direct else self.incoming
        with self.lock:
            unscored = [] if direct else self._versions(self.incoming, rel, sop)
            committed = self._versions(self.inbox, rel, sop)
            for f in unscored + committed:
                if self._digest_of(f) == digest:
                    log.info("identical re-send of %s/%s: already stored", rel.as_posix(), sop)
                    if f.parent.is_relative_to(self.incoming):
                        self.last_seen[rel] = time.monotonic()  # the series is still being sent
                    return f
            name = f"{sop}.v{digest[:16]}.dcm" if committed else f"{sop}.dcm"
            dest = root / rel / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, (bytes, bytearray, memoryview)):
                atomic_write_bytes(dest, data)
            else:
                _atomic_copy(Path(data), dest)
            self._digests[dest] = digest
            for f in unscored:  # a version nobody scored yet, now superseded: nothing describes it
                if f != dest:
                    f.unlink(missing_ok=True)
                    self._digests.pop(f, None)
                    log.info(
                        "changed re-send of %s/%s before scoring: the earlier copy was replaced", rel.as_posix(), sop
                    )
            if not direct:
                self.last_seen[rel] = time.monotonic()
            seen = self._where.setdefault(sop, set())
            # flagged once per study/series folder: the first instance there whose UID another folder has
            others = [] if rel in seen else sorted(p.as_posix() for p in seen)
            seen.add(rel)
        if committed:
            self._record_new_version(root, dest, digest, study_uid, series_uid, sop_uid)
        if others:
            self._record_duplicate(rel / name, study_uid, series_uid, sop_uid, len(others))
        return dest

    def _record_duplicate(
        self, rel_file: Path, study_uid: object, series_uid: object, sop_uid: object, n_others: int
    ) -> None:
        if self.record(
            {
                "path": rel_file.as_posix(),
                "status": STATUS_DUPLICATE_SOP_UID,
                "reason": f"{STATUS_DUPLICATE_SOP_UID}: this SOP Instance UID was already received under "
                f"{n_others} other study/series folder(s); stored, scored and answered on its own "
                "(results are identified by study + series + SOP Instance UID)",
                **_uid_columns(study_uid, series_uid, sop_uid),
            }
        ):
            log.warning(
                "%s: SOP Instance UID already used by %d other study/series; kept apart and scored "
                "on its own (node.csv: %s)",
                rel_file.as_posix(),
                n_others,
                STATUS_DUPLICATE_SOP_UID,
            )

    def _record_new_version(
        self, root: Path, dest: Path, digest: str, study_uid: object, series_uid: object, sop_uid: object
    ) -> None:
        rel_file = dest.relative_to(root).as_posix()
        if not self.record(
            {
                "path": rel_file,
                "status": STATUS_NEW_VERSION,
                "reason": f"content_changed: same Study/Series/SOP Instance UIDs as an instance already scored, "
                f"different data set (sha256 {digest}); scored as a new version with its own results",
                **_uid_columns(study_uid, series_uid, sop_uid),
            }
        ):
            return
        log.warning(
            "%s: changed re-send of an instance already scored; kept as a new version (node.csv: %s)",
            rel_file,
            STATUS_NEW_VERSION,
        )

    def _versions(self, root: Path, rel: Path, sop: str) -> list[Path]:
        """Files of one instance (every version) under ``root/rel``; cheap when there is none."""
        folder = root / rel
        if not (folder / f"{sop}.dcm").exists() and sop not in self._where:
            return []
        return (
            sorted(f for f in folder.glob(f"{glob_escape(sop)}*.dcm") if sop_name_of(f.name) == sop)
            if folder.is_dir()
            else []
        )

    def _digest_of(self, f: Path) -> str:
        if f not in self._digests:
            self._digests[f] = dataset_sha256(f)
        return self._digests[f]

    def content_digest(self, inbox_rel: str) -> str:
        """:func:`dataset_sha256` of an inbox file given as ``<study>/<series>/<file>`` (cached)."""
        return self._digest_of(self.inbox / inbox_rel)

    def record(self, row: dict[str, str]) -> bool:
        """One row in ``node.csv`` per instance and status (a re-send is not recorded twice).

        An instance is its spool path (``<study>/<series>/<file>``), not its SOP Instance UID, which
        two studies can share. (Ledger lines written before keyed by status:SOP UID; such an
        instance can get one more row once.)"""
        key = f"{row.get('status', '')}:{row.get('path') or row.get('sop_instance_uid', '')}"
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
                    target = dst / f.name
                    if target.exists():  # only left by an older release: never overwrite a scored file
                        if self._digest_of(f) == self._digest_of(target):
                            f.unlink()
                            continue
                        digest = self._digest_of(f)
                        target = dst / f"{sop_name_of(f.name)}.v{digest[:16]}.dcm"
                        self._record_new_version(
                            self.inbox, target, digest, rel.parent.name, rel.name, sop_name_of(f.name)
                        )
                    os.replace(f, target)  # same file system: atomic
                    if f in self._digests:
                        self._digests[target] = self._digests.pop(f)
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

    def tmp_dir(self) -> Path:
        """Where result objects are written before they move into the outbox (created if missing)."""
        d = self.work / "tmp"
        d.mkdir(exist_ok=True)
        return d

    def tmp_path(self, name: str) -> Path:
        return self.tmp_dir() / name


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped (spool names are UIDs or hashes, but be exact)."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _uid_columns(study_uid: object, series_uid: object, sop_uid: object) -> dict[str, str]:
    sop, study, series = str(sop_uid or ""), str(study_uid or ""), str(series_uid or "")
    return {
        "sop_instance_uid": sop if len(sop) <= 64 else "",
        "study_instance_uid": study[:64],
        "series_instance_uid": series[:64],
    }


def _atomic_copy(src: Path, dest: Path) -> None:
    with open(src, "rb") as fin, atomic_output(dest, "wb") as fout:
        while True:
            chunk = fin.read(_HASH_CHUNK)
            if not chunk:
                break
            fout.write(chunk)


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
