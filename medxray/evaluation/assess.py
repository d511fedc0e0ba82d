"""From scored probabilities to an evaluation's numbers, files and report: :func:`assess`.

Shared by the checkpoint evaluation (:mod:`medxray.evaluation.run`) and the evaluation of external
prediction files (:mod:`medxray.evaluation.external`), so both give the same metrics, the same
bootstrap CIs, thresholds chosen the same way and the same statement of what the numbers rest on:

* coverage of ChestX-ray14's official test list (Wang et al. 2017, ``test_list.txt``: 25,596
  images). Published numbers are on the full list; a report on part of it says how much, and labels
  the reference columns "not comparable" (:func:`official_test_coverage`, :func:`coverage_note`);
* fallback thresholds: a finding with no positive (or no negative) where thresholds are chosen gets
  0.5, and is listed as such rather than presented as "chosen on val";
* ``predictions.csv`` with enough digits to recompute every reported AUROC from it (9 significant
  digits round-trip a float32, Python's ``repr`` a float64).

Must not import torch, models, training, or the evaluation jobs (:mod:`~medxray.evaluation.run`,
:mod:`~medxray.evaluation.external`, :mod:`~medxray.evaluation.compare`).
"""

from __future__ import annotations

import csv
import datetime
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medxray.evaluation.metrics import (
    auprc_per_class,
    auroc_per_class,
    bootstrap_auroc,
    calibration,
    operating_points,
    sens_spec_at,
)
from medxray.evaluation.report import write_plots, write_report
from medxray.evaluation.result import EvalResult
from medxray.fileio import atomic_output, atomic_write_text, json_line

FALLBACK_THRESHOLD = 0.5


def official_test_coverage(names: Sequence[str], dataset: str) -> dict[str, Any] | None:
    """How many of ChestX-ray14's official test images (shipped ``test_list.txt``) are in ``names``.

    Returns None for other datasets, else ``{"official_test_images", "evaluated", "fraction",
    "complete"}``. Raises :class:`medxray.errors.DataError` when the shipped list fails its SHA-256.
    """
    if dataset != "chestxray14":
        return None
    from medxray.data.manifest import read_name_list, shipped_files

    official = set(read_name_list(shipped_files("chestxray14")["test_list"]))
    n = len(official.intersection(names))
    return {
        "official_test_images": len(official),
        "evaluated": n,
        "fraction": n / len(official),
        "complete": n == len(official),
    }


def coverage_note(coverage: Mapping[str, Any] | None, split: str, n_images: int) -> str | None:
    """The report's (and the CLI's) first line about what the numbers rest on; None off ChestX-ray14."""
    if not coverage:
        return None
    n, total = coverage["evaluated"], coverage["official_test_images"]
    pct = 100.0 * coverage["fraction"]
    if split == "test" and coverage["complete"]:
        return (
            f"Coverage: all {total:,} images of the official ChestX-ray14 test list "
            "(comparable with published results)."
        )
    if split == "test":
        return (
            f"Coverage: {n:,} of {total:,} official ChestX-ray14 test images ({pct:.2f} %). Published results are "
            f"on the full list: these numbers are NOT comparable with them."
        )
    return (
        f"Coverage: {n_images:,} images of the {split} split, {n:,} of {total:,} official ChestX-ray14 test images: "
        f"NOT comparable with published test-set results."
    )


def reference_label(coverage: Mapping[str, Any] | None, split: str) -> str | None:
    """Suffix for the CheXNet / Wang et al. columns: None when comparable (full official test list)."""
    if coverage and split == "test" and coverage["complete"]:
        return None
    n = coverage["evaluated"] if coverage else 0
    total = coverage["official_test_images"] if coverage else 25596
    return f"not comparable: {n:,} of {total:,} official test images"


def format_probability(v: float, dtype: np.dtype) -> str:
    """Shortest text that reads back to the same value: 9 significant digits for float32, repr for float64."""
    return f"{float(v):.9g}" if np.dtype(dtype) == np.float32 else repr(float(v))


def choose_thresholds(ops: Mapping[str, Any], label_names: Sequence[str]) -> tuple[dict, dict, list[str]]:
    """Youden and 90%-specificity thresholds from :func:`operating_points`, and the findings that fell back to 0.5."""
    fallback = [n for n in label_names if not ops.get(n)]
    youden = {n: float(ops[n]["youden"]["threshold"]) if ops.get(n) else FALLBACK_THRESHOLD for n in label_names}
    spec90 = {n: float(ops[n]["spec90"]["threshold"]) if ops.get(n) else FALLBACK_THRESHOLD for n in label_names}
    return youden, spec90, fallback


