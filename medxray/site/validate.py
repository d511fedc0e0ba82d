"""Site validation report: ``medxray site validate``.

Per finding, at the checkpoint's deployed thresholds (positive = p >= t): sensitivity,
specificity, PPV and NPV with 95% Wilson intervals; AUROC with a percentile-bootstrap CI where the
site has at least ``min_positives`` positives and negatives; ECE (equal-width bins, Guo et al.
2017) and a reliability plot; the OOD-flag rate. Each figure stands beside the checkpoint's own
validation figure (:mod:`medxray.site.reference`) with a test of the difference: the pooled
two-proportion z-test for the rates, an unpaired z-test with Hanley-McNeil standard errors for
AUROC (different images: DeLong's paired test does not apply). Findings significantly worse here
(p < 0.05 on AUROC, sensitivity or specificity) are named at the top.

Writes ``site_validation.md``, ``site_validation.html``, ``site_validation.json`` and
``reliability.png`` into the output folder. No patient identifier appears in any of them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from medxray.errors import DataError
from medxray.fileio import atomic_output, atomic_write_text, to_jsonable
from medxray.site.stats import hanley_mcneil_se, two_proportion_p, unpaired_auc_p, wilson

if TYPE_CHECKING:
    from medxray.site.reference import Reference

log = logging.getLogger(__name__)

MIN_POSITIVES = 10
RATES = ("sensitivity", "specificity", "ppv", "npv")


def finding_figures(
    p: np.ndarray,
    y: np.ndarray,
    threshold: float,
    *,
    min_positives: int = MIN_POSITIVES,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Counts, the four rates with Wilson CIs and AUROC (bootstrap CI when testable) of one finding."""
    from medxray.evaluation.metrics import bootstrap_auroc, weighted_auroc

    y = np.asarray(y) > 0.5
    pred = np.asarray(p) >= threshold
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    tn, fp = int((~pred & ~y).sum()), int((pred & ~y).sum())
    out: dict[str, Any] = {
        "n": int(len(y)),
        "positives": tp + fn,
        "negatives": tn + fp,
        "threshold": float(threshold),
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
    }
    for name, k, n in (
        ("sensitivity", tp, tp + fn),
        ("specificity", tn, tn + fp),
        ("ppv", tp, tp + fp),
        ("npv", tn, tn + fn),
    ):
        out[name] = {"value": k / n if n else float("nan"), "ci95": list(wilson(k, n)), "k": k, "n": n}
    auc = float(weighted_auroc(p, y)[0]) if len(y) else float("nan")
    out["auroc"] = {
        "value": auc,
        "ci95": [float("nan"), float("nan")],
        "se": hanley_mcneil_se(auc, tp + fn, tn + fp),
        "testable": False,
    }
    if tp + fn >= min_positives and tn + fp >= min_positives:
        b = bootstrap_auroc(
            np.asarray(p)[:, None], y[:, None].astype(float), np.ones((len(y), 1)), n_boot=n_boot, seed=seed
        )
        lo, hi = b["per_class"][0]
        out["auroc"].update(ci95=[float(lo), float(hi)], testable=True)
    return out


@dataclass
class SiteValidation:
    """Per-finding site figures, reference figures and tests; the worse findings; the files written."""

    checkpoint: str
    model_version: str
    n_images: int
    findings: dict[str, dict[str, Any]] = field(default_factory=dict)
    worse: list[str] = field(default_factory=list)
    ood_rate: float | None = None
    reference_source: str | None = None
    files: dict[str, Path] = field(default_factory=dict)


def validate_site(
    checkpoint: str | os.PathLike,
    labels: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    min_positives: int = MIN_POSITIVES,
    n_boot: int = 1000,
    device: str = "cpu",
    alpha: float = 0.05,
) -> SiteValidation:
    """Score the labelled site images with ``checkpoint`` and write the report (module docstring)."""
    from medxray.checkpoint import load_checkpoint
    from medxray.evaluation.metrics import calibration
    from medxray.site.labelled import score_labelled
    from medxray.site.labels import read_manifest
    from medxray.site.reference import validation_reference

    ckpt = load_checkpoint(checkpoint)
    names, rows = read_manifest(labels)
    if not rows:
        raise DataError(f"{labels} has no labelled images")
    ls = score_labelled([checkpoint], names, rows, device=device)
    common, Y, M, P, ok, scored = ls.findings, ls.labels, ls.masks, ls.probs[0], ls.kept, ls.scored[0]
    if not common:
        raise DataError(f"none of the findings of {labels} ({', '.join(names[:5])}) is an output of the checkpoint")
    thresholds = {n: float((ckpt.metadata.get("thresholds") or {}).get(n, 0.5)) for n in common}
    ref = validation_reference(checkpoint, ckpt.metadata)
    cal = calibration(P, Y, M)
    res = SiteValidation(
        str(checkpoint),
        str(ckpt.metadata.get("model_version", "unversioned")),
        int(ok.sum()),
        ood_rate=float(scored.ood_flags[ok].mean()) if scored.ood_flags is not None and ok.any() else None,
        reference_source=ref.source if ref else None,
    )
    for c, n in enumerate(common):
        k = M[:, c] > 0.5
        site = finding_figures(P[k, c], Y[k, c], thresholds[n], min_positives=min_positives, n_boot=n_boot, seed=c)
        site["ece"] = cal["per_class"][c]
        row: dict[str, Any] = {"site": site, "validation": None, "tests": {}}
        if ref is not None and n in ref.label_names:
            row["validation"], row["tests"], worse = _against_reference(
                site, ref, n, thresholds[n], min_positives=min_positives, seed=c, alpha=alpha
            )
            if worse:
                res.worse.append(f"{n}: " + "; ".join(worse))
        res.findings[n] = row
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    res.files = _write(res, out, P, Y, M, common, cal, scored.failed)
    return res


