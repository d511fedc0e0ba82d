"""Pieces shared by every dataset: the torch Dataset, splits and summaries (decoding: imageio).

Each dataset module (ChestX-ray14, CheXpert, generic CSV) turns its own files into a
:class:`Records` table (image name, path, patient, view, labels, mask). Everything after that
happens here and is the same for every dataset: the patient-disjoint validation split, the view
and per-patient filters, missing-file handling, the summary and the :class:`XrayDataset` that
training iterates.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medxray.data.imageio import read_image
from medxray.data.manifest import open_text
from medxray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

VIEWS = ("all", "PA", "AP")


@dataclass
class DatasetSplits:
    """What :func:`medxray.data.build_datasets` returns (the contract training codes against)."""

    train: "XrayDataset"
    val: "XrayDataset"
    test: "XrayDataset | None"
    label_names: list[str]
    manifest_hash: str
    summary: dict[str, Any]
    boxes: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# records


@dataclass
class Records:
    """One table of images with labels; index i describes one image in every field."""

    names: list[str]  # unique key (file name, or relative path where names repeat)
    paths: list[str]  # resolved file path ("" when the file is not on disk)
    patients: list[str]
    views: list[str]  # "PA", "AP", ... ("" unknown)
    labels: np.ndarray  # (N, C) float32 0/1
    mask: np.ndarray  # (N, C) float32 1 = known, 0 = unknown
    orig_sizes: np.ndarray | None = None  # (N, 2) int (H, W) when known without decoding

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, idx: np.ndarray | Sequence[int]) -> "Records":
        idx = np.asarray(idx, dtype=np.int64)
        return Records(
            names=[self.names[i] for i in idx],
            paths=[self.paths[i] for i in idx],
            patients=[self.patients[i] for i in idx],
            views=[self.views[i] for i in idx],
            labels=self.labels[idx],
            mask=self.mask[idx],
            orig_sizes=None if self.orig_sizes is None else self.orig_sizes[idx],
        )


@contextlib.contextmanager
def csv_rows(
    path: str | os.PathLike, unreadable: str
) -> Iterator[tuple[list[str] | None, Iterator[tuple[int, list[str]]]]]:
    """Open a label CSV (plain or gzip, :func:`medxray.data.manifest.open_text`) for reading:
    yields (the header row or None for an empty file, the other non-blank rows as (1-based line
    number, fields)). Undecodable text, a CSV syntax error or an I/O error anywhere inside the
    ``with`` block becomes one :class:`DataError` with the message ``unreadable`` formatted with
    ``path`` and ``exc``."""
    try:
        with open_text(path) as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            yield header, ((n, row) for n, row in enumerate(reader, start=2) if row and any(c.strip() for c in row))
    except (UnicodeDecodeError, csv.Error, OSError, EOFError) as exc:
        raise DataError(unreadable.format(path=path, exc=exc)) from None


def check_view(view: str) -> str:
    """Normalise the ``view`` option ("all", "PA", "AP"; any case) or raise ConfigError."""
    v = str(view).strip()
    for ok in VIEWS:
        if v.lower() == ok.lower():
            return ok
    raise ConfigError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")


def filter_view(rec: Records, view: str) -> Records:
    if view == "all":
        return rec
    return rec.subset([i for i, v in enumerate(rec.views) if v.upper() == view])


def limit_per_patient(rec: Records, max_per_patient: int | None, seed: int) -> Records:
    """Keep at most ``max_per_patient`` images of each patient, chosen by a seeded local RNG."""
    if max_per_patient is None:
        return rec
    if int(max_per_patient) < 1:
        raise ConfigError(f"max_per_patient must be >= 1 or None, got {max_per_patient!r}")
    k = int(max_per_patient)
    rng = np.random.default_rng([seed, 7919])
    _, inverse = np.unique(np.asarray(rec.patients, dtype=object).astype(str), return_inverse=True)
    keep: list[int] = []
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    for group in np.split(order, bounds):
        keep.extend(group if len(group) <= k else rng.choice(group, size=k, replace=False))
    return rec.subset(np.sort(np.asarray(keep, dtype=np.int64)))


def patient_val_split(
    patients: Sequence[str], labels: np.ndarray, mask: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """Boolean per image: True for images of the patients chosen for validation.

    Patients, not images, are assigned, so no patient is in both parts. About ``fraction`` of the
    patients go to validation. They are chosen by iterative stratification at patient level
    (Sechidis et al. 2011): the rarest findings are placed first, each patient goes to the side
    that still lacks that finding most, and patients without findings fill the remaining
    patient quota. This keeps each finding's prevalence close in train and validation, also for
    rare ones such as Hernia. Only a local ``numpy.random.Generator`` seeded by ``seed`` is used.
    """
    if not 0.0 < float(fraction) < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    rng = np.random.default_rng([seed, 104729])
    uniq, inverse = np.unique(np.asarray(patients, dtype=object).astype(str), return_inverse=True)
    n_pat = len(uniq)
    if n_pat < 2:
        raise DataError(f"cannot split {n_pat} patient(s) into train and validation; need at least 2 patients")
    pos = ((labels > 0.5) & (mask > 0.5)).astype(np.float64)
    per_patient = np.zeros((n_pat, pos.shape[1]))
    np.add.at(per_patient, inverse, pos)
    totals = per_patient.sum(0)
    need_val = fraction * totals
    need_train = (1.0 - fraction) * totals
    val_quota = max(1, min(n_pat - 1, int(round(fraction * n_pat))))
    assigned = np.full(n_pat, -1, dtype=np.int8)  # -1 unassigned, 0 train, 1 val
    perm = rng.permutation(n_pat)
    n_val = 0
    for c in np.argsort(totals, kind="stable"):  # rarest finding first
        if totals[c] == 0:
            continue
        for p in perm[per_patient[perm, c] > 0]:
            if assigned[p] >= 0:
                continue
            rel_val = need_val[c] / max(fraction * totals[c], 1e-9)
            rel_train = need_train[c] / max((1 - fraction) * totals[c], 1e-9)
            to_val = n_val < val_quota and (rel_val > rel_train or (rel_val == rel_train and rng.random() < fraction))
            assigned[p] = 1 if to_val else 0
            if to_val:
                need_val -= per_patient[p]
                n_val += 1
            else:
                need_train -= per_patient[p]
    for p in perm:  # patients without any finding (or left over) fill the quota
        if assigned[p] < 0:
            assigned[p] = 1 if n_val < val_quota else 0
            n_val += int(assigned[p] == 1)
    return assigned[inverse] == 1


def assert_patient_disjoint(parts: dict[str, Records]) -> None:
    """Raise DataError if any patient appears in two splits (a leak that inflates every metric)."""
    seen: dict[str, str] = {}
    for split, rec in parts.items():
        for p in set(rec.patients):
            if p in seen and seen[p] != split:
                raise DataError(
                    f"patient-level leak: the same patient appears in the {seen[p]} and {split} splits; fix the "
                    f"split lists/column so that each patient's images are all in one split"
                )
            seen[p] = split


def split_hash(label_identity: str, parts: dict[str, Records], extra: str = "") -> str:
    """SHA-256 identifying the label file and exactly which image is in which split."""
    h = hashlib.sha256()
    h.update(f"labels:{label_identity}\n{extra}\n".encode())
    for split in sorted(parts):
        h.update(f"[{split}]\n".encode())
        h.update("\n".join(sorted(parts[split].names)).encode())
        h.update(b"\n")
    return h.hexdigest()


def drop_missing(
    rec: Records, *, allow_missing: bool, root: Path, available: Callable[[int], bool], what: str = "images"
) -> tuple[Records, int]:
    """Drop records whose image is unavailable, or refuse with one clear error listing a few."""
    ok = np.fromiter((available(i) for i in range(len(rec))), dtype=bool, count=len(rec))
    n_missing = int((~ok).sum())
    if n_missing == 0:
        return rec, 0
    first = ", ".join(rec.names[i] for i in np.flatnonzero(~ok)[:5])
    if not allow_missing:
        raise DataError(
            f"{n_missing} of {len(rec)} {what} listed in the labels are missing under {root} (first: {first}). "
            f"Download the images (see data_manifests/chestxray14/README.md for ChestX-ray14), point --data-root "
            f"at the right folder, or pass --allow-missing to drop them"
        )
    # A partial download may hold none of one split (e.g. only train_val images): that split is then
    # empty, and whoever needs it says so; a root with no image at all is refused by the dataset builder.
    log.warning(
        "dropping %d of %d %s missing under %s (missing images allowed; first: %s)",
        n_missing,
        len(rec),
        what,
        root,
        first,
    )
    return rec.subset(np.flatnonzero(ok)), n_missing


def split_summary(parts: dict[str, Records | None], label_names: Sequence[str]) -> dict[str, Any]:
    """Counts, patients and per-finding prevalence (among known labels) of each split."""
    out: dict[str, Any] = {"counts": {}, "patients": {}, "prevalence": {}, "positives": {}}
    for split, rec in parts.items():
        if rec is None:
            continue
        out["counts"][split] = len(rec)
        out["patients"][split] = len(set(rec.patients))
        known = rec.mask.sum(0)
        pos = ((rec.labels > 0.5) & (rec.mask > 0.5)).sum(0)
        out["positives"][split] = {n: int(p) for n, p in zip(label_names, pos)}
        out["prevalence"][split] = {n: (float(p) / float(k) if k else None) for n, p, k in zip(label_names, pos, known)}
    return out


# --------------------------------------------------------------------------------------------
# the torch Dataset


class XrayDataset(Dataset):
    """Images and labels of one split; yields the dict items of the data contract.

    Picklable (DataLoader workers, torch.distributed): it holds only lists and arrays. The MONAI
    pipeline and the cache memmap are built lazily in each process. Random transforms get a per
    worker seed from ``torch.utils.data.get_worker_info().seed``, so no two workers augment the
    same way. Their seed is set on the pipeline's own RandomState; the global RNG is never touched.

    If an image cannot be decoded during a run, one bad file does not stop a long training run.
    The item comes back as a zero image with an all-zero mask, so the loss ignores it. A warning
    names the file and counts such items, and :meth:`bad_count` reports the count. Set
    ``on_bad_image="raise"`` to get the :class:`DataError` instead.
    """

    def __init__(
        self,
        records: Records,
        label_names: Sequence[str],
        image_size: int,
        *,
        augment: bool = False,
        aug_options: dict[str, Any] | None = None,
        aug_seed: int = 0,
        cache: Any = None,
        cache_rows: np.ndarray | None = None,
        on_bad_image: str = "mask",
        split: str = "",
    ) -> None:
        if on_bad_image not in ("mask", "raise"):
            raise ConfigError(f"on_bad_image must be 'mask' or 'raise', got {on_bad_image!r}")
        self.records = records
        self.label_names = list(label_names)
        self.image_size = int(image_size)
        self.augment = bool(augment)
        self.aug_options = dict(aug_options or {})
        self.aug_seed = int(aug_seed)
        self.cache = cache  # medxray.data.cache.PixelCache (picklable handle) or None
        self.cache_rows = cache_rows  # (N,) int64 row in the cache, -1 = decode from file
        self.on_bad_image = on_bad_image
        self.split = split
        self._labels = torch.from_numpy(np.ascontiguousarray(records.labels, dtype=np.float32))
        self._mask = torch.from_numpy(np.ascontiguousarray(records.mask, dtype=np.float32))
        self._tf: Any = None
        self._tf_key: Any = None
        self._bad = 0

    # pickling: drop per-process state (the MONAI pipeline and any open memmap)
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tf"] = None
        state["_tf_key"] = None
        state["_bad"] = 0
        return state

    def __len__(self) -> int:
        return len(self.records)

    @property
    def names(self) -> list[str]:
        return self.records.names

    @property
    def labels(self) -> np.ndarray:
        return self.records.labels

    @property
    def mask(self) -> np.ndarray:
        return self.records.mask

    def bad_count(self) -> int:
        """Items replaced by a masked blank because their image could not be read (this process)."""
        return self._bad

    def _transform(self) -> Any:
        from monai.transforms import Compose

        from medxray.data.transforms import deterministic_transforms, train_transforms

        info = torch.utils.data.get_worker_info()
        key = (os.getpid(), None if info is None else info.seed)
        if self._tf is None or self._tf_key != key:
            if self.augment:
                tf = Compose(train_transforms(self.image_size, from_file=False, **self.aug_options))
                seed = self.aug_seed if info is None else info.seed
                tf.set_random_state(seed=int(seed) % (2**32))
            else:
                tf = Compose(deterministic_transforms(self.image_size, from_file=False))
            self._tf, self._tf_key = tf, key
        return self._tf

    def load_pixels(self, index: int) -> tuple[np.ndarray, tuple[int, int]]:
        """Raw pixels of item ``index`` (uint8/uint16 2-D) from the cache or by decoding the file."""
        row = -1 if self.cache_rows is None else int(self.cache_rows[index])
        if row >= 0:
            return self.cache.read(row), self.cache.orig_size(row)
        path = self.records.paths[index]
        if not path:
            raise DataError(f"{self.records.names[index]}: image file not available")
        suffix = os.path.splitext(path)[1].lower()
        if suffix in (".dcm", ".dicom") or (suffix not in (".png", ".jpg", ".jpeg") and _has_dicom_marker(path)):
            # a DICOM row (site labels): the scorer's reader and display pipeline, so training sees what scoring sees
            from medxray.dicom.reader import read_dicom
            from medxray.errors import DicomError

            try:
                pixels = read_dicom(path, keep_raw=False).pixels  # float32 [0, 1], as the scorer sees it
            except DicomError as exc:
                raise DataError(f"{self.records.names[index]}: {exc}") from None
            return pixels, tuple(pixels.shape)  # type: ignore[return-value]
        return read_image(path)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name = self.records.names[index]
        mask = self._mask[index]
        try:
            pixels, orig = self.load_pixels(index)
            image = self._transform()({"image": pixels})["image"]
        except DataError as exc:
            if self.on_bad_image == "raise":
                raise
            self._bad += 1
            log.warning("bad image replaced by a masked blank (%d so far in this process): %s", self._bad, exc)
            image = torch.zeros(3, self.image_size, self.image_size)
            mask = torch.zeros_like(mask)
            orig = (0, 0)
        return {
            "image": image.as_subclass(torch.Tensor) if isinstance(image, torch.Tensor) else torch.as_tensor(image),
            "label": self._labels[index].clone(),
            "mask": mask.clone(),
            "name": name,
            "orig_size": orig,
        }


def _has_dicom_marker(path: str) -> bool:
    """True for a DICOM Part 10 file (``DICM`` at byte 128, PS3.10 section 7.1)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def drop_missing_splits(
    parts: dict[str, Records], *, root: Path, cache: Any | None, allow_missing: bool
) -> tuple[dict[str, Records], dict[str, int]]:
    """:func:`drop_missing` on every split: a record is available when its path (already resolved,
    "" = not on disk) is set or ``cache`` (a :class:`medxray.data.cache.PixelCache`) holds its row.
    Returns (the kept records by split, the records dropped by split); raises as
    :func:`drop_missing` does unless ``allow_missing``."""
    kept: dict[str, Records] = {}
    missing: dict[str, int] = {}
    for split, rec in parts.items():
        rows = cache.rows_for(rec.names) if cache is not None else None
        kept[split], missing[split] = drop_missing(
            rec,
            allow_missing=allow_missing,
            root=root,
            available=lambda i, rec=rec, rows=rows: bool(rec.paths[i]) or (rows is not None and rows[i] >= 0),
            what=f"{split} images",
        )
    return kept, missing


