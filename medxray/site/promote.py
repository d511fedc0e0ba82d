"""The promotion gate: ``medxray site promote`` / ``medxray site rollback``.

A candidate B replaces the deployed model A only after a paired comparison on the same images:

1. the locked site test set (:mod:`medxray.site.lockset`), which no training or threshold fitting saw;
2. the original validation data, when its data root is still readable (a guard against forgetting
   what the model learnt there): the validation split of the first checkpoint of the deployed model's
   lineage (:func:`lineage_root`), rebuilt from its stored config, both models scored on it with
   :func:`medxray.evaluation.run.score_split`.

Each comparison is DeLong's test with a paired bootstrap CI of the AUROC difference B - A and Holm's
adjustment (:mod:`medxray.evaluation.compare`). The rule, for every finding with at least
``min_positives`` positives and negatives on a set: the lower end of the 95% CI of B - A must not
fall below ``-margin`` (non-inferiority, margin 0.02 AUROC by default); and the mean AUROC of B over
those findings on the locked set must exceed A's. Otherwise the promotion is refused, naming each
failing finding and by how much. A promotion copies B into the registry, switches ``current``
atomically and appends a record (approver, time, figures) to the registry history.

What the gate cannot promise: it compares discrimination (AUROC) on a finite locked set; a finding
with too few positives is not tested (it is listed as untested, not passed); calibration at the
new thresholds is reported by ``site validate``, not gated.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medxray.errors import ConfigError, DataError
from medxray.fileio import atomic_write_text, to_jsonable

if TYPE_CHECKING:
    from medxray.site.labels import ManifestRow
    from medxray.site.lockset import SiteLock

log = logging.getLogger(__name__)

DEFAULT_MARGIN = 0.02
MIN_POSITIVES = 10


@dataclass
class GateResult:
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    untested: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] | None = None


def judge(
    comparison: Any, *, margin: float, min_positives: int, set_name: str, reasons: list[str], untested: list[str]
) -> dict[str, Any]:
    """Apply the non-inferiority rule to one :class:`~medxray.evaluation.compare.Comparison`; returns its figures."""
    rows, tested = {}, []
    for name, r in comparison.rows.items():
        npos, nneg = int(r["positives"]), int(r["n"] - r["positives"])
        lo, hi = r["diff_ci95"]
        rows[name] = {
            "auc_a": r["auc_a"],
            "auc_b": r["auc_b"],
            "diff": r["diff"],
            "diff_ci95": [lo, hi],
            "p": r["p"],
            "p_holm": r.get("p_holm"),
            "positives": npos,
            "n": r["n"],
        }
        if npos < min_positives or nneg < min_positives or not math.isfinite(lo):
            untested.append(f"{name} on {set_name} ({npos} positives)")
            continue
        tested.append(name)
        if lo < -margin:
            reasons.append(
                f"{name} on {set_name}: AUROC {r['auc_b']:.3f} vs deployed {r['auc_a']:.3f}, difference "
                f"{r['diff']:+.3f} (95% CI {lo:+.3f} to {hi:+.3f}); the lower bound is "
                f"{-margin - lo:.3f} below the non-inferiority margin -{margin:g}"
            )
    mean_a = float(np.mean([rows[n]["auc_a"] for n in tested])) if tested else float("nan")
    mean_b = float(np.mean([rows[n]["auc_b"] for n in tested])) if tested else float("nan")
    return {
        "images": comparison.n_images,
        "findings": rows,
        "tested": tested,
        "mean_auc_a": mean_a,
        "mean_auc_b": mean_b,
    }


def promote(
    candidate: str | os.PathLike,
    deployed: str | os.PathLike,
    labels: str | os.PathLike,
    registry: str | os.PathLike,
    *,
    margin: float = DEFAULT_MARGIN,
    min_positives: int = MIN_POSITIVES,
    lock_path: str | os.PathLike | None = None,
    approver: str | None = None,
    original_data: bool = True,
    out_dir: str | os.PathLike | None = None,
    n_boot: int = 1000,
    device: str = "cpu",
    dry_run: bool = False,
) -> GateResult:
    """Run the gate (module docstring); promote into ``registry`` when it passes (unless ``dry_run``)."""
    from medxray.evaluation.compare import compare_arrays, write_comparison
    from medxray.site.labelled import score_labelled

    if not 0 <= margin < 0.5:
        raise ConfigError(f"--margin must be in [0, 0.5) (an AUROC difference), got {margin}")
    a_path, b_path, meta_a = _gate_pair(candidate, deployed)
    lock, names, locked = _locked_rows(labels, lock_path)
    out = _gate_dir(out_dir, registry, b_path)
    ls = score_labelled([a_path, b_path], names, locked, device=device)
    comp = compare_arrays(ls.findings, ls.labels, ls.masks, *ls.probs, a=str(a_path), b=str(b_path), n_boot=n_boot)
    write_comparison(comp, out / "locked", note=f"locked site test set ({ls.n_images} images, lock {lock.sha256[:12]})")
    res = GateResult(promoted=False)
    res.figures["margin"] = margin
    res.figures["report_dir"] = str(out)
    res.figures["locked"] = judge(
        comp,
        margin=margin,
        min_positives=min_positives,
        set_name="the locked site set",
        reasons=res.reasons,
        untested=res.untested,
    )
    res.figures["lock_sha256"] = lock.sha256
    if original_data:
        root_path, root_meta = lineage_root(a_path, meta_a)
        res.figures["original_validation"] = _original(
            a_path, b_path, root_meta, out, n_boot, margin, min_positives, res
        )
        res.figures["original_validation"]["source_checkpoint"] = str(root_path)
    res.reasons.extend(_locked_verdict(res.figures["locked"], min_positives))
    res.promoted = not res.reasons
    gate = {
        "promoted": res.promoted,
        "reasons": res.reasons,
        "untested": res.untested,
        "figures": res.figures,
        "candidate": str(b_path),
        "deployed": str(a_path),
    }
    atomic_write_text(out / "gate.json", json.dumps(to_jsonable(gate), indent=1) + "\n")
    if res.promoted and not dry_run:
        res.record = _register(registry, a_path, b_path, approver, {"gate": str(out / "gate.json"), **res.figures})
    return res


def _gate_dir(out_dir: str | os.PathLike | None, registry: str | os.PathLike, candidate: Path) -> Path:
    """The gate's report folder (created): ``out_dir``, else ``<registry>/gate/<UTC time>-<run>-<file>``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = (
        Path(out_dir)
        if out_dir
        else Path(registry).expanduser() / "gate" / f"{stamp}-{candidate.parent.name}-{candidate.stem}"
    )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _gate_pair(candidate: str | os.PathLike, deployed: str | os.PathLike) -> tuple[Path, Path, dict[str, Any]]:
    """(deployed checkpoint path, candidate path, deployed metadata); ConfigError when the two
    predict different findings."""
    from medxray.checkpoint import load_checkpoint
    from medxray.site import registry as reg

    a_path, b_path = Path(reg.current_checkpoint(deployed)), Path(candidate).expanduser()
    meta_a, meta_b = load_checkpoint(a_path).metadata, load_checkpoint(b_path).metadata
    if list(meta_a.get("label_names", [])) != list(meta_b.get("label_names", [])):
        raise ConfigError(
            "the candidate and the deployed model predict different findings; the gate compares models of one label set"
        )
    return a_path, b_path, meta_a