@dataclass(frozen=True)
class _Scores:
    """The numbers of one scored split (:func:`_score`), in ``label_names`` order where per class."""

    aurocs: list[float]
    mean_auroc: float  # over the finite per-class AUROCs; nan when none
    boot: dict[str, Any]  # bootstrap_auroc's result: per_class and mean 95% CIs, n_boot
    auprc: list[float]
    calib: dict[str, Any]  # calibration's result
    ops: dict[str, Any]  # operating_points on the threshold split
    youden: dict[str, float]
    spec90: dict[str, float]
    fallback: list[str]  # findings given FALLBACK_THRESHOLD
    at_youden: list[tuple[float, float]]  # (sensitivity, specificity) on this split
    at_spec90: list[tuple[float, float]]


def _score(
    P: np.ndarray,
    Y: np.ndarray,
    M: np.ndarray,
    label_names: list[str],
    threshold_set: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    n_bootstrap: int,
    seed: int,
) -> _Scores:
    """AUROC with bootstrap CIs, AUPRC, calibration, and the operating points chosen on
    ``threshold_set`` (or on P, Y, M themselves) applied to P, Y, M."""
    aurocs = auroc_per_class(P, Y, M)
    finite = [a for a in aurocs if math.isfinite(a)]
    boot = bootstrap_auroc(P, Y, M, n_boot=n_bootstrap, seed=seed)
    auprc = auprc_per_class(P, Y, M)
    calib = calibration(P, Y, M)
    ops = operating_points(*(threshold_set if threshold_set is not None else (P, Y, M)), label_names)
    youden, spec90, fallback = choose_thresholds(ops, label_names)
    return _Scores(
        aurocs=aurocs,
        mean_auroc=float(np.mean(finite)) if finite else float("nan"),
        boot=boot,
        auprc=auprc,
        calib=calib,
        ops=ops,
        youden=youden,
        spec90=spec90,
        fallback=fallback,
        at_youden=sens_spec_at(P, Y, M, [youden[n] for n in label_names]),
        at_spec90=sens_spec_at(P, Y, M, [spec90[n] for n in label_names]),
    )


def assess(
    out: Path,
    *,
    label_names: Sequence[str],
    names: Sequence[str],
    probs: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    split: str,
    dataset: str,
    threshold_set: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    threshold_split: str,
    n_bootstrap: int = 1000,
    seed: int = 0,
    localisation: Mapping[str, Any] | None = None,
    localisation_records: Sequence[Mapping[str, Any]] = (),
    source_lines: Sequence[str] = (),
    note: str | None = None,
    summary: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    checkpoint: Path | None = None,
    precision: str = "fp32",
) -> tuple[EvalResult, dict[str, Any]]:
    """Metrics, ``predictions.csv``, plots, ``metrics.json`` and the report for one scored split.

    ``probs``, ``labels``, ``masks``: (N, C) arrays in the order of ``names``. ``threshold_set``:
    (probs, labels, masks) of the split thresholds are chosen on (``threshold_split``), or None to
    choose them on this split. ``source_lines``: what produced the probabilities (report header).
    ``extra``: more keys for ``metrics.json``. Returns the :class:`EvalResult` and the metrics dict.
    """
    out.mkdir(parents=True, exist_ok=True)
    P, Y, M = probs, labels, masks
    names, label_names = list(names), list(label_names)
    s = _score(P, Y, M, label_names, threshold_set, n_bootstrap, seed)
    coverage = official_test_coverage(names, dataset)
    cov_note = coverage_note(coverage, split, len(names))

    files = write_predictions(out, label_names, names, P, Y, M, localisation_records)
    files.update(write_plots(out, label_names, P, Y, M, s.aurocs, s.calib))
    result = _eval_result(
        out,
        s,
        label_names,
        files,
        checkpoint=checkpoint,
        split=split,
        n_images=int(len(P)),
        threshold_split=threshold_split,
        localisation=dict(localisation) if localisation else None,
        precision=precision,
        coverage=coverage,
        coverage_note=cov_note,
    )
    metrics = _metrics(result, s, dataset=dataset, extra=extra, localisation=localisation, summary=summary)
    files["metrics"] = out / "metrics.json"
    atomic_write_text(files["metrics"], json.dumps(json.loads(json_line(metrics)), indent=2))
    write_report(
        result,
        metrics,
        dataset=dataset,
        source_lines=source_lines,
        summary=summary or {},
        note=note,
        at_youden=s.at_youden,
        at_spec90=s.at_spec90,
        reference_note=reference_label(coverage, split) if dataset == "chestxray14" else None,
    )
    return result, metrics