def split_datasets(
    parts: dict[str, Records],
    label_names: Sequence[str],
    image_size: int,
    *,
    cache: Any | None,
    augment: bool,
    aug_options: dict[str, Any] | None,
    aug_seed: int,
    on_bad_image: str,
) -> dict[str, XrayDataset]:
    """One :class:`XrayDataset` per split, reading ``cache`` where it holds a row; only the train
    split is augmented (when ``augment``)."""
    return {
        split: XrayDataset(
            rec,
            label_names,
            image_size,
            augment=augment and split == "train",
            aug_options=aug_options,
            aug_seed=aug_seed,
            on_bad_image=on_bad_image,
            split=split,
            cache=cache,
            cache_rows=cache.rows_for(rec.names) if cache is not None else None,
        )
        for split, rec in parts.items()
    }


def _given_parts(
    dataset: str, root: Path, pool: Records, given: Sequence[str] | None, val_fraction: float, split_seed: int
) -> dict[str, Records]:
    """The pool cut by its given split names; without val rows, val is a seeded patient-disjoint
    share of train (:func:`patient_val_split`). :class:`DataError` for no train rows or a patient
    in two splits."""
    if given is None:
        given = ["train"] * len(pool)
    given_arr = np.asarray(given, dtype=object)
    parts: dict[str, Records] = {s: pool.subset(np.flatnonzero(given_arr == s)) for s in ("train", "val", "test")}
    if len(parts["train"]) == 0:
        raise DataError(f"{dataset}: no training rows under {root}; check the label file and its split column")
    if len(parts["val"]) == 0:
        tr = parts["train"]
        is_val = patient_val_split(tr.patients, tr.labels, tr.mask, val_fraction, split_seed)
        parts["train"], parts["val"] = tr.subset(np.flatnonzero(~is_val)), tr.subset(np.flatnonzero(is_val))
    assert_patient_disjoint({k: v for k, v in parts.items() if len(v)})
    return parts


