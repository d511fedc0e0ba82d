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

import csv
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medxray.data.core import DatasetSplits, Records, make_splits
from medxray.data.manifest import content_sha256, open_text
from medxray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

POSITIVE = {"1", "1.0", "true", "yes", "y", "positive", "pos"}
NEGATIVE = {"0", "0.0", "false", "no", "n", "negative", "neg"}
UNKNOWN = {"", "-1", "-1.0", "u", "na", "n/a", "nan", "?", "unknown", "uncertain"}
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


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
    root = Path(data_root).expanduser() if data_root is not None and Path(data_root).is_dir() else csv_file.parent
    base = csv_file.parent
    names, paths, patients, views, splits, lab, msk, bad = [], [], [], [], [], [], [], []
    try:
        with open_text(csv_file) as fh:
            reader = csv.reader(fh)
            header = [c.strip() for c in next(reader, [])]
            for col in (image_column, patient_column):
                if col not in header:
                    raise DataError(
                        f"{csv_file} has no {col!r} column (found: {', '.join(header[:10])}); every manifest "
                        f"needs an image path column and a patient id column"
                    )
            meta_cols = {image_column, patient_column, split_column, view_column}
            label_names = list(labels) if labels is not None else [c for c in header if c and c not in meta_cols]
            lacking = [c for c in label_names if c not in header]
            if lacking or not label_names:
                raise DataError(
                    f"{csv_file}: finding column(s) {lacking or '(none)'} not found; add one column per "
                    f"finding (1/0, blank = unknown)"
                )
            ii, ipat = header.index(image_column), header.index(patient_column)
            isp = header.index(split_column) if split_column in header else None
            iv = header.index(view_column) if view_column in header else None
            il = [header.index(c) for c in label_names]
            width = max([ii, ipat, *il, *(x for x in (isp, iv) if x is not None)]) + 1
            seen: set[str] = set()
            for lineno, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                reason = None
                if len(row) < width:
                    reason = f"{len(row)} fields, expected {width}"
                else:
                    img, pat = row[ii].strip(), row[ipat].strip()
                    sp = SPLITS.get(row[isp].strip().lower(), None) if isp is not None else "train"
                    cells = [row[i].strip().lower() for i in il]
                    odd = [c for c in cells if c not in POSITIVE | NEGATIVE | UNKNOWN]
                    if not img:
                        reason = "empty image path"
                    elif not pat:
                        reason = "empty patient id"
                    elif sp is None:
                        reason = f"split {row[isp].strip()!r} is not train/val/test"  # type: ignore[index]
                    elif odd:
                        reason = f"label value {odd[0]!r} is not 1/0/blank"
                    elif img in seen:
                        reason = "duplicate image"
                if reason is not None:
                    bad.append(f"line {lineno}: {reason}")
                    continue
                seen.add(img)
                path = Path(img) if Path(img).is_absolute() else base / img
                names.append(img)
                paths.append(str(path))
                patients.append(pat)
                views.append(row[iv].strip().upper() if iv is not None else "")
                splits.append(sp)
                lab.append([1.0 if c in POSITIVE else 0.0 for c in cells])
                msk.append([0.0 if c in UNKNOWN else 1.0 for c in cells])
    except (UnicodeDecodeError, csv.Error, OSError, EOFError) as exc:
        raise DataError(f"{csv_file} is not a readable CSV ({exc})") from None
    if bad:
        log.warning("%s: skipped %d malformed row(s) (first: %s)", csv_file, len(bad), "; ".join(bad[:5]))
    if not names:
        raise DataError(f"{csv_file} has no usable rows ({len(bad)} malformed; first: {'; '.join(bad[:3]) or 'none'})")
    if isp is None and split_column != "split":
        raise ConfigError(f"split column {split_column!r} not found in {csv_file}")
    c = len(label_names)
    pool = Records(
        names=names,
        paths=paths,
        patients=patients,
        views=views,
        labels=np.asarray(lab, dtype=np.float32).reshape(-1, c),
        mask=np.asarray(msk, dtype=np.float32).reshape(-1, c),
    )
    ident = hashlib.sha256(f"{content_sha256(csv_file)}|{','.join(label_names)}".encode()).hexdigest()
    return make_splits(
        "csv",
        root,
        label_names,
        ident,
        pool,
        splits,
        cache_dir=cache_dir,
        aug_options=aug_options,
        aug_seed=aug_seed,
        on_bad_image=on_bad_image,
        extra_summary={
            "malformed_rows": len(bad),
            "csv_path": str(csv_file),
            "options": {"labels": ",".join(label_names)},
        },
        **common,
    )