def _against_reference(
    site: dict[str, Any], ref: Reference, name: str, threshold: float, *, min_positives: int, seed: int, alpha: float
) -> tuple[dict[str, Any], dict[str, float], list[str]]:
    """One finding's figures on the checkpoint's validation reference (200 bootstrap resamples), the
    site-vs-validation p-values (two-proportion z-test per rate, Hanley-McNeil z-test for AUROC;
    unadjusted), and the ways the site is significantly worse (p < ``alpha``, site below validation)."""
    from medxray.evaluation.metrics import calibration

    rc = ref.label_names.index(name)
    kk = ref.masks[:, rc] > 0.5
    v = finding_figures(
        ref.probs[kk, rc], ref.labels[kk, rc], threshold, min_positives=min_positives, n_boot=200, seed=seed
    )
    v["ece"] = calibration(ref.probs[kk, rc][:, None], ref.labels[kk, rc][:, None], np.ones((kk.sum(), 1)))["ece"]
    tests: dict[str, float] = {}
    for rate in RATES:
        tests[rate] = two_proportion_p(site[rate]["k"], site[rate]["n"], v[rate]["k"], v[rate]["n"])
    tests["auroc"] = (
        unpaired_auc_p(site["auroc"]["value"], site["auroc"]["se"], v["auroc"]["value"], v["auroc"]["se"])
        if site["auroc"]["testable"]
        else float("nan")
    )
    worse = []
    for key in ("auroc", "sensitivity", "specificity"):
        sv, vv = site[key]["value"], v[key]["value"]
        pv = tests[key]
        if math.isfinite(pv) and pv < alpha and sv < vv:
            worse.append(f"{key} {sv:.3f} vs {vv:.3f} in validation (p {pv:.2g})")
    return v, tests, worse


def _fmt_rate(d: dict[str, Any] | None) -> str:
    if d is None or not math.isfinite(d["value"]):
        return "n/a"
    lo, hi = d["ci95"]
    return (
        f"{d['value']:.3f} ({lo:.2f}-{hi:.2f}, {d['k']}/{d['n']})"
        if "k" in d
        else (
            f"{d['value']:.3f} ({lo:.2f}-{hi:.2f})"
            if math.isfinite(lo)
            else f"{d['value']:.3f} (CI n/a: few positives)"
        )
    )


def _p(v: float) -> str:
    return f"{v:.2g}" if math.isfinite(v) else "n/a"


