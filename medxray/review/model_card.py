"""The model card: what a checkpoint is, how it was trained and evaluated, from its own metadata.

Builds :class:`ModelCard` (summary, training data provenance and split, metrics with confidence
intervals, operating thresholds, intended use, limitations) and flattens the several metric
layouts that training and ``medxray evaluate`` write into one table. :func:`provenance` reads
the ``data_provenance`` block fine-tuning records (synthetic or real, data root, manifest hash,
images per split, images missing from the download); :func:`synthetic_banner` is the warning
every page shows for a model trained on phantoms.

Must not import streamlit (only :mod:`medxray.review.ui` does), torch, or the study/worklist
modules beyond the shared value formatter.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import pandas as pd

from medxray.labels import display_name
from medxray.review.safe import md_escape
from medxray.review.settings import NOT_FOR_CLINICAL_USE
from medxray.review.study import format_value

# -- model card ----------------------------------------------------------------------------------


@dataclass
class ModelCard:
    """What a reviewer should know about the model, from the checkpoint's own metadata."""

    title: str
    summary: pd.DataFrame  # field / value
    training: pd.DataFrame  # field / value
    metrics: pd.DataFrame  # finding, metric, value, ci_low, ci_high (may be empty)
    provenance: pd.DataFrame  # field / value: what the training data was (empty: not recorded)
    synthetic: bool | None  # trained on synthetic phantoms (None: the checkpoint does not say)
    thresholds: pd.DataFrame  # finding, threshold, (how chosen)
    localisation: pd.DataFrame  # per finding: AUROC, pointing game, IoBB accuracy, boxes, data ("not measured")
    localisation_note: str  # what the localisation figures rest on (method, split, phantom or real)
    intended_use: str
    limitations: list[str]
    not_for_clinical_use: str = NOT_FOR_CLINICAL_USE


PROVENANCE_KEY = "data_provenance"  # written by medxray.training (checkpoint_metadata)


