"""NIH ChestX-ray14: a data root as NIH ships it, the official split, patient-disjoint validation.

Data root layout (images flat, or spread over the 12 archive folders, or the root itself)::

    ROOT/images/00000001_000.png ...            or   ROOT/images_001/images/00000001_000.png ...
    ROOT/Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv)      optional, else the shipped copy
    ROOT/train_val_list.txt, ROOT/test_list.txt, ROOT/BBox_List_2017.csv   optional, else shipped

Splits: test = the official test list; validation = a seeded, patient-disjoint share of the
official train_val list's patients (prevalence-stratified); train = the rest of train_val.
"""

from __future__ import annotations

import csv
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medxray.data.core import (
    DatasetSplits,
    Records,
    assert_patient_disjoint,
    check_view,
    csv_rows,
    drop_missing_splits,
    filter_view,
    limit_per_patient,
    patient_val_split,
    split_datasets,
    split_hash,
    split_summary,
)
from medxray.data.manifest import (
    content_sha256,
    is_phantom_root,
    known_content_hashes,
    open_text,
    read_name_list,
    shipped_files,
)
from medxray.errors import DataError
from medxray.labels import CHESTXRAY14_FINDINGS

log = logging.getLogger(__name__)

LABEL_FILE_NAMES = (
    "Data_Entry_2017_v2020.csv",
    "Data_Entry_2017_v2020.csv.gz",
    "Data_Entry_2017.csv",
    "Data_Entry_2017.csv.gz",
)
LIST_FILE_NAMES = {
    "train_val_list": ("train_val_list.txt", "train_val_list.txt.gz"),
    "test_list": ("test_list.txt", "test_list.txt.gz"),
    "boxes": ("BBox_List_2017.csv", "BBox_List_2017.csv.gz"),
}
NO_FINDING = "No Finding"
# The bounding-box file spells one finding differently from the label file.
BOX_FINDING_ALIASES = {"Infiltrate": "Infiltration"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
EXPECTED_IMAGE_SIZE = (1024, 1024)


@dataclass(frozen=True)
class LabelTable:
    """The parsed label file (read-only; cached per process)."""

    path: str
    content_sha256: str
    header: str
    names: tuple[str, ...]
    patients: tuple[str, ...]
    views: tuple[str, ...]
    lines: tuple[str, ...]  # each row as its CSV text (the phantom copies rows verbatim)
    labels: np.ndarray  # (N, 14) uint8
    malformed: int
    malformed_examples: tuple[str, ...]

    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}


def read_label_file(path: str | os.PathLike) -> LabelTable:
    """Parse a ChestX-ray14 ``Data_Entry_2017*.csv`` (plain or gzip) into a :class:`LabelTable`.

    Malformed rows (too few fields, empty name or patient, unknown finding, "No Finding" mixed
    with findings, duplicate image) are dropped and counted. A warning names their line numbers.
    A file without the required columns, or with no usable row, is refused.
    """
    p = Path(path).resolve()
    st = p.stat()
    return _read_label_file_cached(str(p), st.st_size, st.st_mtime_ns)


_LABEL_COLUMNS = {"name": "Image Index", "labels": "Finding Labels", "patient": "Patient ID", "view": "View Position"}
_FINDING_INDEX = {f: i for i, f in enumerate(CHESTXRAY14_FINDINGS)}


def _label_columns(path: str, header_row: list[str] | None) -> dict[str, int]:
    """Column index of each of :data:`_LABEL_COLUMNS` in the label file's header;
    :class:`DataError` for an empty file or a missing column."""
    if not header_row:
        raise DataError(f"label file {path} is empty; expected the ChestX-ray14 Data_Entry_2017 CSV")
    cols = [c.strip() for c in header_row]
    missing = [v for v in _LABEL_COLUMNS.values() if v not in cols]
    if missing:
        raise DataError(
            f"label file {path} lacks the column(s) {', '.join(missing)} (found: {', '.join(cols[:8])}); "
            f"expected NIH's Data_Entry_2017_v2020.csv"
        )
    return {k: cols.index(v) for k, v in _LABEL_COLUMNS.items()}


def _label_row(row: list[str], ix: dict[str, int], seen: set[str]) -> tuple[str | None, list[str]]:
    """(why the row is malformed or None, its findings from the "|"-separated Finding Labels).
    Malformed: too few fields, no image file name, no patient, no or unknown findings, "No
    Finding" with findings, an image already seen."""
    width = max(ix.values()) + 1
    if len(row) < width:
        return f"{len(row)} fields, expected at least {width}", []
    name = row[ix["name"]].strip()
    found = [t.strip() for t in row[ix["labels"]].strip().split("|") if t.strip()]
    unknown = [t for t in found if t != NO_FINDING and t not in _FINDING_INDEX]
    if not name or not name.lower().endswith(IMAGE_SUFFIXES):
        return "no image file name", found
    if not row[ix["patient"]].strip():
        return "no patient id", found
    if not found:
        return "empty Finding Labels", found
    if unknown:
        return f"unknown finding {unknown[0]!r}", found
    if NO_FINDING in found and len(found) > 1:
        return "'No Finding' together with findings", found
    if name in seen:
        return f"duplicate image {name}", found
    return None, found


