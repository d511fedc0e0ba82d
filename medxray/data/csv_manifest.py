"""A generic CSV manifest, so a hospital can fine-tune on its own images.

One row per image::

    image,patient_id,split,view,Effusion,Pneumothorax,...
    scans/a.png,P001,train,PA,1,0
    scans/b.png,P002,test,AP,,1        <- blank = unknown (masked out of the loss)

- ``image``: a path relative to the manifest's folder, or an absolute path (PNG/JPEG, 8/16-bit).
- ``patient_id``: required, because no patient may be in two splits.
- ``split``: optional (train / val / valid / test). Without it, or without any val rows,
  validation is a seeded, patient-disjoint share of train. Without test rows, test is None.
- ``view``: optional (PA / AP), used by the view filter.
- Every other column is a finding (or pass ``labels=[...]``). 1/0 (also 1.0, true/false,
  yes/no, positive/negative) are known values. Blank, -1, "u", "na" or "?" mean unknown, and
  the mask removes them from the loss. Anything else makes the row malformed: it is skipped
  and counted.

``data_root`` is the folder of the manifest (then ``csv_path`` defaults to
``DATA_ROOT/manifest.csv``) or the CSV file itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medxray.data.core import DatasetSplits, Records, csv_rows, make_splits
from medxray.data.manifest import content_sha256
from medxray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

POSITIVE = {"1", "1.0", "true", "yes", "y", "positive", "pos"}
NEGATIVE = {"0", "0.0", "false", "no", "n", "negative", "neg"}
UNKNOWN = {"", "-1", "-1.0", "u", "na", "n/a", "nan", "?", "unknown", "uncertain"}
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class ManifestColumns:
    """Where the manifest's columns are (0-based indices; None = the optional column is absent)."""

    image: int
    patient: int
    split: int | None
    view: int | None
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    @property
    def width(self) -> int:
        """The fields a row needs to hold every column used."""
        return max([self.image, self.patient, *self.labels, *(x for x in (self.split, self.view) if x is not None)]) + 1


@dataclass(frozen=True)
class ManifestRows:
    """The usable rows of a manifest as records, their split names and the malformed rows."""

    pool: Records
    splits: list[str]
    bad: list[str]  # "line N: reason"


def _manifest_file(data_root: str | os.PathLike | None, csv_path: str | os.PathLike | None) -> Path:
    """The manifest: ``csv_path`` (relative to ``data_root`` when not found as given), else
    ``data_root`` itself when it is a file, else ``DATA_ROOT/manifest.csv``; :class:`DataError`
    when there is none."""
    if data_root is None and csv_path is None:
        raise DataError("no manifest given; pass --data-root DIR (holding manifest.csv) or --csv PATH")
    if csv_path is None:
        p = Path(data_root).expanduser()  # type: ignore[arg-type]
        csv_file = p if p.is_file() else p / "manifest.csv"
    else:
        csv_file = Path(csv_path).expanduser()
        if not csv_file.is_absolute() and data_root is not None and not csv_file.is_file():
            csv_file = Path(data_root) / csv_file
    if not csv_file.is_file():
        raise DataError(
            f"CSV manifest {csv_file} not found; pass the manifest file (or its folder holding manifest.csv)"
        )
    return csv_file


def _columns(
    csv_file: Path, header: list[str], labels: Sequence[str] | None, image: str, patient: str, split: str, view: str
) -> ManifestColumns:
    """Find the columns in ``header`` (stripped); the findings are ``labels`` or every column not
    image/patient/split/view. :class:`DataError` when the image, patient or a finding column lacks."""
    for col in (image, patient):
        if col not in header:
            raise DataError(
                f"{csv_file} has no {col!r} column (found: {', '.join(header[:10])}); every manifest "
                f"needs an image path column and a patient id column"
            )
    meta_cols = {image, patient, split, view}
    label_names = list(labels) if labels is not None else [c for c in header if c and c not in meta_cols]
    lacking = [c for c in label_names if c not in header]
    if lacking or not label_names:
        raise DataError(
            f"{csv_file}: finding column(s) {lacking or '(none)'} not found; add one column per "
            f"finding (1/0, blank = unknown)"
        )
    return ManifestColumns(
        image=header.index(image),
        patient=header.index(patient),
        split=header.index(split) if split in header else None,
        view=header.index(view) if view in header else None,
        labels=tuple(header.index(c) for c in label_names),
        label_names=tuple(label_names),
    )