def _assemble(
    dataset: str,
    root: Path,
    label_names: Sequence[str],
    label_identity: str,
    parts: dict[str, Records],
    datasets: dict[str, XrayDataset],
    missing: dict[str, int],
    cache: Any | None,
    *,
    image_size: int,
    val_fraction: float,
    split_seed: int,
    view: str,
    max_per_patient: int | None,
    extra_summary: dict[str, Any] | None,
) -> DatasetSplits:
    """The :class:`DatasetSplits` of a pool split by :func:`make_splits`. Its summary holds counts,
    patients, prevalence and unknown labels per split, the settings, missing files dropped and the
    cache used, then ``extra_summary``; its manifest hash (:func:`split_hash`) covers the label
    identity, the split members, view, max_per_patient and ``extra_summary["options"]``."""
    summary = {
        "dataset": dataset,
        "data_root": str(root),
        "synthetic": False,
        "image_size": int(image_size),
        "label_names": list(label_names),
        **split_summary(dict(parts), label_names),
        "unknown_labels": {s: int((r.mask < 0.5).sum()) for s, r in parts.items()},
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "view": view,
        "max_per_patient": max_per_patient,
        "missing_dropped": sum(missing.values()),
        "missing_dropped_by_split": missing,
        "cache": None if cache is None else str(cache.path),
        "label_sha256": label_identity,
        **(extra_summary or {}),
    }
    options = sorted((extra_summary or {}).get("options", {}).items())
    extra = f"{dataset} view={view} max_per_patient={max_per_patient} {options}"
    return DatasetSplits(
        train=datasets["train"],
        val=datasets["val"],
        test=datasets.get("test"),
        label_names=list(label_names),
        manifest_hash=split_hash(label_identity, parts, extra),
        summary=summary,
        boxes={},
    )