@functools.lru_cache(maxsize=4)
def _read_label_file_cached(path: str, size: int, mtime_ns: int) -> LabelTable:
    names: list[str] = []
    patients: list[str] = []
    views: list[str] = []
    lines: list[str] = []
    rows_labels: list[list[int]] = []
    bad: list[str] = []
    seen: set[str] = set()
    unreadable = "label file {path} is not a readable CSV ({exc}); re-download it"
    with csv_rows(path, unreadable) as (header_row, rows):
        ix = _label_columns(path, header_row)
        for lineno, row in rows:
            reason, found = _label_row(row, ix, seen)
            if reason is not None:
                bad.append(f"line {lineno}: {reason}")
                continue
            name = row[ix["name"]].strip()
            seen.add(name)
            vec = [0] * len(CHESTXRAY14_FINDINGS)
            for t in found:
                if t != NO_FINDING:
                    vec[_FINDING_INDEX[t]] = 1
            names.append(name)
            patients.append(row[ix["patient"]].strip())
            views.append(row[ix["view"]].strip().upper())
            lines.append(",".join(row))
            rows_labels.append(vec)
    if not names:
        raise DataError(
            f"label file {path} has no usable rows ({len(bad)} malformed; first: "
            f"{'; '.join(bad[:3]) or 'none'}); expected NIH's Data_Entry_2017_v2020.csv"
        )
    if bad:
        log.warning("label file %s: skipped %d malformed row(s) (first: %s)", path, len(bad), "; ".join(bad[:5]))
    return LabelTable(
        path=path,
        content_sha256=content_sha256(path),
        header=",".join(header_row or []),
        names=tuple(names),
        patients=tuple(patients),
        views=tuple(views),
        lines=tuple(lines),
        labels=np.asarray(rows_labels, dtype=np.uint8),
        malformed=len(bad),
        malformed_examples=tuple(bad[:5]),
    )


def read_box_file(path: str | os.PathLike) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """``BBox_List_2017.csv`` -> ({image name: [{finding, x, y, w, h}]}, malformed row count).

    Coordinates are pixels of the 1024x1024 PNG. NIH's "Infiltrate" is mapped to "Infiltration".
    """
    boxes: dict[str, list[dict[str, Any]]] = {}
    bad: list[str] = []
    try:
        with open_text(path) as fh:
            reader = csv.reader(fh)
            next(reader, None)
            for lineno, row in enumerate(reader, start=2):
                if not row or all(not c.strip() for c in row):
                    continue
                try:
                    name, finding = row[0].strip(), row[1].strip()
                    finding = BOX_FINDING_ALIASES.get(finding, finding)
                    x, y, w, h = (float(v) for v in row[2:6])
                    if finding not in CHESTXRAY14_FINDINGS or not name or w <= 0 or h <= 0:
                        raise ValueError(finding)
                except (ValueError, IndexError):
                    bad.append(f"line {lineno}")
                    continue
                boxes.setdefault(name, []).append({"finding": finding, "x": x, "y": y, "w": w, "h": h})
    except (UnicodeDecodeError, csv.Error, OSError, EOFError) as exc:
        raise DataError(f"bounding-box file {path} is not a readable CSV ({exc})") from None
    if bad:
        log.warning("bounding-box file %s: skipped %d malformed row(s) (first: %s)", path, len(bad), ", ".join(bad[:5]))
    return boxes, len(bad)


# --------------------------------------------------------------------------------------------
# data root


def check_root(data_root: str | os.PathLike | None) -> Path:
    if data_root is None or str(data_root) == "":
        raise DataError("no data root given; pass --data-root (the folder holding images/ or images_001/images/ ...)")
    root = Path(data_root).expanduser()
    if not root.exists():
        raise DataError(
            f"data root {root} does not exist; pass --data-root pointing at the folder that holds "
            f"images/ (or images_001/images/ ...), see data_manifests/chestxray14/README.md"
        )
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder; pass the folder that holds images/")
    return root