def reliability_plot(path: Path, P: np.ndarray, Y: np.ndarray, M: np.ndarray, names: Sequence[str]) -> None:
    """Observed positive rate against mean predicted probability per bin, one line per finding with labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from medxray.evaluation.metrics import calibration
    from medxray.labels import display_name

    fig = Figure(figsize=(5.5, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    for c, n in enumerate(names):
        k = M[:, c] > 0.5
        if k.sum() < 5:
            continue
        bins = calibration(P[k, c][:, None], Y[k, c][:, None], np.ones((k.sum(), 1)), n_bins=10)["bins"]
        ax.plot(
            [b["mean_prob"] for b in bins], [b["observed"] for b in bins], marker="o", lw=1.2, label=display_name(n)
        )
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed positive rate (site labels)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title("Reliability on the site's reviewed images")
    ax.legend(fontsize=7, loc="upper left")
    with atomic_output(path, "wb") as fh:
        fig.savefig(fh, format="png")


_TABLE_HEAD = [
    "Finding",
    "t",
    "n (pos)",
    "AUROC site",
    "AUROC val",
    "p",
    "Sens site",
    "Sens val",
    "p",
    "Spec site",
    "Spec val",
    "p",
    "PPV site",
    "NPV site",
    "ECE site",
    "ECE val",
]
_LIMITS = [
    "Labels are reviewer verdicts on the model's calls, not an independent reference standard: "
    "verification bias (only reviewed images count) and reviewer noise both apply.",
    "PPV and NPV depend on the site's prevalence; validation PPV/NPV are not comparable across sites.",
    "Findings with fewer than the minimum positives have no AUROC interval or test.",
]


def _write(
    res: SiteValidation,
    out: Path,
    P: np.ndarray,
    Y: np.ndarray,
    M: np.ndarray,
    names: Sequence[str],
    cal: dict[str, Any],
    failed: dict[int, str],
) -> dict[str, Path]:
    """``reliability.png`` and ``site_validation.{md,html,json}`` in ``out``; returns their paths by kind."""
    from medxray.evaluation.report import render_html, render_markdown

    reliability_plot(out / "reliability.png", P, Y, M, names)
    blocks = _summary_blocks(res, len(failed))
    blocks += [
        ("h2", "Per finding"),
        ("table", _TABLE_HEAD, [_table_row(n, r) for n, r in res.findings.items()]),
        (
            "p",
            "Rates with 95% Wilson intervals (k/n); AUROC with a 95% percentile-bootstrap interval where "
            f"the site has enough positives; p: two-proportion z-test (rates) or Hanley-McNeil z-test "
            f"(AUROC), site vs validation, unadjusted. Overall ECE {cal['ece']:.3f}.",
        ),
        ("h2", "Calibration"),
        ("img", "reliability.png", "reliability plot"),
        ("h2", "Limits"),
        ("list", _LIMITS),
    ]
    files = {
        "md": out / "site_validation.md",
        "html": out / "site_validation.html",
        "json": out / "site_validation.json",
        "reliability": out / "reliability.png",
    }
    atomic_write_text(files["md"], render_markdown(blocks))
    atomic_write_text(
        files["html"], render_html(blocks).replace("medxray evaluation report", "medxray site validation")
    )
    doc = {
        "checkpoint": res.checkpoint,
        "model_version": res.model_version,
        "images": res.n_images,
        "ood_flag_rate": res.ood_rate,
        "reference": res.reference_source,
        "worse": res.worse,
        "unreadable": len(failed),
        "ece": cal["ece"],
        "findings": res.findings,
    }
    atomic_write_text(files["json"], json.dumps(to_jsonable(doc), indent=1, allow_nan=True) + "\n")
    return files


def _summary_blocks(res: SiteValidation, n_unreadable: int) -> list[tuple]:
    """The report's head: title, the verdict against the validation reference, what was scored,
    unreadable images, the out-of-distribution flag rate."""
    blocks: list[tuple] = [("h1", f"Site validation of {res.model_version}")]
    if res.worse:
        blocks.append(
            ("warn", "Worse at this site than in the checkpoint's validation (p < 0.05): " + " | ".join(res.worse))
        )
    else:
        blocks.append(
            (
                "p",
                "No finding is significantly worse here than in the checkpoint's validation"
                + ("" if res.reference_source else " (no validation reference was available: nothing was compared)")
                + ".",
            )
        )
    blocks.append(
        (
            "p",
            f"{res.n_images} reviewed site images scored at the deployed thresholds; labels from "
            f"reviewer verdicts (see the labels' summary for the rule). "
            f"Validation reference: {res.reference_source or 'none'}. "
            f"Generated {datetime.now(timezone.utc).isoformat(timespec='seconds')}.",
        )
    )
    if n_unreadable:
        blocks.append(("warn", f"{n_unreadable} image(s) could not be read and are left out."))
    ood = "n/a (the checkpoint has no OOD statistics)" if res.ood_rate is None else f"{res.ood_rate:.1%}"
    blocks.append(("p", f"Out-of-distribution flag rate: {ood}; by construction about 5% of validation images."))
    return blocks


def _table_row(name: str, r: dict[str, Any]) -> list[str]:
    """One finding's row of the per-finding table (columns of ``_TABLE_HEAD``)."""
    from medxray.labels import display_name

    s, v, t = r["site"], r["validation"], r["tests"]
    return [
        display_name(name),
        f"{s['threshold']:.3f}",
        f"{s['n']} ({s['positives']})",
        _fmt_rate(s["auroc"]),
        _fmt_rate(v["auroc"]) if v else "n/a",
        _p(t.get("auroc", float("nan"))),
        _fmt_rate(s["sensitivity"]),
        _fmt_rate(v["sensitivity"]) if v else "n/a",
        _p(t.get("sensitivity", float("nan"))),
        _fmt_rate(s["specificity"]),
        _fmt_rate(v["specificity"]) if v else "n/a",
        _p(t.get("specificity", float("nan"))),
        _fmt_rate(s["ppv"]),
        _fmt_rate(s["npv"]),
        f"{s['ece']:.3f}" if math.isfinite(s["ece"]) else "n/a",
        f"{v['ece']:.3f}" if v and math.isfinite(v["ece"]) else "n/a",
    ]
