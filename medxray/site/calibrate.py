"""Recalibration on the site's labels: ``medxray site calibrate``.

Thresholds are re-derived per finding on the site's labelled images that are *not* in the locked
test set (:func:`medxray.site.lockset.check_unlocked` refuses a manifest that would leak them), for
a stated operating point:

* ``youden``: the threshold maximising sensitivity + specificity - 1 (Youden 1950);
* ``sensitivity=X``: the highest threshold whose site sensitivity is at least X (a screening
  operating point: miss at most 1 - X of the positives).

Each new threshold comes with a 95% percentile-bootstrap interval (images resampled, the rule
re-applied) and the site sensitivity/specificity at it with Wilson intervals. A finding with
fewer than ``min_positives`` positives (or negatives) keeps its old threshold and says so.

The output is a new model version: the same weights (and OOD statistics), new thresholds, and
provenance (``site_calibration``: site, number of studies and images, date, operating point,
source checkpoint and labels hashes, lock hash). The checkpoint's validation reference is embedded
(:mod:`medxray.site.reference`) so later reports still have it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medxray.errors import ConfigError, DataError
from medxray.fileio import atomic_write_text, to_jsonable
from medxray.site.stats import wilson

log = logging.getLogger(__name__)

MIN_POSITIVES = 10


def parse_operating_point(text: str) -> tuple[str, float | None]:
    """``youden`` -> ("youden", None); ``sensitivity=0.9`` -> ("sensitivity", 0.9); else ConfigError."""
    t = (text or "youden").strip().lower()
    if t == "youden":
        return "youden", None
    m = re.fullmatch(r"sensitivity\s*=\s*(0?\.\d+|1(\.0+)?)", t)
    if m:
        return "sensitivity", float(m.group(1))
    raise ConfigError(f"--operating-point must be youden or sensitivity=X (0 < X <= 1), got {text!r}")


def choose_threshold(p: np.ndarray, y: np.ndarray, rule: str, target: float | None) -> float:
    """The threshold (positive = p >= t) of ``rule`` on scores ``p`` and 0/1 labels ``y``."""
    y = np.asarray(y) > 0.5
    cand = np.unique(p)[::-1]  # high to low: each candidate admits one more score level
    pos, neg = max(1, int(y.sum())), max(1, int((~y).sum()))
    order = np.argsort(-p, kind="mergesort")
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys)
    fp = np.cumsum(~ys)
    last = np.r_[ps[1:] != ps[:-1], True]  # end of each run of equal scores
    thr, sens, spec = ps[last], tp[last] / pos, 1 - fp[last] / neg
    if rule == "youden":
        return float(thr[int(np.argmax(sens + spec - 1))])
    ok = np.flatnonzero(sens >= float(target) - 1e-12)
    return float(thr[int(ok[0])]) if len(ok) else float(cand[-1])


def _sha(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def calibrate_site(
    checkpoint: str | os.PathLike,
    labels: str | os.PathLike,
    out: str | os.PathLike,
    *,
    operating_point: str = "youden",
    site: str = "site",
    min_positives: int = MIN_POSITIVES,
    lock_path: str | os.PathLike | None = None,
    n_boot: int = 200,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Write the recalibrated version to ``out``; returns its provenance (also in ``<out>.calibration.json``)."""
    from medxray.checkpoint import load_checkpoint, save_checkpoint
    from medxray.site.labelled import score_labelled
    from medxray.site.labels import read_manifest
    from medxray.site.lockset import check_unlocked, default_lock_path, load_lock

    rule, target = parse_operating_point(operating_point)
    out = Path(out).expanduser()
    if out.resolve() == Path(checkpoint).expanduser().resolve():
        raise ConfigError("--out must be a new file: a calibrated version never overwrites the checkpoint it came from")
    ckpt = load_checkpoint(checkpoint)
    names, rows = read_manifest(labels)
    lock = load_lock(lock_path or default_lock_path(labels))
    use = [r for r in rows if r.split != "test"]
    check_unlocked(((r.patient_id, r.image) for r in use), lock, what="threshold fitting")
    if not use:
        raise DataError(f"{labels} has no train/val rows outside the locked test set to calibrate on")
    ls = score_labelled([checkpoint], names, use, device=device)
    old = {n: float((ckpt.metadata.get("thresholds") or {}).get(n, 0.5)) for n in ls.scored[0].label_names}
    new = dict(old)
    record: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    for c, n in enumerate(ls.findings):
        m = ls.masks[:, c] > 0.5
        record[n] = _fit_finding(
            ls.probs[0][:, c][m], ls.labels[:, c][m], old[n], rule, target, min_positives, n_boot, rng
        )
        new[n] = record[n]["threshold"]
    prov = _provenance(checkpoint, labels, ls.n_images, use, rows, lock, site=site, operating_point=operating_point)
    prov["findings"] = record
    meta = _calibrated_metadata(checkpoint, ckpt.metadata, new, prov)
    save_checkpoint(out, ckpt.state_dict, meta, **ckpt.extra)
    atomic_write_text(Path(f"{out}.calibration.json"), json.dumps(to_jsonable(prov), indent=1) + "\n")
    kept = [n for n, r in record.items() if r["kept"]]
    if kept:
        log.warning(
            "kept the old threshold for %d finding(s) with too few site positives: %s", len(kept), ", ".join(kept)
        )
    return prov