def resolve_files(root: Path | None) -> dict[str, Path]:
    """The label, list and box files to use: the data root's own when present, else the shipped ones."""
    shipped = shipped_files("chestxray14")
    out: dict[str, Path] = {}
    if root is not None:
        for name in LABEL_FILE_NAMES:
            if (root / name).is_file():
                out["labels"] = root / name
                break
        for role, names in LIST_FILE_NAMES.items():
            for name in names:
                if (root / name).is_file():
                    out[role] = root / name
                    break
    known = known_content_hashes("chestxray14")
    for role in ("labels", "train_val_list", "test_list", "boxes"):
        if role not in out:
            out[role] = shipped[role]
        elif known.get(content_sha256(out[role])) == role:
            log.debug("%s in the data root is identical to the shipped manifest", out[role].name)
        else:
            log.info("using %s from the data root (it differs from the shipped manifest)", out[role])
    return out


def scan_images(root: Path) -> dict[str, str]:
    """Image name -> path for every image in ROOT/images, ROOT/images_*/images, ROOT/images_* and ROOT."""
    dirs = [root / "images"]
    dirs += sorted(d / "images" for d in root.glob("images_*") if d.is_dir())
    dirs += sorted(d for d in root.glob("images_*") if d.is_dir())
    dirs.append(root)
    found: dict[str, str] = {}
    dupes = 0
    for d in dirs:
        if not d.is_dir():
            continue
        try:
            with os.scandir(d) as it:
                for e in it:
                    if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file():
                        if e.name in found:
                            dupes += 1
                        else:
                            found[e.name] = e.path
        except OSError as exc:
            raise DataError(f"cannot list {d}: {exc.strerror}; check permissions of the data root") from None
    if dupes:
        log.warning("%d image name(s) occur in more than one image folder under %s; using the first copy", dupes, root)
    return found


# --------------------------------------------------------------------------------------------
# splits


def _listed_records(table: LabelTable, index: dict[str, int], names: Sequence[str]) -> tuple[Records, int]:
    """Records (empty paths, every label known) of the ``names`` that have a row in ``table``
    (``index``: name -> row), and how many names have none."""
    idx = [index[n] for n in names if n in index]
    rec = Records(
        names=[table.names[i] for i in idx],
        paths=[""] * len(idx),
        patients=[table.patients[i] for i in idx],
        views=[table.views[i] for i in idx],
        labels=table.labels[idx].astype(np.float32),
        mask=np.ones((len(idx), len(CHESTXRAY14_FINDINGS)), dtype=np.float32),
    )
    return rec, len(names) - len(idx)


def split_records(
    data_root: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    view: str = "all",
    max_per_patient: int | None = None,
) -> tuple[dict[str, Records], dict[str, Any]]:
    """The official split with a seeded patient-disjoint validation part, before looking at images.

    Returns ({"train", "val", "test"}: Records with empty paths, info). ``data_root=None`` uses
    the shipped manifests alone, which covers all 112,120 rows without any image.
    """
    root = check_root(data_root) if data_root is not None else None
    files = resolve_files(root)
    table = read_label_file(files["labels"])
    train_val = read_name_list(files["train_val_list"])
    test = read_name_list(files["test_list"])
    index = table.index()
    view = check_view(view)

    overlap = set(train_val) & set(test)
    if overlap:
        raise DataError(
            f"{len(overlap)} image(s) are in both {files['train_val_list'].name} and "
            f"{files['test_list'].name}; fix the split lists"
        )
    tv, unl_tv = _listed_records(table, index, train_val)
    te, unl_te = _listed_records(table, index, test)
    if unl_tv + unl_te:
        log.warning(
            "%d image(s) in the split lists have no (valid) row in %s and are left out",
            unl_tv + unl_te,
            files["labels"].name,
        )
    if len(tv) == 0:
        raise DataError(f"no labelled image of {files['train_val_list']} is in {files['labels']}; check the files")
    is_val = patient_val_split(tv.patients, tv.labels, tv.mask, val_fraction, split_seed)
    parts = {"train": tv.subset(np.flatnonzero(~is_val)), "val": tv.subset(np.flatnonzero(is_val)), "test": te}
    assert_patient_disjoint(parts)
    parts = {k: limit_per_patient(filter_view(r, view), max_per_patient, split_seed) for k, r in parts.items()}
    listed = set(train_val) | set(test)
    info = {
        "files": {k: str(v) for k, v in files.items()},
        "label_sha256": table.content_sha256,
        "label_rows": len(table.names),
        "malformed_rows": table.malformed,
        "unlabelled_in_lists": unl_tv + unl_te,
        "labelled_not_in_lists": sum(1 for n in table.names if n not in listed),
    }
    return parts, info


