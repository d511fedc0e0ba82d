"""``medxray data verify``: check shipped manifests, a data root and its cache before a long run."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from medxray.errors import DataError

log = logging.getLogger(__name__)


def verify_manifests() -> dict[str, Any]:
    """SHA-256 of every shipped ChestX-ray14 file, plus its counts re-derived from the content."""
    from medxray.data.chestxray14 import read_box_file, read_label_file
    from medxray.data.manifest import manifest_spec, read_name_list, shipped_files

    files = shipped_files("chestxray14")  # raises DataError on a changed file
    spec = manifest_spec("chestxray14")
    table = read_label_file(files["labels"])
    boxes, _ = read_box_file(files["boxes"])
    got = {
        "images": len(table.names),
        "patients": len(set(table.patients)),
        "train_val": len(read_name_list(files["train_val_list"])),
        "test": len(read_name_list(files["test_list"])),
        "boxes": sum(len(b) for b in boxes.values()),
        "boxed_images": len(boxes),
    }
    want = {k: int(v) for k, v in spec.get("counts", {}).items()}
    wrong = {k: (got[k], want[k]) for k in want if k in got and got[k] != want[k]}
    if wrong:
        raise DataError(f"shipped manifest counts differ from manifest.yaml: {wrong}; restore data_manifests/")
    return {"sha256": "ok", **got}


_SUMMARY_KEYS = (
    "data_root",
    "synthetic",
    "counts",
    "patients",
    "missing_dropped",
    "malformed_rows",
    "cache",
    "label_sha256",
)


@dataclass(frozen=True)
class DecodeCheck:
    """What decoding a sample of a data root's images found."""

    decoded: int  # images tried
    unreadable: list[str]  # the DataError message of each unreadable image
    sizes: Counter  # (H, W) -> images of that size
    bit_depths: Counter  # bits per sample -> images


def decode_sample(paths: list[str], decode: int | None) -> DecodeCheck:
    """Decode ``decode`` images spread evenly over ``paths`` (None or at least ``len(paths)`` =
    all, 0 = none) with :func:`medxray.data.imageio.read_image`; unreadable files are counted,
    never raised."""
    from medxray.data.imageio import read_image

    if decode is None or decode >= len(paths):
        sample = paths
    else:
        sample = [paths[i] for i in np.linspace(0, len(paths) - 1, num=max(decode, 0), dtype=int)] if decode else []
    bad: list[str] = []
    sizes: Counter = Counter()
    depths: Counter = Counter()
    for p in sample:
        try:
            arr, hw = read_image(p)
        except DataError as exc:
            bad.append(str(exc))
            continue
        sizes[hw] += 1
        depths[arr.dtype.itemsize * 8] += 1
    return DecodeCheck(decoded=len(sample), unreadable=bad, sizes=sizes, bit_depths=depths)


def _cache_reports(dataset: str, data_root: str | os.PathLike, cache_dir: Any) -> dict[str, dict[str, Any]]:
    """:func:`medxray.data.cache.verify_cache` (full CRC check) of every cache of ``dataset`` in the
    cache root, by folder name; a cache that cannot be read reports ``{"error": message}``."""
    from medxray.data.cache import cache_root, verify_cache

    out: dict[str, dict[str, Any]] = {}
    croot = cache_root(data_root, cache_dir)
    for d in sorted(croot.glob(f"{dataset}_*")) if croot.is_dir() else []:
        try:
            out[d.name] = verify_cache(d, full=True)
        except DataError as exc:
            out[d.name] = {"error": str(exc)}
    return out


def _missing_problem(report: dict[str, Any], summary: dict[str, Any], allow_missing: bool) -> str | None:
    """The problem missing images are (None when there are none or ``allow_missing``; then the
    report gets a ``missing_note`` instead)."""
    if not report.get("missing_dropped"):
        return None
    note = (
        f"{report['missing_dropped']} image(s) of the label file are missing from the data root "
        f"(per split: {summary.get('missing_dropped_by_split')})"
    )
    if allow_missing:
        report["missing_note"] = note + "; allowed (--allow-missing): they are left out"
        return None
    return (
        note + "; download them, or for a partial download pass --allow-missing to "
        "`medxray data verify`, `medxray data prepare` and `medxray finetune`"
    )


def _cache_problems(caches: dict[str, dict[str, Any]]) -> list[str]:
    """One line per cache that is unreadable, fails its CRCs or is unfinished, with what to do."""
    problems = []
    for name, cc in caches.items():
        if cc.get("error"):
            problems.append(f"cache {name}: {cc['error']}")
        elif cc.get("crc_mismatch"):
            problems.append(
                f"cache {name}: {cc['crc_mismatch']} row(s) fail their CRC; delete it and re-run `medxray data prepare`"
            )
        elif cc.get("state") != "complete":
            problems.append(f"cache {name} is unfinished ({cc.get('todo')} to do); re-run `medxray data prepare`")
    return problems


def verify_data(
    dataset: str = "chestxray14",
    data_root: str | os.PathLike | None = None,
    *,
    decode: int | None = 200,
    check_cache: bool = True,
    allow_missing: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Report on a data root: label rows, split counts, missing files, a decode check, the cache.

    ``allow_missing``: a partial download is expected, so missing images are counted (and shown
    in ``missing_note``) but are not a problem; otherwise they are one.

    ``decode``: decode this many images (spread over the data set; None = all) and count
    unreadable files and unexpected sizes or bit depths. Problems are counted and returned, not
    raised. Only an unusable root or label file raises :class:`DataError`.
    """
    from medxray.data import build_datasets

    report: dict[str, Any] = {"dataset": dataset}
    if dataset == "chestxray14":
        report["manifests"] = verify_manifests()
    if data_root is None:
        return report
    options = {k: v for k, v in options.items() if v is not None}
    options["allow_missing"] = True  # always counted here; whether they are a problem is the caller's flag
    splits = build_datasets(dataset, data_root, augment=False, **options)
    s = splits.summary
    report.update({k: s.get(k) for k in _SUMMARY_KEYS})
    report["manifest_hash"] = splits.manifest_hash
    recs = [ds for ds in (splits.train, splits.val, splits.test) if ds is not None]
    check = decode_sample([p for ds in recs for p in ds.records.paths if p], decode)
    report["decoded"] = check.decoded
    report["unreadable"] = len(check.unreadable)
    report["unreadable_first"] = check.unreadable[:5]
    report["sizes"] = {f"{h}x{w}": n for (h, w), n in check.sizes.most_common(5)}
    report["bit_depths"] = dict(check.bit_depths)
    if dataset == "chestxray14" and not s.get("synthetic"):  # a phantom's boxes are in its own pixels
        report["unexpected_size"] = sum(n for hw, n in check.sizes.items() if hw != (1024, 1024))
    if check_cache:
        caches = _cache_reports(dataset, data_root, options.get("cache_dir"))
        if caches:
            report["caches"] = caches
    problems = [p for p in [_missing_problem(report, s, allow_missing)] if p]
    if check.unreadable:
        problems.append(f"{len(check.unreadable)} of {check.decoded} decoded image(s) unreadable")
    if report.get("unexpected_size"):
        problems.append(f"{report['unexpected_size']} image(s) not 1024x1024")
    problems += _cache_problems(report.get("caches") or {})
    report["problems"] = problems
    return report
