"""Reviews become labels: ``medxray site labels``.

Inputs: the review store (the app's review folder, read through :class:`medxray.review.store.ReviewStore`
and its CSV export) or an export CSV, and one or more scorer output folders (``results.csv`` +
``run.json``). Output: a CSV manifest in the format of :mod:`medxray.data.csv_manifest`
(``image,patient_id,split,view,<finding>...``), read as is by ``medxray finetune --dataset csv``.

The label of one reviewed finding (1 positive, 0 negative, blank masked):

=================  ===============================  ==============================
verdict            the call was positive (p >= t)    the call was negative (p < t)
=================  ===============================  ==============================
agree              1                                0
disagree           0                                1
unsure             masked                           masked
=================  ===============================  ==============================

The call is taken from the review row (the probability and threshold the reviewer saw) and,
when the review lacks them, from the results row's ``positive_findings``. Findings nobody
reviewed stay blank (masked out of the loss).

Several reviewers, one rule: each reviewer's latest review of an image counts once; the latest
review by an *adjudicator* (``--adjudicator NAME``) decides when there is one; else the majority;
a tie is masked. Every image+finding where reviewers disagreed is listed in
``<out>.conflicts.csv`` with how it was resolved.

Patients without identifiers: ``patient_id`` is ``HMAC-SHA256(site secret, PatientID)`` (RFC 2104),
truncated to 16 hex digits, so splits can be patient-disjoint while no output carries the ID.
The PatientID is read from the DICOM header and never leaves :func:`patient_key`; a file without
one is grouped by its Study Instance UID (stated in the summary). The secret is a file kept
outside every output folder (created with mode 0600 on first use).

Side files: ``<out>.keys.csv`` (image, SOP/Study Instance UIDs, model version, reviewers) and
``<out>.summary.json`` (counts, rule, grouping).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import os
import secrets
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from medxray.errors import ConfigError, DataError
from medxray.fileio import atomic_write_text

log = logging.getLogger(__name__)

LABELS_FORMAT = "medxray-site-labels/1"
_MAX_EXPORT_BYTES = 512 * 1024 * 1024  # a review export larger than this is refused (stated bound)


@dataclass(frozen=True)
class Verdict:
    """One reviewer's verdict on one finding of one image (from the store or its export)."""

    image_key: str
    file_name: str
    reviewer: str
    saved_at_utc: str
    review_id: int
    finding: str
    verdict: str
    probability: float | None
    threshold: float | None
    model_version: str = ""
    sop_instance_uid: str = ""


@dataclass(frozen=True)
class ResultRow:
    """One ``ok`` row of a scorer's results.csv with its absolute image path."""

    path: str
    rel: str
    sop_instance_uid: str
    study_instance_uid: str
    view: str
    positive_findings: frozenset[str]
    model_version: str
    probs: Mapping[str, float]


@dataclass(frozen=True)
class LabelRow:
    image: str
    patient_id: str
    view: str
    labels: Mapping[str, int | None]
    sop_instance_uid: str
    study_instance_uid: str
    model_version: str
    reviewers: int
    first_reviewed_utc: str


@dataclass(frozen=True)
class Conflict:
    image: str
    finding: str
    votes: str
    resolution: str


@dataclass
class SiteLabels:
    label_names: list[str]
    rows: list[LabelRow] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    unmatched_reviews: int = 0
    grouping: Counter = field(default_factory=Counter)


# --------------------------------------------------------------------------------------------
# reading


def _opt_float(v: object) -> float | None:
    try:
        f = float(str(v))
    except (TypeError, ValueError):
        return None
    return f if f == f else None


