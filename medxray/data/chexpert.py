"""CheXpert (Irvin et al., AAAI 2019): ``train.csv`` / ``valid.csv`` with uncertain labels.

Data root = the folder that holds ``train.csv`` and ``valid.csv`` (e.g. ``CheXpert-v1.0-small/``).
Its ``Path`` column reads ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``.
It is resolved against the data root's parent, against the root itself, and against the root
with the first path component removed.

Labels are 1 (positive), 0 (negative), -1 (uncertain) or blank (not mentioned in the report).
``uncertain``: "ignore" (default: masked out of the loss), "ones" (U-Ones) or "zeros" (U-Zeros),
the policies compared in the CheXpert paper. ``blank``: "zeros" (default, the paper's reading
of "not mentioned") or "ignore". Splits: train.csv -> train + a seeded patient-disjoint
validation share; valid.csv (radiologist-labelled) -> test.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medxray.data.core import DatasetSplits, Records, csv_rows, make_splits
from medxray.data.manifest import content_sha256
from medxray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
# The five observations of the CheXpert competition, for labels="competition".
CHEXPERT_COMPETITION: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
POLICIES = ("ignore", "ones", "zeros")
_PATIENT = re.compile(r"(patient\d+)")


def _value(text: str, uncertain: str, blank: str) -> tuple[float, float] | None:
    """(label, mask) of one cell, or None when the cell is not a CheXpert label value."""
    t = text.strip()
    if t == "":
        return (0.0, 1.0) if blank == "zeros" else (0.0, 0.0)
    try:
        v = float(t)
    except ValueError:
        return None
    if v == 1.0:
        return 1.0, 1.0
    if v == 0.0:
        return 0.0, 1.0
    if v == -1.0:
        return {"ones": (1.0, 1.0), "zeros": (0.0, 1.0), "ignore": (0.0, 0.0)}[uncertain]
    return None


def read_chexpert_csv(
    path: Path, root: Path, label_names: Sequence[str], uncertain: str, blank: str, frontal_only: bool
) -> tuple[Records, int]:
    """Parse one CheXpert CSV into Records (paths resolved, "" when missing) and a malformed count."""
    names, paths, patients, views, labels, masks, bad = [], [], [], [], [], [], []
    with csv_rows(path, "{path} is not a readable CSV ({exc})") as (header_row, rows):
        header = [c.strip() for c in header_row or []]
        need = ["Path", *label_names]
        lacking = [c for c in need if c not in header]
        if lacking:
            raise DataError(f"{path} lacks the column(s) {', '.join(lacking)}; expected CheXpert's train.csv/valid.csv")
        ip = header.index("Path")
        ifl = header.index("Frontal/Lateral") if "Frontal/Lateral" in header else None
        iap = header.index("AP/PA") if "AP/PA" in header else None
        il = [header.index(c) for c in label_names]
        width = max([ip, *il]) + 1
        for lineno, row in rows:
            if len(row) < width or not row[ip].strip():
                bad.append(f"line {lineno}")
                continue
            if frontal_only and ifl is not None and row[ifl].strip().lower() == "lateral":
                continue
            vals = [_value(row[i], uncertain, blank) for i in il]
            if any(v is None for v in vals):
                bad.append(f"line {lineno}")
                continue
            rel = row[ip].strip()
            parts = Path(rel).parts
            name = str(Path(*parts[1:])) if len(parts) > 1 and parts[0].lower().startswith("chexpert") else rel
            m = _PATIENT.search(rel)
            names.append(name)
            paths.append(_resolve(root, rel, name))
            patients.append(m.group(1) if m else str(Path(rel).parent.parent))
            views.append(row[iap].strip().upper() if iap is not None else "")
            labels.append([v[0] for v in vals])  # type: ignore[index]
            masks.append([v[1] for v in vals])  # type: ignore[index]
    if bad:
        log.warning("%s: skipped %d malformed row(s) (first: %s)", path, len(bad), ", ".join(bad[:5]))
    c = len(label_names)
    rec = Records(
        names=names,
        paths=paths,
        patients=patients,
        views=views,
        labels=np.asarray(labels, dtype=np.float32).reshape(-1, c),
        mask=np.asarray(masks, dtype=np.float32).reshape(-1, c),
    )
    return rec, len(bad)


def _resolve(root: Path, rel: str, name: str) -> str:
    for cand in (root.parent / rel, root / rel, root / name):
        if cand.is_file():
            return str(cand)
    return ""


@dataclass(frozen=True)
class CheXpertPool:
    """train.csv and valid.csv read into one labelled pool."""

    records: Records
    given: list[str]  # split per record: "train" (train.csv) or "test" (valid.csv)
    malformed: int  # rows skipped in both files


def _label_names(labels: Sequence[str] | str | None) -> list[str]:
    """The observations to train on: all 14 (None), the 5 of the competition ("competition") or
    those named; :class:`ConfigError` for a name that is not a CheXpert observation."""
    if labels is None:
        return list(CHEXPERT_OBSERVATIONS)
    if labels == "competition":
        return list(CHEXPERT_COMPETITION)
    label_names = [str(x) for x in labels]
    unknown = [x for x in label_names if x not in CHEXPERT_OBSERVATIONS]
    if unknown or not label_names:
        raise ConfigError(f"unknown CheXpert label(s) {unknown}; choose from {', '.join(CHEXPERT_OBSERVATIONS)}")
    return label_names


def _read_pool(
    root: Path, tr_path: Path, va_path: Path, label_names: list[str], options: dict[str, Any]
) -> CheXpertPool:
    """Read train.csv and (when present; else a warning and no test split) valid.csv with the
    ``options`` (uncertain, blank, frontal_only)."""
    read = (label_names, options["uncertain"], options["blank"], options["frontal_only"])
    train, bad_tr = read_chexpert_csv(tr_path, root, *read)
    pool, given, bad_va = train, ["train"] * len(train), 0
    if va_path.is_file():
        valid, bad_va = read_chexpert_csv(va_path, root, *read)
        pool = Records(
            names=train.names + valid.names,
            paths=train.paths + valid.paths,
            patients=train.patients + valid.patients,
            views=train.views + valid.views,
            labels=np.concatenate([train.labels, valid.labels]),
            mask=np.concatenate([train.mask, valid.mask]),
        )
        given += ["test"] * len(valid)
    else:
        log.warning("%s not found: CheXpert will have no test split", va_path)
    return CheXpertPool(records=pool, given=given, malformed=bad_tr + bad_va)


def build(
    data_root: str | os.PathLike | None,
    *,
    uncertain: str = "ignore",
    blank: str = "zeros",
    labels: Sequence[str] | str | None = None,
    frontal_only: bool = True,
    train_csv: str = "train.csv",
    valid_csv: str = "valid.csv",
    cache_dir: str | os.PathLike | None = None,
    aug_options: dict[str, Any] | None = None,
    aug_seed: int | None = None,
    on_bad_image: str = "mask",
    **common: Any,
) -> DatasetSplits:
    """CheXpert datasets (see the module docstring and :func:`medxray.data.build_datasets`)."""
    from medxray.data.chestxray14 import check_root

    if uncertain not in POLICIES:
        raise ConfigError(
            f"uncertain must be one of {', '.join(POLICIES)} (U-Ignore, U-Ones, U-Zeros), got {uncertain!r}"
        )
    if blank not in ("zeros", "ignore"):
        raise ConfigError(f"blank must be 'zeros' or 'ignore', got {blank!r}")
    label_names = _label_names(labels)
    root = check_root(data_root)
    tr_path, va_path = root / train_csv, root / valid_csv
    if not tr_path.is_file():
        raise DataError(f"{tr_path} not found; --data-root must be the CheXpert folder holding train.csv and valid.csv")
    options = {"uncertain": uncertain, "blank": blank, "frontal_only": frontal_only}
    got = _read_pool(root, tr_path, va_path, label_names, options)
    if len(set(got.records.names)) != len(got.records.names):
        raise DataError(f"{root}: the same image path is listed twice in {train_csv}/{valid_csv}; fix the CSVs")
    ident = hashlib.sha256(
        "|".join(
            [
                content_sha256(tr_path),
                content_sha256(va_path) if va_path.is_file() else "",
                repr(sorted(options.items())),
                ",".join(label_names),
            ]
        ).encode()
    ).hexdigest()
    return make_splits(
        "chexpert",
        root,
        label_names,
        ident,
        got.records,
        got.given,
        cache_dir=cache_dir,
        aug_options=aug_options,
        aug_seed=aug_seed,
        on_bad_image=on_bad_image,
        extra_summary={
            "malformed_rows": got.malformed,
            "options": options,
            "split_note": "test = CheXpert valid.csv; val = seeded patient-disjoint share of train.csv",
        },
        **common,
    )