def _row_problem(row: list[str], cols: ManifestColumns, seen: set[str]) -> str | None:
    """Why ``row`` is malformed (too few fields, empty image or patient, unknown split, a label
    value not 1/0/blank, an image already listed), or None."""
    if len(row) < cols.width:
        return f"{len(row)} fields, expected {cols.width}"
    img, pat = row[cols.image].strip(), row[cols.patient].strip()
    sp = SPLITS.get(row[cols.split].strip().lower(), None) if cols.split is not None else "train"
    odd = [c for c in (row[i].strip().lower() for i in cols.labels) if c not in POSITIVE | NEGATIVE | UNKNOWN]
    if not img:
        return "empty image path"
    if not pat:
        return "empty patient id"
    if sp is None:
        return f"split {row[cols.split].strip()!r} is not train/val/test"  # type: ignore[index]
    if odd:
        return f"label value {odd[0]!r} is not 1/0/blank"
    if img in seen:
        return "duplicate image"
    return None


def _read_rows(csv_file: Path, rows: Any, cols: ManifestColumns) -> ManifestRows:
    """Parse the data rows (``rows`` from :func:`medxray.data.core.csv_rows`): image paths are
    resolved against the manifest's folder unless absolute; labels 1/0, mask 0 for unknown."""
    names, paths, patients, views, splits, lab, msk, bad = [], [], [], [], [], [], [], []
    seen: set[str] = set()
    for lineno, row in rows:
        reason = _row_problem(row, cols, seen)
        if reason is not None:
            bad.append(f"line {lineno}: {reason}")
            continue
        img = row[cols.image].strip()
        cells = [row[i].strip().lower() for i in cols.labels]
        seen.add(img)
        names.append(img)
        paths.append(str(Path(img) if Path(img).is_absolute() else csv_file.parent / img))
        patients.append(row[cols.patient].strip())
        views.append(row[cols.view].strip().upper() if cols.view is not None else "")
        splits.append(SPLITS[row[cols.split].strip().lower()] if cols.split is not None else "train")
        lab.append([1.0 if c in POSITIVE else 0.0 for c in cells])
        msk.append([0.0 if c in UNKNOWN else 1.0 for c in cells])
    c = len(cols.labels)
    pool = Records(
        names=names,
        paths=paths,
        patients=patients,
        views=views,
        labels=np.asarray(lab, dtype=np.float32).reshape(-1, c),
        mask=np.asarray(msk, dtype=np.float32).reshape(-1, c),
    )
    return ManifestRows(pool=pool, splits=splits, bad=bad)


def build(
    data_root: str | os.PathLike | None,
    *,
    csv_path: str | os.PathLike | None = None,
    labels: Sequence[str] | None = None,
    image_column: str = "image",
    patient_column: str = "patient_id",
    split_column: str = "split",
    view_column: str = "view",
    cache_dir: str | os.PathLike | None = None,
    aug_options: dict[str, Any] | None = None,
    aug_seed: int | None = None,
    on_bad_image: str = "mask",
    **common: Any,
) -> DatasetSplits:
    """Datasets from a CSV manifest (see the module docstring)."""
    csv_file = _manifest_file(data_root, csv_path)
    root = Path(data_root).expanduser() if data_root is not None and Path(data_root).is_dir() else csv_file.parent
    with csv_rows(csv_file, "{path} is not a readable CSV ({exc})") as (header_row, rows):
        header = [c.strip() for c in header_row or []]
        cols = _columns(csv_file, header, labels, image_column, patient_column, split_column, view_column)
        got = _read_rows(csv_file, rows, cols)
    if got.bad:
        log.warning("%s: skipped %d malformed row(s) (first: %s)", csv_file, len(got.bad), "; ".join(got.bad[:5]))
    if not got.pool.names:
        raise DataError(
            f"{csv_file} has no usable rows ({len(got.bad)} malformed; first: {'; '.join(got.bad[:3]) or 'none'})"
        )
    if cols.split is None and split_column != "split":
        raise ConfigError(f"split column {split_column!r} not found in {csv_file}")
    label_names = list(cols.label_names)
    ident = hashlib.sha256(f"{content_sha256(csv_file)}|{','.join(label_names)}".encode()).hexdigest()
    return make_splits(
        "csv",
        root,
        label_names,
        ident,
        got.pool,
        got.splits,
        cache_dir=cache_dir,
        aug_options=aug_options,
        aug_seed=aug_seed,
        on_bad_image=on_bad_image,
        extra_summary={
            "malformed_rows": len(got.bad),
            "csv_path": str(csv_file),
            "options": {"labels": ",".join(label_names)},
        },
        **common,
    )