def read_reviews(source: str | os.PathLike) -> list[Verdict]:
    """Every verdict of the review store folder (or export CSV file) ``source``, oldest first."""
    p = Path(source).expanduser()
    if p.is_dir():
        from medxray.review.store import ReviewStore

        text = ReviewStore(p).export_csv()
    elif p.is_file():
        if p.stat().st_size > _MAX_EXPORT_BYTES:
            raise DataError(f"{p} is larger than {_MAX_EXPORT_BYTES >> 20} MiB; export a shorter period")
        text = p.read_text(encoding="utf-8-sig", errors="replace")
    else:
        raise DataError(f"--reviews {p} is neither the app's review folder nor a review export CSV")
    reader = csv.DictReader(io.StringIO(text))
    need = {"image_key", "reviewer", "finding", "verdict"}
    missing = need - set(reader.fieldnames or [])
    if missing:
        raise DataError(
            f"{p} is not a review export (missing column(s) {sorted(missing)}); export it from the app "
            "or pass the review folder"
        )
    out = []
    for n, r in enumerate(reader):
        verdict = (r.get("verdict") or "").strip().lower()
        if verdict not in ("agree", "disagree", "unsure"):
            continue
        try:
            rid = int(r.get("review_id") or n)
        except ValueError:
            rid = n
        out.append(
            Verdict(
                image_key=(r.get("image_key") or "").strip(),
                file_name=(r.get("file_name") or "").strip(),
                reviewer=(r.get("reviewer") or "").strip(),
                saved_at_utc=(r.get("saved_at_utc") or "").strip(),
                review_id=rid,
                finding=(r.get("finding") or "").strip(),
                verdict=verdict,
                probability=_opt_float(r.get("probability")),
                threshold=_opt_float(r.get("threshold")),
                model_version=(r.get("model_version") or "").strip(),
                sop_instance_uid=(r.get("sop_instance_uid") or "").strip(),
            )
        )
    out.sort(key=lambda v: (v.saved_at_utc, v.review_id))
    return out


def read_results(out_dirs: Sequence[str | os.PathLike]) -> list[ResultRow]:
    """The ``ok`` rows of each scorer output folder, image paths made absolute through its run.json."""
    from medxray.scoring.journal import RESULTS_NAME
    from medxray.scoring.journal import read_results as read_journal

    rows: list[ResultRow] = []
    for d in out_dirs:
        d = Path(d).expanduser()
        f = d / RESULTS_NAME if d.is_dir() else d
        if not f.is_file():
            raise DataError(f"--results {d}: no {RESULTS_NAME} there; pass the scorer's --out folder")
        root = f.parent
        run = f.parent / "run.json"
        if run.is_file():
            try:
                root = Path(json.loads(run.read_text()).get("input") or root)
            except ValueError:
                pass
        header, recs, _ = read_journal(f)
        col = {h: i for i, h in enumerate(header)}
        if "path" not in col or "status" not in col:
            raise DataError(f"{f} is not a medxray results.csv (no path/status columns)")
        pcols = [h for h in header if h.startswith("p_")]
        for rec in recs:

            def get(k: str, rec: list[str] = rec, col: dict[str, int] = col) -> str:
                return rec[col[k]] if k in col else ""

            if get("status") != "ok":
                continue
            rel = get("path")
            full = (root / rel).resolve()
            if not full.is_relative_to(root.resolve()):  # a path read from a file stays under its root
                log.warning("%s: row path %r leaves the input folder; ignored", f, rel)
                continue
            probs = {h[2:]: v for h in pcols if (v := _opt_float(rec[col[h]])) is not None}
            rows.append(
                ResultRow(
                    path=str(full),
                    rel=rel,
                    sop_instance_uid=get("sop_instance_uid"),
                    study_instance_uid=get("study_instance_uid"),
                    view=get("view_position"),
                    positive_findings=frozenset(x for x in get("positive_findings").replace(";", "|").split("|") if x),
                    model_version=get("model_version"),
                    probs=probs,
                )
            )
    return rows


def result_label_names(out_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """The findings of the model that scored the first results folder (its ``p_<Finding>`` columns)."""
    from medxray.scoring.journal import RESULTS_NAME
    from medxray.scoring.journal import read_results as read_journal

    d = Path(out_dirs[0]).expanduser()
    header, _, _ = read_journal(d / RESULTS_NAME if d.is_dir() else d)
    return [h[2:] for h in header if h.startswith("p_")]


# --------------------------------------------------------------------------------------------
# pseudonyms


def load_secret(path: str | os.PathLike, *, create: bool = True, outputs: Iterable[str | os.PathLike] = ()) -> bytes:
    """The site secret (32 random bytes, hex in a file with mode 0600). Refused inside an output folder."""
    p = Path(path).expanduser().resolve()
    for o in outputs:
        o = Path(o).expanduser().resolve()
        if p == o or p.is_relative_to(o.parent if o.is_file() else o):
            raise ConfigError(
                f"the site secret {p} must be kept outside the output folder {o}; move it (e.g. "
                "/etc/medxray/site.key) and pass --secret"
            )
    if not p.exists():
        if not create:
            raise ConfigError(f"site secret {p} does not exist")
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        log.warning("created a new site secret %s: keep it (pseudonyms change without it) and keep it private", p)
    text = p.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"site secret {p} is not a hex key; delete it to have a new one made") from None
    if len(key) < 16:
        raise ConfigError(f"site secret {p} is shorter than 16 bytes")
    return key