def _is_phantom_with_warning(root: Path) -> bool:
    """Whether ``root`` is a phantom root (:func:`is_phantom_root`); warns when it is."""
    synthetic = is_phantom_root(root)
    if synthetic:
        log.warning(
            "data root %s holds SYNTHETIC phantom images (medxray data synth), not real radiographs; "
            "results on it say nothing about clinical performance",
            root,
        )
    return synthetic


def _image_sources(
    root: Path, image_size: int, label_sha256: str, use_cache: bool, cache_dir: str | os.PathLike | None
) -> tuple[dict[str, str], Any | None]:
    """The image files under ``root`` by name (:func:`scan_images`) and the finished cache that
    fits (None when ``use_cache`` is off or none fits); :class:`DataError` when there is neither."""
    from medxray.data.cache import find_cache

    on_disk = scan_images(root)
    cache = find_cache(root, "chestxray14", image_size, label_sha256, cache_dir=cache_dir) if use_cache else None
    if not on_disk and cache is None:
        raise DataError(
            f"no images found under {root} (looked in images/, images_*/images/ and the root itself); "
            f"download them as data_manifests/chestxray14/README.md says, or generate phantom data "
            f"with `medxray data synth --out DIR`"
        )
    return on_disk, cache


def _boxes_of(parts: dict[str, Records], box_file: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """The boxes of ``box_file`` (:func:`read_box_file`) of the images kept in ``parts``."""
    all_boxes, _ = read_box_file(box_file)
    used = {n for rec in parts.values() for n in rec.names}
    return {n: b for n, b in all_boxes.items() if n in used}


def _summary(
    root: Path,
    synthetic: bool,
    parts: dict[str, Records],
    missing: dict[str, int],
    cache: Any | None,
    boxes: dict[str, list[dict[str, Any]]],
    info: dict[str, Any],
    image_size: int,
    val_fraction: float,
    split_seed: int,
    view: str,
    max_per_patient: int | None,
) -> dict[str, Any]:
    """:attr:`DatasetSplits.summary` of ChestX-ray14: counts, patients and prevalence per split, the
    settings, missing files dropped, the cache used, boxes kept and :func:`split_records`'s info."""
    return {
        "dataset": "chestxray14",
        "data_root": str(root),
        "synthetic": synthetic,
        "image_size": int(image_size),
        "label_names": list(CHESTXRAY14_FINDINGS),
        **split_summary(parts, CHESTXRAY14_FINDINGS),
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "view": check_view(view),
        "max_per_patient": max_per_patient,
        "missing_dropped": sum(missing.values()),
        "missing_dropped_by_split": missing,
        "cache": None if cache is None else str(cache.path),
        "boxes": sum(len(b) for b in boxes.values()),
        "split_note": "test = official NIH test list; val = seeded patient-disjoint share of train_val",
        **info,
    }


def build(
    data_root: str | os.PathLike,
    *,
    image_size: int = 224,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    view: str = "all",
    max_per_patient: int | None = None,
    allow_missing: bool = False,
    use_cache: bool = True,
    augment: bool = True,
    cache_dir: str | os.PathLike | None = None,
    aug_options: dict[str, Any] | None = None,
    aug_seed: int | None = None,
    on_bad_image: str = "mask",
) -> DatasetSplits:
    """ChestX-ray14 datasets for training (see :func:`medxray.data.build_datasets`)."""
    root = check_root(data_root)
    synthetic = _is_phantom_with_warning(root)
    parts, info = split_records(
        root, val_fraction=val_fraction, split_seed=split_seed, view=view, max_per_patient=max_per_patient
    )
    on_disk, cache = _image_sources(root, image_size, info["label_sha256"], use_cache, cache_dir)
    for rec in parts.values():
        rec.paths = [on_disk.get(n, "") for n in rec.names]
    parts, missing = drop_missing_splits(parts, root=root, cache=cache, allow_missing=allow_missing)
    datasets = split_datasets(
        parts,
        CHESTXRAY14_FINDINGS,
        image_size,
        cache=cache,
        augment=augment,
        aug_options=aug_options,
        aug_seed=split_seed if aug_seed is None else aug_seed,
        on_bad_image=on_bad_image,
    )
    boxes = _boxes_of(parts, info["files"]["boxes"])
    summary = _summary(
        root, synthetic, parts, missing, cache, boxes, info, image_size, val_fraction, split_seed, view, max_per_patient
    )
    extra = f"chestxray14 view={summary['view']} max_per_patient={max_per_patient}"
    return DatasetSplits(
        train=datasets["train"],
        val=datasets["val"],
        test=datasets["test"],
        label_names=list(CHESTXRAY14_FINDINGS),
        manifest_hash=split_hash(info["label_sha256"], parts, extra),
        summary=summary,
        boxes=boxes,
    )