def provenance(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's training-data provenance, or None when it was written without one."""
    prov = meta.get(PROVENANCE_KEY)
    return dict(prov) if isinstance(prov, Mapping) else None


def is_synthetic(meta: Mapping[str, Any]) -> bool | None:
    """True: trained on synthetic phantom images; False: on real images; None: not recorded."""
    prov = provenance(meta)
    if prov is None or prov.get("synthetic") is None:
        return None
    return bool(prov["synthetic"])


def synthetic_banner(meta: Mapping[str, Any]) -> str | None:
    """The warning every page shows when the model learned from phantoms, else None."""
    if is_synthetic(meta):
        return (
            "This model was trained on **synthetic phantom images**, not on radiographs: its "
            "probabilities and maps say nothing about real patients. Use it to try the app only."
        )
    return None


def _split_counts(counts: Any) -> str | None:
    if not isinstance(counts, Mapping) or not counts:
        return None
    return ", ".join(f"{k} {int(v):,}" for k, v in counts.items() if _num(v) is not None)


def provenance_table(meta: Mapping[str, Any]) -> pd.DataFrame:
    """field / value rows for the model card's "Training data" section (empty when not recorded)."""
    prov = provenance(meta)
    if prov is None:
        return pd.DataFrame(columns=["field", "value"])
    synth = prov.get("synthetic")
    missing = prov.get("missing_by_split") or {}
    n_missing = sum(int(v) for v in missing.values() if _num(v) is not None) if isinstance(missing, Mapping) else 0
    return _kv(
        [
            (
                "training images",
                "SYNTHETIC phantom images (not radiographs)"
                if synth
                else ("real images" if synth is not None else "not recorded"),
            ),
            ("dataset", prov.get("dataset")),
            ("data root", prov.get("data_root")),
            ("manifest hash", prov.get("manifest_hash")),
            ("images per split", _split_counts(prov.get("counts"))),
            (
                "images missing from the download",
                "none"
                if n_missing == 0
                else f"{n_missing:,} ({_split_counts(missing)}), left out of training and evaluation",
            ),
            ("official list coverage", prov.get("coverage")),
        ]
    )


def _kv(rows: Iterable[tuple[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(
        [(k, format_value(v)) for k, v in rows if v not in (None, "", [], {})], columns=["field", "value"]
    )


def _first(meta: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        cur: Any = meta
        for part in k.split("."):
            if not isinstance(cur, Mapping) or part not in cur:
                cur = None
                break
            cur = cur[part]
        if cur not in (None, "", [], {}):
            return cur
    return None


def metrics_table(metrics: Any) -> pd.DataFrame:
    """Flatten the checkpoint's metrics into rows with confidence intervals where present.

    Accepts ``{"auroc": {finding: v}, "auroc_ci": {finding: [lo, hi]}}``,
    ``{finding: {"auroc": v, "auroc_ci": [lo, hi]}}``, ``{"auroc": {finding: {"value", "ci_low", "ci_high"}}}``
    and scalars such as ``{"mean_auroc": v}`` (nested per split, e.g. ``{"val": {...}}``, too).
    """
    rows: list[dict[str, Any]] = []

    def ci_of(container: Mapping[str, Any], metric: str, finding: str | None) -> tuple[float | None, float | None]:
        for ck in (f"{metric}_ci", f"{metric}_ci95", "ci", "ci95"):
            c = container.get(ck)
            if isinstance(c, Mapping) and finding is not None:
                c = c.get(finding)
            if isinstance(c, (list, tuple)) and len(c) == 2:
                return _num(c[0]), _num(c[1])
        return None, None

    def walk(obj: Any, prefix: str) -> None:
        if not isinstance(obj, Mapping):
            return
        for key, val in obj.items():
            if str(key).endswith(("_ci", "_ci95")) or key in ("ci", "ci95", "epoch", "best_epoch"):
                continue
            name = f"{prefix}{key}"
            if _num(val) is not None:
                lo, hi = ci_of(obj, str(key), None)
                rows.append(
                    {
                        "scope": prefix.rstrip("/") or "all",
                        "finding": "(overall)",
                        "metric": str(key),
                        "value": _num(val),
                        "ci_low": lo,
                        "ci_high": hi,
                    }
                )
            elif isinstance(val, Mapping) and val and all(_num(v) is not None or _is_point(v) for v in val.values()):
                # {metric: {finding: value | {value, ci_low, ci_high}}}
                for finding, v in val.items():
                    if _is_point(v):
                        rows.append(
                            {
                                "scope": prefix.rstrip("/") or "all",
                                "finding": finding,
                                "metric": str(key),
                                "value": _num(v.get("value", v.get("estimate"))),
                                "ci_low": _num(v.get("ci_low", (v.get("ci") or [None, None])[0])),
                                "ci_high": _num(v.get("ci_high", (v.get("ci") or [None, None])[1])),
                            }
                        )
                    else:
                        lo, hi = ci_of(obj, str(key), str(finding))
                        rows.append(
                            {
                                "scope": prefix.rstrip("/") or "all",
                                "finding": finding,
                                "metric": str(key),
                                "value": _num(v),
                                "ci_low": lo,
                                "ci_high": hi,
                            }
                        )
            elif isinstance(val, Mapping):
                walk(val, f"{name}/")

    walk(metrics, "")
    df = pd.DataFrame(rows, columns=["scope", "finding", "metric", "value", "ci_low", "ci_high"])
    return df.astype({"value": float, "ci_low": float, "ci_high": float})


def _with_ci(value: float, lo: float, hi: float) -> str:
    if not math.isfinite(value):
        return ""
    return f"{value:.3f}" + (f" ({lo:.3f}-{hi:.3f})" if math.isfinite(lo) and math.isfinite(hi) else "")


def metrics_overview(metrics: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(overall metrics, one row per finding x one column per metric), values as "v (lo-hi)" text."""
    m = metrics.copy()
    m["metric"] = [f"{s}/{k}" if s != "all" else k for s, k in zip(m["scope"], m["metric"])]
    m["text"] = [_with_ci(v, lo, hi) for v, lo, hi in zip(m["value"], m["ci_low"], m["ci_high"])]
    overall = m[m["finding"] == "(overall)"][["metric", "text"]].rename(columns={"text": "value (95% CI)"})
    per = m[m["finding"] != "(overall)"]
    if len(per):
        order = list(dict.fromkeys(per["finding"]))
        table = per.pivot_table(index="finding", columns="metric", values="text", aggfunc="first")
        table = table.reindex(order).reset_index()
        table.columns.name = None
        table["finding"] = [display_name(n) for n in table["finding"]]
    else:
        table = pd.DataFrame(columns=["finding"])
    return overall.reset_index(drop=True), table


NOT_MEASURED = "not measured"
LOCALISATION_T = ("0.1", "0.25", "0.5")  # IoBB thresholds the card shows (Wang et al. 2017 report 0.1-0.7)


def localisation_table(meta: Mapping[str, Any]) -> tuple[pd.DataFrame, str]:
    """One row per finding: AUROC beside the map's localisation on ground-truth boxes.

    Columns: finding, AUROC (of the split localisation was measured on, else the latest evaluated
    split), pointing game, IoBB>T accuracy for T in :data:`LOCALISATION_T`, boxes (how many the
    figures rest on), data ("phantom" / "real"). A finding without boxes reads "not measured" in
    every localisation column, never a number. Returns (table, a sentence on what it rests on).
    ``meta["localisation"]`` is written by ``medxray evaluate``
    (:func:`medxray.evaluation.localisation.localisation_metadata`).
    """
    loc = meta.get("localisation") if isinstance(meta.get("localisation"), Mapping) else {}
    per = loc.get("per_finding") if isinstance(loc.get("per_finding"), Mapping) else {}
    split = str(loc.get("split") or "")
    metrics = meta.get("metrics") if isinstance(meta.get("metrics"), Mapping) else {}
    auroc = metrics.get(f"{split}_auroc") if split else None
    if not isinstance(auroc, Mapping):
        auroc = next((v for k, v in metrics.items() if k.endswith("_auroc") and isinstance(v, Mapping)), {})
    source = str(loc.get("source") or "")
    rows = []
    for name in meta.get("label_names") or []:
        f = per.get(name) if isinstance(per.get(name), Mapping) else None
        a = _num(auroc.get(name))
        row = {"finding": display_name(name), "AUROC": f"{a:.3f}" if a is not None else "not evaluated"}
        if f and int(f.get("n_boxes") or 0) > 0:
            acc = f.get("iobb_accuracy") or {}
            row["pointing game"] = f"{float(f['pointing_game']):.2f}"
            for t in LOCALISATION_T:
                v = _num(acc.get(t))
                row[f"IoBB>{t}"] = f"{v:.2f}" if v is not None else NOT_MEASURED
            row["boxes"] = str(int(f["n_boxes"]))
            row["data"] = source or "not recorded"
        else:
            row.update(
                {
                    "pointing game": NOT_MEASURED,
                    **{f"IoBB>{t}": NOT_MEASURED for t in LOCALISATION_T},
                    "boxes": "0",
                    "data": NOT_MEASURED,
                }
            )
        rows.append(row)
    cols = ["finding", "AUROC", "pointing game", *(f"IoBB>{t}" for t in LOCALISATION_T), "boxes", "data"]
    table = pd.DataFrame(rows, columns=cols)
    if not per:
        note = (
            "Localisation not measured: `medxray evaluate` found no ground-truth boxes for this model's "
            "findings (or was run with --no-localisation)."
        )
    else:
        what = (
            "synthetic phantom images (not radiographs)" if source == "phantom" else f"{source or 'unrecorded'} images"
        )
        note = (
            f"Map method {loc.get('method', '?')}, scored against the ground-truth boxes of the {split or '?'} "
            f"split on {what}: pointing game = share of boxes containing the map's peak; IoBB>T = share "
            "whose best map region has intersection over its own area above T (Wang et al. 2017)."
        )
    return table, note


def _is_point(v: Any) -> bool:
    return (
        isinstance(v, Mapping)
        and ("value" in v or "estimate" in v)
        and _num(v.get("value", v.get("estimate"))) is not None
    )


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def model_card(metadata: Mapping[str, Any], *, checkpoint_path: str | os.PathLike | None = None) -> ModelCard:
    """Build the model card; every fact comes from the checkpoint, missing ones are said to be missing."""
    meta = dict(metadata)
    arch = meta.get("architecture", "unknown")
    metrics = metrics_table(meta.get("metrics") or {})
    synth = is_synthetic(meta)
    loc_table, loc_note = localisation_table(meta)
    return ModelCard(
        title=f"medxray model card: {arch}",
        summary=_summary_table(meta, checkpoint_path),
        training=_training_table(meta),
        metrics=metrics,
        thresholds=_thresholds_table(meta),
        localisation=loc_table,
        localisation_note=loc_note,
        intended_use=_intended_use(meta),
        limitations=_limitations(meta, has_metrics=bool(len(metrics)), synthetic=synth),
        provenance=provenance_table(meta),
        synthetic=synth,
    )


def _summary_table(meta: Mapping[str, Any], checkpoint_path: str | os.PathLike | None) -> pd.DataFrame:
    """What the model is: architecture, initialisation, version, findings, input, creation, code."""
    labels = list(meta.get("label_names") or [])
    prep = meta.get("preprocessing") or {}
    init = _first(meta, "pretrained", "init", "initialisation", "initialization", "config.pretrained")
    return _kv(
        [
            ("architecture", meta.get("architecture", "unknown")),
            ("initialisation", init if init is not None else "not recorded"),
            ("model version", meta.get("model_version")),
            ("findings", f"{len(labels)}: " + ", ".join(display_name(n) for n in labels) if labels else None),
            (
                "input",
                f"{prep.get('image_size', '?')}x{prep.get('image_size', '?')}, {prep.get('intensity', '?')}"
                if prep
                else None,
            ),
            ("created", _first(meta, "created", "created_at", "saved_at")),
            ("git commit", _first(meta, "git_commit")),
            ("checkpoint", str(checkpoint_path) if checkpoint_path else None),
            ("software versions", ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()) or None),
        ]
    )


def _training_table(meta: Mapping[str, Any]) -> pd.DataFrame:
    """How it was trained: data set, split, manifest hash, counts, epochs, optimiser settings."""
    return _kv(
        [
            ("dataset", _first(meta, "dataset", "data.dataset", "config.dataset")),
            ("split", _first(meta, "split", "data.split", "split_description", "config.split")),
            ("split seed", _first(meta, "split_seed", "data.split_seed", "config.split_seed")),
            ("view filter", _first(meta, "view", "data.view", "config.view")),
            ("validation fraction", _first(meta, "val_fraction", "config.val_fraction")),
            ("manifest hash", _first(meta, "data_manifest_hash", "manifest_hash", "data.manifest_hash")),
            ("counts", _first(meta, "summary", "data.summary", "data_summary")),
            ("epochs", _first(meta, "epochs", "config.epochs", "train.epochs")),
            ("checkpoint epoch", _first(meta, "epoch")),
            ("selected by", _first(meta, "metrics.selected_by")),
            ("optimiser", _first(meta, "optimizer", "config.optimizer")),
            ("learning rate", _first(meta, "lr", "config.lr")),
            ("batch size", _first(meta, "batch_size", "config.batch_size")),
        ]
    )


def _thresholds_table(meta: Mapping[str, Any]) -> pd.DataFrame:
    """One row per finding: its operating threshold and how it was chosen (0.5 fallbacks named)."""
    labels = list(meta.get("label_names") or [])
    thr = meta.get("thresholds") or {}
    how = _first(meta, "threshold_method", "thresholds_method", "threshold_policy")
    if how is None and meta.get("threshold_split"):
        how = f"Youden's J on the {meta['threshold_split']} split (medxray evaluate)"
    fallback = set(meta.get("thresholds_fallback") or [])  # medxray evaluate: nothing to choose on
    return pd.DataFrame(
        [
            (
                display_name(n),
                float(thr.get(n, 0.5)),
                f"fallback 0.5: no positive or no negative on the {meta.get('threshold_split') or 'validation'} split"
                if n in fallback
                else how or ("default 0.5" if n not in thr else "from checkpoint"),
            )
            for n in labels
        ],
        columns=["finding", "threshold", "how chosen"],
    )


# intended_use and limitations are Markdown on the page: text from the checkpoint is escaped (shown as text)
_DEFAULT_INTENDED_USE = (
    "Research and education: helping a radiologist or ML engineer explore what a DenseNet "
    "fine-tuned on chest radiographs predicts for frontal (PA/AP) adult chest X-rays, and record "
    "agreement per finding. It is a second look for research, not a device."
)
_GENERAL_LIMITATIONS = [
    "Trained on the labels of its training set; ChestX-ray14 labels were mined from reports by NLP "
    "and are noisy (estimated accuracy around 90%), so the model learns their errors too.",
    "Frontal views only: lateral views, paediatric films and non-chest images are out of scope.",
    "Performance depends on the scanner, population and prevalence; validate locally before any use.",
    "Class activation maps are coarse (computed at a stage 8-16x coarser than the input, then "
    "upsampled) and show where evidence was found, not the outline of a lesion.",
    "Thresholds trade sensitivity against specificity for the validation set they were chosen on.",
]


def _intended_use(meta: Mapping[str, Any]) -> str:
    """The checkpoint's intended use (Markdown-escaped), else the project's default statement."""
    return md_escape(meta.get("intended_use")) if meta.get("intended_use") else _DEFAULT_INTENDED_USE


def _limitations(meta: Mapping[str, Any], *, has_metrics: bool, synthetic: bool | None) -> list[str]:
    """Most important first: synthetic training data (or not recorded), no metrics, then the
    checkpoint's own (Markdown-escaped) and the general limitations."""
    limitations = [md_escape(x) for x in (meta.get("limitations") or [])] + list(_GENERAL_LIMITATIONS)
    if not has_metrics:
        limitations.insert(0, "This checkpoint records no evaluation metrics: run `medxray evaluate` on it.")
    if synthetic:
        limitations.insert(
            0,
            "Trained and evaluated on synthetic phantom images: its metrics measure the phantom, "
            "not performance on radiographs.",
        )
    elif synthetic is None:
        limitations.insert(0, "The checkpoint does not record whether it was trained on real or synthetic images.")
    return limitations