def _eval_result(
    out: Path,
    s: _Scores,
    label_names: list[str],
    files: dict[str, Path],
    *,
    checkpoint: Path | None,
    split: str,
    n_images: int,
    threshold_split: str,
    localisation: dict[str, Any] | None,
    precision: str,
    coverage: dict[str, Any] | None,
    coverage_note: str | None,
) -> EvalResult:
    """The :class:`EvalResult` of the scores, with the Youden thresholds as the operating ones."""
    return EvalResult(
        out_dir=out,
        checkpoint=checkpoint,
        split=split,
        n_images=n_images,
        label_names=label_names,
        auroc=dict(zip(label_names, s.aurocs)),
        auroc_ci=dict(zip(label_names, s.boot["per_class"])),
        mean_auroc=s.mean_auroc,
        mean_auroc_ci=tuple(s.boot["mean"]),
        auprc=dict(zip(label_names, s.auprc)),
        thresholds=s.youden,
        threshold_split=threshold_split,
        operating_points=s.ops,
        calibration=s.calib,
        localisation=localisation,
        report_md=out / "report.md",
        report_html=out / "report.html",
        files=files,
        precision=precision,
        coverage=coverage,
        coverage_note=coverage_note,
        thresholds_fallback=s.fallback,
    )


def _metrics(
    res: EvalResult,
    s: _Scores,
    *,
    dataset: str,
    extra: Mapping[str, Any] | None,
    localisation: Mapping[str, Any] | None,
    summary: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The ``metrics.json`` document of an evaluation: ``extra`` keys first, then what was scored,
    the scores (:func:`_metrics_fields`), localisation, the data summary and the time (UTC)."""
    return {
        **dict(extra or {}),
        "dataset": dataset,
        "split": res.split,
        "n_images": res.n_images,
        "precision": res.precision,
        "coverage": res.coverage,
        "coverage_note": res.coverage_note,
        **_metrics_fields(s, res.label_names, res.threshold_split),
        "localisation": localisation,
        "data_summary": dict(summary or {}),
        "evaluated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _metrics_fields(s: _Scores, label_names: list[str], threshold_split: str) -> dict[str, Any]:
    """The ``metrics.json`` keys of the scores, in the file's order (AUROC ... at_spec90)."""
    return {
        "mean_auroc": s.mean_auroc,
        "mean_auroc_ci95": list(s.boot["mean"]),
        "n_bootstrap": s.boot["n_boot"],
        "auroc": dict(zip(label_names, s.aurocs)),
        "auroc_ci95": {n: list(ci) for n, ci in zip(label_names, s.boot["per_class"])},
        "auprc": dict(zip(label_names, s.auprc)),
        "ece": s.calib["ece"],
        "ece_per_class": dict(zip(label_names, s.calib["per_class"])),
        "threshold_split": threshold_split,
        "thresholds_youden": s.youden,
        "thresholds_spec90": s.spec90,
        "thresholds_fallback": s.fallback,
        "at_youden": {n: {"sensitivity": a, "specificity": b} for n, (a, b) in zip(label_names, s.at_youden)},
        "at_spec90": {n: {"sensitivity": a, "specificity": b} for n, (a, b) in zip(label_names, s.at_spec90)},
    }


def write_predictions(
    out: Path,
    label_names: Sequence[str],
    names: Sequence[str],
    P: np.ndarray,
    Y: np.ndarray,
    M: np.ndarray,
    localisation_records: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Path]:
    """``predictions.csv`` (name, p_<finding>..., y_<finding>...; unknown labels empty) and, when given,
    ``localisation.csv``. Probabilities are written so that they read back exactly (:func:`format_probability`)."""
    path = out / "predictions.csv"
    with atomic_output(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name"] + [f"p_{n}" for n in label_names] + [f"y_{n}" for n in label_names])
        for name, p, y, m in zip(names, P, Y, M):
            w.writerow(
                [name]
                + [format_probability(v, P.dtype) for v in p]
                + ["" if mk == 0 else int(v) for v, mk in zip(y, m)]
            )
    files = {"predictions": path}
    if localisation_records:
        lp = out / "localisation.csv"
        with atomic_output(lp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["name", "finding", "prob", "iobb", "pointing_hit", "n_boxes"])
            for r in localisation_records:
                w.writerow(
                    [
                        r["name"],
                        r["finding"],
                        f"{r['prob']:.6f}",
                        f"{r['iobb']:.4f}",
                        int(r["pointing_hit"]),
                        r["n_boxes"],
                    ]
                )
        files["localisation"] = lp
    return files