def _locked_rows(
    labels: str | os.PathLike, lock_path: str | os.PathLike | None
) -> tuple[SiteLock, list[str], list[ManifestRow]]:
    """(the lock, the manifest's findings, its rows in the locked site test set); ConfigError with
    no lock yet, DataError when no labelled row is locked."""
    from medxray.site.labels import read_manifest
    from medxray.site.lockset import default_lock_path, load_lock

    lock = load_lock(lock_path or default_lock_path(labels))
    if lock is None:
        raise ConfigError(
            "there is no locked site test set yet; `medxray site labels` freezes one once enough "
            "patients are labelled (--lock-min-patients). The gate never compares on unlocked data"
        )
    names, rows = read_manifest(labels)
    locked = [r for r in rows if lock.holds(r.patient_id, r.image)]
    if not locked:
        raise DataError(f"none of the labelled images of {labels} is in the locked set")
    return lock, names, locked


def _locked_verdict(lk: dict[str, Any], min_positives: int) -> list[str]:
    """The gate's reasons on the locked set as a whole: nothing testable, or no mean AUROC gain
    (over the tested findings)."""
    if not lk["tested"]:
        return [
            f"no finding has {min_positives} positives and negatives in the locked set: nothing "
            "could be compared, so nothing is promoted"
        ]
    if not lk["mean_auc_b"] > lk["mean_auc_a"]:
        return [
            f"mean AUROC on the locked set does not improve: {lk['mean_auc_b']:.3f} vs deployed "
            f"{lk['mean_auc_a']:.3f} ({lk['mean_auc_b'] - lk['mean_auc_a']:+.3f})"
        ]
    return []