def pseudonym(secret: bytes, patient: str) -> str:
    """``P`` + the first 16 hex digits of HMAC-SHA256(secret, patient) (RFC 2104)."""
    return "P" + hmac.new(secret, patient.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def patient_key(path: str, study_uid: str) -> tuple[str, str]:
    """(grouping kind, value) of an image: ("patient", PatientID) from its DICOM header, else
    ("study", Study Instance UID), else ("image", path). The value is only ever passed to :func:`pseudonym`."""
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        pid = str(ds.get("PatientID", "") or "").strip()
        if pid:
            return "patient", pid
    except Exception:  # not DICOM, unreadable: fall back below (the scorer read it already)
        pass
    if study_uid:
        return "study", study_uid
    return "image", path


# --------------------------------------------------------------------------------------------
# the labelling rule


def verdict_label(verdict: str, called_positive: bool) -> int | None:
    """1 / 0 / None (masked) from a verdict on a positive or negative call (table in the module docstring)."""
    if verdict == "agree":
        return 1 if called_positive else 0
    if verdict == "disagree":
        return 0 if called_positive else 1
    return None


def _match(verdicts: Sequence[Verdict], results: Sequence[ResultRow]) -> tuple[dict[int, list[Verdict]], int]:
    """Group verdicts by the index of the results row they refer to (SOP UID, a key holding it, or file name)."""
    by_uid = {r.sop_instance_uid: i for i, r in enumerate(results) if r.sop_instance_uid}
    names = Counter(Path(r.rel).name for r in results)
    by_name = {Path(r.rel).name: i for i, r in enumerate(results) if names[Path(r.rel).name] == 1}
    sha_cache: dict[str, int] = {}
    out: dict[int, list[Verdict]] = defaultdict(list)
    unmatched = 0
    for v in verdicts:
        i = by_uid.get(v.sop_instance_uid) if v.sop_instance_uid else None
        if i is None:
            i = by_uid.get(v.image_key)
        if i is None:  # a composite key (study/series/SOP) holding the SOP UID
            for part in v.image_key.replace("|", "/").replace(":", "/").split("/"):
                if part in by_uid:
                    i = by_uid[part]
        if i is None and v.file_name:
            i = by_name.get(v.file_name)
        if i is None and len(v.image_key) == 64:  # sha256-keyed (PNG/JPEG, DICOM without a UID)
            if not sha_cache:
                for k, r in enumerate(results):
                    try:
                        sha_cache[hashlib.sha256(Path(r.path).read_bytes()).hexdigest()] = k
                    except OSError:
                        continue
            i = sha_cache.get(v.image_key)
        if i is None:
            unmatched += 1
            continue
        out[i].append(v)
    return out, unmatched


def build_labels(
    verdicts: Sequence[Verdict],
    results: Sequence[ResultRow],
    label_names: Sequence[str],
    secret: bytes,
    *,
    adjudicators: Iterable[str] = (),
) -> SiteLabels:
    """Apply the labelling rule (module docstring) to every reviewed results row."""
    adj = {a.strip() for a in adjudicators if a.strip()}
    matched, unmatched = _match(verdicts, results)
    res = SiteLabels(label_names=list(label_names), unmatched_reviews=unmatched)
    for i in sorted(matched, key=lambda k: results[k].path):
        r = results[i]
        vs = matched[i]
        labels: dict[str, int | None] = {n: None for n in label_names}
        for finding in label_names:
            fv = [v for v in vs if v.finding == finding]
            if not fv:
                continue
            latest: dict[str, Verdict] = {}
            for v in fv:  # oldest first: a reviewer's later verdict replaces their earlier one
                latest[v.reviewer] = v
            votes: dict[str, int | None] = {}
            for who, v in latest.items():
                called = (
                    (v.probability >= v.threshold)
                    if (v.probability is not None and v.threshold is not None)
                    else finding in r.positive_findings
                )
                votes[who] = verdict_label(v.verdict, called)
            adj_v = [v for v in fv if v.reviewer in adj]
            known = [x for x in votes.values() if x is not None]
            if adj_v:
                final, how = votes[adj_v[-1].reviewer], "adjudicated by the latest adjudicator review"
            elif known:
                c = Counter(known)
                if len(c) == 2 and c[0] == c[1]:
                    final, how = None, "tie: masked"
                else:
                    final, how = c.most_common(1)[0][0], "majority"
            else:
                final, how = None, "unsure: masked"
            labels[finding] = final
            if len(set(known)) > 1:
                res.conflicts.append(Conflict(r.path, finding, _tally(votes), how))
        kind, value = patient_key(r.path, r.study_instance_uid)
        res.grouping[kind] += 1
        res.rows.append(
            LabelRow(
                image=r.path,
                patient_id=pseudonym(secret, f"{kind}:{value}"),
                view=r.view,
                labels=labels,
                sop_instance_uid=r.sop_instance_uid,
                study_instance_uid=r.study_instance_uid,
                model_version=r.model_version or (vs[-1].model_version if vs else ""),
                reviewers=len({v.reviewer for v in vs}),
                first_reviewed_utc=min(v.saved_at_utc for v in vs),
            )
        )
    return res


def _tally(votes: Mapping[str, int | None]) -> str:
    c = Counter("pos" if x == 1 else "neg" if x == 0 else "unsure" for x in votes.values())
    return " ".join(f"{k}:{c[k]}" for k in ("pos", "neg", "unsure") if c[k])


# --------------------------------------------------------------------------------------------
# writing


def side_paths(out: str | os.PathLike) -> dict[str, Path]:
    """The files written beside a labels CSV: keys, conflicts, summary."""
    p = Path(out)
    stem = p.with_suffix("")
    return {
        "keys": Path(f"{stem}.keys.csv"),
        "conflicts": Path(f"{stem}.conflicts.csv"),
        "summary": Path(f"{stem}.summary.json"),
    }


def write_labels(res: SiteLabels, out: str | os.PathLike, splits: Mapping[str, str]) -> dict[str, Path]:
    """Write the manifest (``splits``: patient pseudonym -> train/val/test) and its side files."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "patient_id", "split", "view", *res.label_names])
    for r in res.rows:
        w.writerow(
            [
                r.image,
                r.patient_id,
                splits.get(r.patient_id, "train"),
                r.view,
                *("" if r.labels[n] is None else r.labels[n] for n in res.label_names),
            ]
        )
    atomic_write_text(out, buf.getvalue())
    side = side_paths(out)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "sop_instance_uid", "study_instance_uid", "model_version", "reviewers", "first_reviewed_utc"])
    for r in res.rows:
        w.writerow(
            [r.image, r.sop_instance_uid, r.study_instance_uid, r.model_version, r.reviewers, r.first_reviewed_utc]
        )
    atomic_write_text(side["keys"], buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "finding", "votes", "resolution"])
    for c in res.conflicts:
        w.writerow([c.image, c.finding, c.votes, c.resolution])
    atomic_write_text(side["conflicts"], buf.getvalue())
    counts = {
        n: {"positive": sum(r.labels[n] == 1 for r in res.rows), "negative": sum(r.labels[n] == 0 for r in res.rows)}
        for n in res.label_names
    }
    summary = {
        "format": LABELS_FORMAT,
        "images": len(res.rows),
        "patients": len({r.patient_id for r in res.rows}),
        "splits": dict(Counter(splits.get(r.patient_id, "train") for r in res.rows)),
        "conflicts": len(res.conflicts),
        "unmatched_reviews": res.unmatched_reviews,
        "grouping": dict(res.grouping),
        "labels": counts,
        "rule": "each reviewer's latest verdict; latest adjudicator review decides, else majority, tie masked; "
        "agree+positive call=1, disagree+positive call=0, agree+negative call=0, "
        "disagree+negative call=1, unsure/unreviewed=blank",
    }
    atomic_write_text(side["summary"], json.dumps(summary, indent=1) + "\n")
    return {"labels": out, **side}


@dataclass(frozen=True)
class ManifestRow:
    """One row of a site labels manifest, as read back."""

    image: str
    patient_id: str
    split: str
    labels: tuple[float, ...]
    mask: tuple[float, ...]


def read_manifest(path: str | os.PathLike) -> tuple[list[str], list[ManifestRow]]:
    """(finding names, rows) of a labels CSV written by :func:`write_labels` (or any CSV manifest
    with image, patient_id and split columns)."""
    from medxray.data.csv_manifest import NEGATIVE, POSITIVE, SPLITS, UNKNOWN

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"labels file {p} not found; write it with `medxray site labels`")
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        if "image" not in header or "patient_id" not in header:
            raise DataError(f"{p} is not a labels manifest (needs image and patient_id columns)")
        meta = {"image", "patient_id", "split", "view"}
        names = [h for h in header if h and h not in meta]
        ii, ip = header.index("image"), header.index("patient_id")
        isp = header.index("split") if "split" in header else None
        idx = [header.index(n) for n in names]
        rows = []
        base = p.parent
        for rec in reader:
            if len(rec) < len(header) or not rec[ii].strip():
                continue
            cells = [rec[i].strip().lower() for i in idx]
            if any(c not in POSITIVE | NEGATIVE | UNKNOWN for c in cells):
                continue
            img = rec[ii].strip()
            img = img if Path(img).is_absolute() else str(base / img)
            sp = SPLITS.get(rec[isp].strip().lower(), "train") if isp is not None else "train"
            rows.append(
                ManifestRow(
                    img,
                    rec[ip].strip(),
                    sp,
                    tuple(1.0 if c in POSITIVE else 0.0 for c in cells),
                    tuple(0.0 if c in UNKNOWN else 1.0 for c in cells),
                )
            )
    return names, rows


@dataclass(frozen=True)
class LabelsRun:
    """What ``site labels`` did: files written, counts, and the lock (new, kept, or none yet)."""

    files: Mapping[str, Path]
    images: int
    patients: int
    conflicts: int
    unmatched_reviews: int
    lock_status: str
    splits: Mapping[str, int]


def make_site_labels(
    reviews: str | os.PathLike,
    results: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    secret: str | os.PathLike,
    lock_path: str | os.PathLike | None = None,
    lock_fraction: float = 0.3,
    lock_min_patients: int = 30,
    val_fraction: float = 0.2,
    adjudicators: Iterable[str] = (),
) -> LabelsRun:
    """``medxray site labels``: build the labels, freeze the locked set when it is due, write everything."""
    from medxray.site.lockset import assign_splits, default_lock_path, freeze, load_lock

    out = Path(out).expanduser()
    key = load_secret(secret, outputs=[out.parent, *results])
    names = result_label_names(results)
    res = build_labels(read_reviews(reviews), read_results(results), names, key, adjudicators=adjudicators)
    if not res.rows:
        raise DataError(
            f"no review of {reviews} matches an image of the results given; check that the reviews "
            "are of images these scorer runs scored"
        )
    lp = Path(lock_path).expanduser() if lock_path else default_lock_path(out)
    lock = load_lock(lp)
    patients: dict[str, list[str]] = defaultdict(list)
    for r in res.rows:
        patients[r.patient_id].append(r.image)
    if lock is None and len(patients) >= lock_min_patients:
        positive = {r.patient_id for r in res.rows if any(v == 1 for v in r.labels.values())}
        lock = freeze(patients, positive, lp, fraction=lock_fraction)
        status = f"froze a new locked test set: {len(lock.patients)} patients, {len(lock.images)} images ({lp})"
    elif lock is None:
        status = (
            f"no locked test set yet: {len(patients)} labelled patients, {lock_min_patients} needed "
            "(--lock-min-patients); the gate cannot promote before one exists"
        )
    else:
        status = f"kept the locked test set {lp} ({len(lock.patients)} patients, hash {lock.sha256[:12]})"
    splits = assign_splits(patients, lock, val_fraction=val_fraction)
    files = write_labels(res, out, splits)
    log.info("%s", status)
    return LabelsRun(
        files,
        len(res.rows),
        len(patients),
        len(res.conflicts),
        res.unmatched_reviews,
        status,
        dict(Counter(splits[r.patient_id] for r in res.rows)),
    )