def _provenance(
    checkpoint: str | os.PathLike,
    labels: str | os.PathLike,
    n_images: int,
    use: Sequence[Any],
    rows: Sequence[Any],
    lock: Any,
    *,
    site: str,
    operating_point: str,
) -> dict[str, Any]:
    """Where a calibrated version came from: site, date (UTC), operating point, the images, studies
    and patients fitted on, the source checkpoint, labels and lock (SHA-256), the locked images
    left out; the caller adds the per-finding ``findings`` record last."""
    return {
        "site": site,
        "date": datetime.now(timezone.utc).date().isoformat(),
        "operating_point": operating_point,
        "n_images": n_images,
        "n_studies": _n_studies(labels, use) or n_images,
        "n_patients": len({r.patient_id for r in use}),
        "source_checkpoint": str(Path(checkpoint).resolve()),
        "source_sha256": _sha(checkpoint),
        "labels_sha256": _sha(labels),
        "lock_sha256": lock.sha256 if lock else None,
        "locked_images_excluded": sum(1 for r in rows if r.split == "test"),
    }


def _fit_finding(
    p: np.ndarray,
    y: np.ndarray,
    old: float,
    rule: str,
    target: float | None,
    min_positives: int,
    n_boot: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """One finding's new threshold (:func:`choose_threshold` on the known-label images ``p``, ``y``)
    with a percentile-bootstrap 95% CI (``n_boot`` resamples drawn from ``rng``) and the
    sensitivity/specificity it gives (Wilson CIs); the ``old`` one kept when either class has
    fewer than ``min_positives`` images."""
    npos, nneg = int((y > 0.5).sum()), int((y < 0.5).sum())
    if npos < min_positives or nneg < min_positives:
        return {
            "threshold": old,
            "kept": True,
            "positives": npos,
            "negatives": nneg,
            "reason": f"kept the old threshold {old:.3f}: {npos} positive(s) and {nneg} negative(s) "
            f"at the site, fewer than {min_positives} needed",
        }
    t = choose_threshold(p, y, rule, target)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(p), len(p))
        if 0 < (y[i] > 0.5).sum() < len(i):
            boots.append(choose_threshold(p[i], y[i], rule, target))
    pred, yy = p >= t, y > 0.5
    tp, tn = int((pred & yy).sum()), int((~pred & ~yy).sum())
    return {
        "threshold": t,
        "old_threshold": old,
        "kept": False,
        "positives": npos,
        "negatives": nneg,
        "threshold_ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))]
        if boots
        else [math.nan, math.nan],
        "sensitivity": tp / npos,
        "sensitivity_ci95": list(wilson(tp, npos)),
        "specificity": tn / nneg,
        "specificity_ci95": list(wilson(tn, nneg)),
    }


def _n_studies(labels: str | os.PathLike, use: Sequence[Any]) -> int:
    """Distinct studies among ``use`` (by Study Instance UID from the labels' key file; an image
    without one counts alone); 0 when there is no key file."""
    from medxray.site.labels import side_paths

    keys = side_paths(labels)["keys"]
    if not keys.is_file():
        return 0
    with open(keys, newline="") as fh:
        by_image = {r["image"]: r.get("study_instance_uid", "") for r in csv.DictReader(fh)}
    return len({by_image.get(r.image) or r.image for r in use})


def _calibrated_metadata(
    checkpoint: str | os.PathLike, metadata: Mapping[str, Any], thresholds: dict[str, float], prov: dict[str, Any]
) -> dict[str, Any]:
    """The new version's metadata: the site thresholds and their source, a new model version
    ``<old>+<site>-cal-<date>`` with its parent, the provenance, and the validation reference
    embedded when the source only pointed to it."""
    from medxray.site.reference import embed, validation_reference

    site, today, operating_point = prov["site"], prov["date"], prov["operating_point"]
    meta = dict(metadata)
    ref = validation_reference(checkpoint, meta)
    if ref is not None and "validation_reference" not in meta:
        meta["validation_reference"] = embed(ref)
    meta["thresholds"] = thresholds
    meta["threshold_source"] = f"site calibration at {site} ({operating_point}, {today})"
    old_version = str(meta.get("model_version") or "unversioned")
    meta["model_version"] = f"{old_version}+{re.sub(r'[^A-Za-z0-9._-]+', '-', site)}-cal-{today}"
    meta["parent_version"] = old_version
    meta["site_calibration"] = to_jsonable(prov)
    return meta
