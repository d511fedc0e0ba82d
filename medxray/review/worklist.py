"""The worklist: a ``medxray score-dicom`` results folder as a table with review state.

Reads ``OUT/results.csv``, finds where each scored file and its stored CAM overlays are now,
keys each row for the review store, builds the worklist table (positive findings recomputed with
the thresholds in use, finding names as people read them, refusal codes as sentences), filters
and sorts it, and steps through it (:func:`step_row`, :func:`next_unreviewed`: the keyboard flow).

Must not import streamlit (only :mod:`medxray.review.ui` does) or the study/model-card modules.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from medxray.errors import DataError
from medxray.labels import display_name
from medxray.review.settings import reason_sentence
from medxray.review.store import ImageKey, Review

log = logging.getLogger(__name__)

# -- results folder and worklist -----------------------------------------------------------------

RESULTS_FILENAME = "results.csv"


def load_results(out_dir: str | os.PathLike) -> pd.DataFrame:
    """Read ``OUT/results.csv`` written by ``medxray score-dicom``."""
    out = Path(out_dir)
    path = out / RESULTS_FILENAME
    if not path.is_file():
        raise DataError(
            f"{out} has no {RESULTS_FILENAME}; run `medxray score-dicom INPUT --checkpoint C --out {out}` first"
        )
    try:
        df = pd.read_csv(
            path,
            dtype={
                "sop_instance_uid": str,
                "study_instance_uid": str,
                "series_instance_uid": str,
                "status": str,
                "reason": str,
            },
            keep_default_na=False,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable results table: {str(exc).splitlines()[0][:160]}") from None
    if "path" not in df.columns or "status" not in df.columns:
        raise DataError(f"{path} lacks the path/status columns of a score-dicom results table")
    return df


def result_label_names(results: pd.DataFrame) -> list[str]:
    return [c[2:] for c in results.columns if c.startswith("p_")]


def result_probabilities(row: Mapping[str, Any], label_names: Sequence[str]) -> np.ndarray | None:
    vals = []
    for n in label_names:
        v = row.get(f"p_{n}")
        try:
            vals.append(float(v))
        except (TypeError, ValueError):
            return None
    arr = np.asarray(vals, dtype=np.float32)
    return None if not np.all(np.isfinite(arr)) else arr


RUN_INFO_FILES: tuple[str, ...] = ("run.json", "manifest.json", "score_run.json")
_INPUT_KEYS: tuple[str, ...] = ("input_dir", "input_root", "input")


def results_input_root(out_dir: str | os.PathLike) -> Path | None:
    """The INPUT_DIR a results folder was scored from (``path`` in results.csv is relative to it)."""
    import json

    out = Path(out_dir)
    for f in [out / n for n in RUN_INFO_FILES] + sorted(out.glob("run.shard-*.json")):
        try:
            info = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for key in _INPUT_KEYS:
            v = info.get(key) if isinstance(info, dict) else None
            if isinstance(v, str) and v:
                return Path(v).expanduser()
    return None


def result_roots(out_dir: str | os.PathLike) -> list[Path]:
    """The folders a results folder's rows may name files in: the run's INPUT_DIR (from run.json), then OUT.

    Paths in ``results.csv`` (``path``: the scored file; ``cam_dir``: the stored maps) are
    resolved against these and must stay inside them (:func:`medxray.review.safe.contained_path`).
    """
    from medxray.review.safe import existing_roots

    return existing_roots([results_input_root(out_dir), Path(out_dir)])


def resolve_result_path(out_dir: str | os.PathLike, path: str) -> Path:
    """Where a scored file is now: ``path`` (relative to INPUT_DIR or OUT, or absolute) resolved inside them.

    Raises :class:`medxray.review.safe.PathRefused` (a :class:`DataError`) when it leads outside
    both (``..``, an absolute path elsewhere, a symbolic link pointing out); nothing is read.
    """
    from medxray.review.safe import contained_path

    return contained_path(str(path), result_roots(out_dir), what="scored image")


def read_result_file(out_dir: str | os.PathLike, path: str, *, max_bytes: int) -> tuple[Path, bytes]:
    """(resolved path, bytes) of a row's scored file: contained (:func:`resolve_result_path`), a regular
    file, at most ``max_bytes``; raises :class:`DataError` (:class:`~medxray.review.safe.PathRefused`) otherwise."""
    from medxray.review.safe import read_contained_bytes

    return read_contained_bytes(str(path), result_roots(out_dir), max_bytes=max_bytes, what="scored image")


def stored_cam_path(out_dir: str | os.PathLike, row: Mapping[str, Any], finding: str) -> Path:
    """Overlay PNG that score-dicom wrote for one finding: ``OUT/<cam_dir>/<Finding>.png``, inside OUT.

    Raises :class:`medxray.review.safe.PathRefused` when ``cam_dir`` or the finding name (both read
    from results.csv) lead outside OUT.
    """
    from medxray.review.safe import contained_path

    cam_dir = str(row.get("cam_dir") or "").strip()
    if not cam_dir:
        from medxray.scoring import CAMS_DIR, output_stem

        cam_dir = f"{CAMS_DIR}/{output_stem(str(row.get('path', '')))}"
    return contained_path(f"{cam_dir}/{finding}.png", [Path(out_dir)], what="stored map")


MAX_KEY_BYTES = 512 * 2**20  # largest file hashed for a review key (a bound on what a row can make us read)


def row_image_key(out_dir: str | os.PathLike, row: Mapping[str, Any]) -> str | None:
    """Review key of a results row: its Study + Series + SOP Instance UIDs (:meth:`ImageKey.from_uids`:
    two patients cannot share it), else the SHA-256 of the file (None when the file is missing,
    unreadable or outside the results folder's roots)."""
    key = ImageKey.from_uids(row.get("study_instance_uid"), row.get("series_instance_uid"), row.get("sop_instance_uid"))
    if key is not None:
        return key.value
    try:
        _, data = read_result_file(out_dir, str(row.get("path", "")), max_bytes=MAX_KEY_BYTES)
    except (DataError, OSError) as exc:
        log.warning("no review key for a results row: %s", exc)
        return None
    return hashlib.sha256(data).hexdigest()


WORKLIST_COLUMNS: tuple[str, ...] = (
    "file",
    "status",
    "top_finding",
    "max_probability",
    "positive_findings",
    "n_positive",
    "modality",
    "view",
    "reviewed",
    "reviewer",
    "review_summary",
    "reason",
)


def row_image_keys(results: pd.DataFrame, out_dir: str | os.PathLike) -> list[str | None]:
    """:func:`row_image_key` of every ``ok`` row (None for the others), in row order."""
    return [
        row_image_key(out_dir, r.to_dict()) if str(r.get("status")) == "ok" else None for _, r in results.iterrows()
    ]


def worklist_table(
    results: pd.DataFrame,
    out_dir: str | os.PathLike,
    thresholds: Mapping[str, float],
    reviews: Mapping[str, Review],
    keys: Sequence[str | None] | None = None,
) -> pd.DataFrame:
    """One row per scored file with its most likely finding and review state.

    Positive findings are recomputed with the thresholds in use (they may differ from the ones
    the batch scorer used). Finding names are shown as people read them; ``reason`` is a sentence
    (the code stays in ``reason_code``). Extra columns ``row`` (index into ``results``) and
    ``image_key`` let the page open the study; ``keys`` (from :func:`row_image_keys`) saves
    hashing every PNG again.
    """
    labels = result_label_names(results)
    if keys is None:
        keys = row_image_keys(results, out_dir)
    rows = []
    for pos_i, (idx, r) in enumerate(results.iterrows()):
        rd = r.to_dict()
        probs = result_probabilities(rd, labels) if labels else None
        key = keys[pos_i] if str(rd.get("status")) == "ok" else None
        rev = reviews.get(key) if key else None
        if probs is not None and len(probs):
            top = int(np.argmax(probs))
            pos = [n for n, p in zip(labels, probs) if p >= thresholds.get(n, 0.5)]
            top_name, max_p = labels[top], float(probs[top])
        else:
            pos, top_name, max_p = [], "", float("nan")
        rows.append(
            {
                "file": Path(str(rd.get("path", ""))).name,
                "status": str(rd.get("status", "")),
                "top_finding": display_name(top_name) if top_name else "",
                "max_probability": max_p,
                "positive_findings": "; ".join(display_name(n) for n in pos),
                "n_positive": len(pos),
                "modality": str(rd.get("modality", "") or ""),
                "view": str(rd.get("view_position", "") or ""),
                "reviewed": rev is not None,
                "reviewer": rev.reviewer if rev else "",
                "review_summary": ", ".join(f"{display_name(f)}: {v}" for f, v in rev.verdicts.items()) if rev else "",
                "reason": reason_sentence(str(rd.get("reason", "") or "")),
                "reason_code": str(rd.get("reason", "") or "").split(":", 1)[0] if rd.get("reason") else "",
                "warnings": "" if pd.isna(rd.get("warnings")) else str(rd.get("warnings") or ""),
                "row": int(idx),
                "image_key": key or "",
            }
        )
        for n in labels:
            rows[-1][f"p_{n}"] = float(probs[labels.index(n)]) if probs is not None else float("nan")
    cols = list(WORKLIST_COLUMNS) + ["reason_code", "warnings", "row", "image_key"] + [f"p_{n}" for n in labels]
    return pd.DataFrame(rows, columns=cols)


def filter_worklist(
    table: pd.DataFrame,
    *,
    statuses: Iterable[str] | None = None,
    finding: str | None = None,
    positive_only: bool = False,
    reviewed: str = "all",
    search: str = "",
    sort_by: str = "max_probability",
    descending: bool = True,
    warning: str | None = None,
) -> pd.DataFrame:
    """Filter and sort the worklist; ``finding`` focuses on one finding's probability.

    ``warning``: keep rows whose results.csv ``warnings`` hold a warning of this kind (a prefix of
    :data:`medxray.dicom.codes.WARNING_PREFIXES`, e.g. ``"out of distribution"``), ``"any"`` for rows
    with any warning, ``"none"`` for rows without one.
    """
    df = table
    if statuses is not None:
        df = df[df["status"].isin(list(statuses))]
    if warning and "warnings" in df.columns:
        texts = df["warnings"].fillna("").astype(str)
        if warning == "any":
            df = df[texts != ""]
        elif warning == "none":
            df = df[texts == ""]
        else:
            kind = re.compile(r"(^|; )" + re.escape(warning), re.IGNORECASE)  # texts are joined with "; "
            df = df[texts.apply(lambda s: bool(kind.search(s)))]
    if reviewed == "reviewed":
        df = df[df["reviewed"]]
    elif reviewed == "not reviewed":
        df = df[~df["reviewed"]]
    if search.strip():
        df = df[df["file"].str.contains(search.strip(), case=False, regex=False)]
    if finding:
        col = f"p_{finding}"
        if positive_only:
            df = df[df["positive_findings"].apply(lambda s: display_name(finding) in s.split("; "))]
        if sort_by == "finding_probability" and col in df.columns:
            sort_by = col
    elif positive_only:
        df = df[df["n_positive"] > 0]
    if sort_by == "finding_probability":
        sort_by = "max_probability"
    if sort_by in df.columns:
        df = df.sort_values(sort_by, ascending=not descending, kind="stable", na_position="last")
    return df.reset_index(drop=True)


# -- stepping through the worklist (keyboard flow) -----------------------------------------------


def step_row(order: Sequence[int], current: int | None, step: int) -> int | None:
    """The row ``step`` places after (or before, when negative) ``current`` in ``order``; None past either end.

    ``order`` is the worklist's row order as shown (``row`` values of the filtered, sorted table);
    a ``current`` row not in it starts from the first row.
    """
    order = list(order)
    if not order:
        return None
    if current not in order:
        return order[0] if step > 0 else order[-1]
    i = order.index(current) + step
    return order[i] if 0 <= i < len(order) else None


def next_unreviewed(order: Sequence[int], current: int | None, reviewed: Iterable[int]) -> int | None:
    """The first unreviewed row after ``current`` in ``order`` (wrapping round), None when all are reviewed."""
    order = list(order)
    done = set(reviewed)
    start = order.index(current) + 1 if current in order else 0
    for r in order[start:] + order[:start]:
        if r not in done and r != current:
            return r
    return None


def find_results_folders(roots: Sequence[Path], *, max_depth: int = 2, limit: int = 200) -> list[Path]:
    """Folders holding a results.csv: each root that does, then those up to ``max_depth`` below it
    (sorted, at most ``limit``); the roots themselves when none does."""
    found: list[Path] = []
    for root in roots:
        if (Path(root) / RESULTS_FILENAME).is_file():
            found.append(Path(root))
        frontier = [Path(root)]
        for _ in range(max_depth):
            nxt: list[Path] = []
            for d in frontier:
                try:
                    subs = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
                except OSError:
                    continue
                nxt.extend(subs)
                found.extend(p for p in subs if (p / RESULTS_FILENAME).is_file())
            frontier = nxt
            if len(found) >= limit:
                break
    return list(dict.fromkeys(found))[:limit] or [Path(r) for r in roots]