def make_splits(
    dataset: str,
    root: Path,
    label_names: Sequence[str],
    label_identity: str,
    pool: Records,
    given: Sequence[str] | None,
    *,
    image_size: int,
    val_fraction: float,
    split_seed: int,
    view: str,
    max_per_patient: int | None,
    allow_missing: bool,
    use_cache: bool,
    augment: bool,
    cache_dir: str | os.PathLike | None = None,
    aug_options: dict[str, Any] | None = None,
    aug_seed: int | None = None,
    on_bad_image: str = "mask",
    extra_summary: dict[str, Any] | None = None,
) -> DatasetSplits:
    """Split a labelled pool and build the datasets (CheXpert and CSV manifests share this).

    ``given``: a split name per record ("train", "val" or "test"), or None. Without a "val" part,
    validation is a seeded, patient-disjoint share of train. Without a "test" part, test is None.
    ``pool.paths`` holds each record's file path; a path that is not a file counts as missing.
    """
    from medxray.data.cache import find_cache

    view = check_view(view)
    parts = _given_parts(dataset, root, pool, given, val_fraction, split_seed)
    has_test = len(parts["test"]) > 0
    parts = {
        k: limit_per_patient(filter_view(r, view), max_per_patient, split_seed)
        for k, r in parts.items()
        if k != "test" or has_test
    }
    cache = find_cache(root, dataset, image_size, label_identity, cache_dir=cache_dir) if use_cache else None
    for rec in parts.values():
        rec.paths = [p if p and os.path.isfile(p) else "" for p in rec.paths]
    parts, missing = drop_missing_splits(parts, root=root, cache=cache, allow_missing=allow_missing)
    datasets = split_datasets(
        parts,
        label_names,
        image_size,
        cache=cache,
        augment=augment,
        aug_options=aug_options,
        aug_seed=split_seed if aug_seed is None else aug_seed,
        on_bad_image=on_bad_image,
    )
    return _assemble(
        dataset,
        root,
        label_names,
        label_identity,
        parts,
        datasets,
        missing,
        cache,
        image_size=image_size,
        val_fraction=val_fraction,
        split_seed=split_seed,
        view=view,
        max_per_patient=max_per_patient,
        extra_summary=extra_summary,
    )