def _register(
    registry: str | os.PathLike, a_path: Path, b_path: Path, approver: str | None, figures: dict[str, Any]
) -> Any:
    """Register the candidate and make it current; on first use the deployed model is registered
    first as the initial version. Returns the registry's promote record."""
    from medxray.site import registry as reg

    cur = reg.current_version(registry)
    if cur is None:  # first use: the deployed model becomes the registry's first version
        cur = reg.register(registry, a_path)
        reg.set_current(registry, cur)
        reg.record(registry, "initial", to=cur, frm=None, approver=approver)
    new = reg.register(registry, b_path)
    reg.set_current(registry, new)
    return reg.record(registry, "promote", to=new, frm=cur, approver=approver, figures=figures)


def lineage_root(path: Path, meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The first checkpoint of a model's lineage (following ``config.init_from`` of fine-tuned versions and
    ``site_calibration.source_checkpoint`` of recalibrated ones while the files exist): whose validation data
    is "the original validation data" the gate guards against forgetting."""
    from medxray.checkpoint import load_checkpoint

    seen = {str(Path(path).resolve())}
    while True:
        src = (meta.get("config") or {}).get("init_from") or (meta.get("site_calibration") or {}).get(
            "source_checkpoint"
        )
        if not src or not Path(str(src)).is_file() or str(Path(str(src)).resolve()) in seen:
            return path, meta
        seen.add(str(Path(str(src)).resolve()))
        path, meta = Path(str(src)), load_checkpoint(src).metadata


def _original(
    a_path: Path,
    b_path: Path,
    meta_a: dict[str, Any],
    out: Path,
    n_boot: int,
    margin: float,
    min_positives: int,
    res: GateResult,
) -> dict[str, Any]:
    """Both models on the validation split of ``meta_a`` (the lineage's first checkpoint: rebuilt from its stored
    config), when its data root is readable."""
    import torch

    from medxray.checkpoint import load_checkpoint, model_from_checkpoint
    from medxray.data import build_datasets
    from medxray.errors import MedxrayError
    from medxray.evaluation.compare import compare_arrays, write_comparison
    from medxray.evaluation.run import score_split

    cfg = meta_a.get("config") or {}
    root = cfg.get("data_root")
    if not root or not Path(str(root)).exists():
        res.untested.append("the deployed model's original validation data (its data root is not available here)")
        return {"available": False, "reason": "data root not available"}
    ck_b = load_checkpoint(b_path)
    size = int((meta_a.get("preprocessing") or {}).get("image_size", 224))
    if int((ck_b.metadata.get("preprocessing") or {}).get("image_size", 224)) != size:
        res.untested.append("the original validation data (the candidate takes another input size)")
        return {"available": False, "reason": "input sizes differ"}
    opts = {k: cfg[k] for k in ("val_fraction", "split_seed", "view", "max_per_patient", "allow_missing") if k in cfg}
    try:
        splits = build_datasets(
            str(cfg.get("dataset")),
            root,
            image_size=size,
            augment=False,
            use_cache=False,
            **opts,
            **dict(cfg.get("dataset_options") or {}),
        )
        names = list(meta_a.get("label_names") or [])
        kw = dict(device=torch.device("cpu"), precision="fp32", batch_size=32, label_names=names)
        sa = score_split(model_from_checkpoint(a_path), splits.val, **kw)
        sb = score_split(model_from_checkpoint(ck_b), splits.val, **kw)
    except MedxrayError as exc:
        res.untested.append(f"the deployed model's original validation data ({exc})")
        return {"available": False, "reason": str(exc)}
    comp = compare_arrays(
        names, sa["labels"], sa["masks"], sa["probs"], sb["probs"], a=str(a_path), b=str(b_path), n_boot=n_boot
    )
    write_comparison(
        comp,
        out / "original",
        note=f"the deployed model's validation split ({len(splits.val)} images, {cfg.get('dataset')} at {root})",
    )
    fig = judge(
        comp,
        margin=margin,
        min_positives=min_positives,
        set_name="the original validation data",
        reasons=res.reasons,
        untested=res.untested,
    )
    fig["available"] = True
    return fig
