"""The evaluation's human-readable outputs: ROC / PR / reliability plots and the Markdown + HTML report.

One list of report blocks is rendered both to Markdown and to HTML. Plots use matplotlib's
object API (no pyplot global state).

Must not import the evaluation job (:mod:`medxray.evaluation.run`), training, models or data:
it renders numbers it is given.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medxray.evaluation.localisation import IOBB_THRESHOLDS
from medxray.evaluation.result import EvalResult
from medxray.fileio import atomic_output, atomic_write_text

# --------------------------------------------------------------------------------------------
# plots (matplotlib's object API: no pyplot global state)


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig: Any, path: Path) -> None:
    with atomic_output(path, "wb") as fh:
        fig.savefig(fh, format="png")


def write_plots(
    out: Path,
    label_names: Sequence[str],
    P: np.ndarray,
    Y: np.ndarray,
    M: np.ndarray,
    aurocs: Sequence[float],
    calib: Mapping[str, Any],
) -> dict[str, Path]:
    """Write ``roc.png``, ``pr.png`` and ``reliability.png`` into ``out``; returns their paths by kind.

    ``P``, ``Y``, ``M``: (N, C) probabilities, labels, masks; ``aurocs``: per-class AUROC for the
    legend; ``calib``: :func:`medxray.evaluation.metrics.calibration`'s result.
    """
    files: dict[str, Path] = {}
    for kind in ("roc", "pr"):
        files[kind] = out / f"{kind}.png"
        _save_figure(_curves_figure(kind, label_names, P, Y, M, aurocs), files[kind])
    files["reliability"] = out / "reliability.png"
    _save_figure(_reliability_figure(calib), files["reliability"])
    return files


def _curves_figure(
    kind: str, label_names: Sequence[str], P: np.ndarray, Y: np.ndarray, M: np.ndarray, aurocs: Sequence[float]
) -> Any:
    """ROC (``kind="roc"``: AUROC in the legend) or precision-recall (``"pr"``: prevalence in the
    legend) curves, one per finding with both classes among its known labels."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    colors = [__import__("matplotlib").colormaps["tab20"](i % 20) for i in range(len(label_names))]
    fig = _figure(7.5, 6)
    ax = fig.add_subplot(1, 1, 1)
    for c, name in enumerate(label_names):
        k = M[:, c] > 0.5
        y = Y[k, c] > 0.5
        if not 0 < y.sum() < len(y):
            continue
        if kind == "roc":
            fpr, tpr, _ = roc_curve(y, P[k, c])
            ax.plot(fpr, tpr, color=colors[c], lw=1.3, label=f"{name} ({aurocs[c]:.3f})")
        else:
            prec, rec, _ = precision_recall_curve(y, P[k, c])
            ax.plot(rec, prec, color=colors[c], lw=1.3, label=f"{name} (prev. {y.mean():.2f})")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity", title="ROC curves (AUROC)")
    else:
        ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall curves")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "upper right", ncol=1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _reliability_figure(calib: Mapping[str, Any]) -> Any:
    """Reliability diagram (observed frequency against mean predicted probability per bin, ECE in
    the title) above the bins' pair counts (log scale)."""
    fig = _figure(5.5, 6)
    ax = fig.add_subplot(2, 1, (1, 1))
    bins = calib["bins"]
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="perfect calibration")
    if bins:
        ax.plot([b["mean_prob"] for b in bins], [b["observed"] for b in bins], "o-", color="tab:blue", label="model")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="observed frequency", title=f"Reliability (ECE {calib['ece']:.3f})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax2 = fig.add_subplot(2, 1, 2)
    if bins:
        ax2.bar(
            [(b["lo"] + b["hi"]) / 2 for b in bins],
            [b["count"] for b in bins],
            width=1.0 / calib["n_bins"] * 0.9,
            color="tab:grey",
        )
    ax2.set(xlim=(0, 1), xlabel="predicted probability", ylabel="pairs (image, finding)")
    ax2.set_yscale("log")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# report (one structure rendered to Markdown and to HTML)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class _ReportContext:
    """What every section of :func:`write_report` reads besides the result itself."""

    res: EvalResult
    metrics: Mapping[str, Any]
    summary: Mapping[str, Any]
    dataset: str
    is_cx14: bool  # ChestX-ray14's 14 findings: the published reference columns apply
    reference_note: str | None


def write_report(
    res: EvalResult,
    metrics: Mapping[str, Any],
    *,
    dataset: str,
    source_lines: Sequence[str],
    summary: Mapping[str, Any],
    note: str | None,
    at_youden: Sequence[tuple[float, float]],
    at_spec90: Sequence[tuple[float, float]],
    reference_note: str | None = None,
) -> None:
    """Write ``report.md`` and ``report.html`` into ``res.out_dir``: our AUROC beside CheXNet's
    (Rajpurkar et al. 2017) and Wang et al.'s (2017) for ChestX-ray14, operating points,
    calibration, curves and localisation, with the split and data the numbers rest on.

    The first lines say how much of the official test list the numbers cover (``res.coverage_note``);
    ``reference_note`` (e.g. "not comparable: 75 of 25,596 official test images") labels the
    reference columns when the evaluated images are not the full official test list.
    ``source_lines``: what produced the probabilities (checkpoint or predictions file).
    """
    from medxray.labels import CHESTXRAY14_FINDINGS

    ctx = _ReportContext(
        res=res,
        metrics=metrics,
        summary=summary,
        dataset=dataset,
        is_cx14=list(res.label_names) == list(CHESTXRAY14_FINDINGS) and dataset == "chestxray14",
        reference_note=reference_note,
    )
    blocks: list[tuple] = [
        *_intro_blocks(ctx, source_lines, note),
        *_auroc_blocks(ctx),
        *_operating_point_blocks(ctx, at_youden, at_spec90),
        *_calibration_blocks(res),
        *_localisation_blocks(res.localisation),
    ]
    atomic_write_text(res.out_dir / "report.md", render_markdown(blocks))
    atomic_write_text(res.out_dir / "report.html", render_html(blocks))


def _intro_blocks(ctx: _ReportContext, source_lines: Sequence[str], note: str | None) -> list[tuple]:
    """Title, coverage line, caller's note, what the numbers rest on, and how they compare with the
    published ChestX-ray14 numbers (official test list or not)."""
    res, metrics, summary = ctx.res, ctx.metrics, ctx.summary
    blocks: list[tuple] = [("h1", "medxray evaluation report")]
    if res.coverage_note:
        blocks.append(("p" if ctx.reference_note is None else "warn", res.coverage_note))
    if note:
        blocks.append(("warn", note))
    patients = summary.get("patients", {}).get(res.split)
    blocks.append(
        (
            "list",
            [
                *source_lines,
                f"Data: dataset `{ctx.dataset}`, split **{res.split}** ({res.n_images} images"
                + (f", {patients} patients" if patients else "")
                + f"), data manifest hash `{str(metrics.get('data_manifest_hash') or '')[:16]}`",
                f"Numeric precision of the probabilities: **{res.precision}**; test-time augmentation: "
                f"{'TenCrop (10 crops averaged)' if metrics.get('tta') else 'none'}; "
                f"bootstrap: {metrics.get('n_bootstrap')} resamples of images for 95% intervals",
                f"Evaluated {metrics.get('evaluated')}",
            ],
        )
    )
    comparability = _comparability_text(ctx)
    if comparability:
        blocks.append(("p", comparability))
    return blocks


def _comparability_text(ctx: _ReportContext) -> str | None:
    """Whether the published ChestX-ray14 numbers are like-for-like with ours; None off ChestX-ray14."""
    if not ctx.is_cx14:
        return None
    if ctx.res.split == "test" and ctx.reference_note is None:
        return (
            "The test split is ChestX-ray14's official patient-wise test list (test_list.txt, Wang et al. "
            "2017), complete. Wang et al.'s numbers are on that same list. CheXNet's come from its own random "
            "70/10/20 patient split, which was never released, so they are a guide and not a like-for-like "
            "comparison."
        )
    if ctx.res.split == "test":
        return (
            "These images are part of ChestX-ray14's official test list only. The published numbers beside "
            "them are on the full list (Wang et al.) or on CheXNet's own unreleased split: they are shown "
            "for orientation and are not comparable with ours."
        )
    return (
        f"These numbers are on the {ctx.res.split} split, not the official test list; the published "
        "numbers beside them are test-set numbers and are not comparable."
    )


def _auroc_blocks(ctx: _ReportContext) -> list[tuple]:
    """The per-class AUROC table (95% CI, AUPRC, prevalence; CheXNet and Wang et al. on ChestX-ray14)
    with a mean row."""
    from medxray.labels import CHEXNET_AUROC, WANG2017_AUROC

    res = ctx.res
    header = ["Finding", "AUROC (95% CI)", "AUPRC", "prevalence"]
    ref_suffix = f" ({ctx.reference_note})" if ctx.reference_note else ""
    if ctx.is_cx14:
        header += [f"CheXNet 2017{ref_suffix}", f"Wang et al. 2017{ref_suffix}"]
    prevalence = ctx.summary.get("prevalence", {}).get(res.split) or {}
    rows = []
    for n in res.label_names:
        lo, hi = res.auroc_ci[n]
        row = [n, f"{_fmt(res.auroc[n])} ({_fmt(lo)}-{_fmt(hi)})", _fmt(res.auprc[n]), _fmt(prevalence.get(n))]
        if ctx.is_cx14:
            row += [_fmt(CHEXNET_AUROC.get(n, float("nan"))), _fmt(WANG2017_AUROC.get(n, float("nan")))]
        rows.append(row)
    finite_auprc = any(math.isfinite(v) for v in res.auprc.values())
    mean_row = [
        "**mean**",
        f"**{_fmt(res.mean_auroc)}** ({_fmt(res.mean_auroc_ci[0])}-{_fmt(res.mean_auroc_ci[1])})",
        _fmt(float(np.nanmean(list(res.auprc.values()))) if finite_auprc else None),
        "",
    ]
    if ctx.is_cx14:
        mean_row += [
            _fmt(float(np.mean(list(CHEXNET_AUROC.values())))),
            _fmt(float(np.mean(list(WANG2017_AUROC.values())))),
        ]
    rows.append(mean_row)
    return [("h2", "Per-class AUROC"), ("table", header, rows)]


def _operating_point_blocks(
    ctx: _ReportContext, at_youden: Sequence[tuple[float, float]], at_spec90: Sequence[tuple[float, float]]
) -> list[tuple]:
    """Youden and 90%-specificity thresholds with their (sensitivity, specificity), one row per finding
    (``at_youden``/``at_spec90`` in ``label_names`` order); a warning names the 0.5 fallbacks."""
    res = ctx.res
    spec90 = ctx.metrics["thresholds_spec90"]
    fallback = set(res.thresholds_fallback)
    op_rows = [
        [
            n,
            _fmt(res.thresholds[n]) + (" (fallback)" if n in fallback else ""),
            _fmt(at_youden[i][0]),
            _fmt(at_youden[i][1]),
            _fmt(spec90[n]),
            _fmt(at_spec90[i][0]),
            _fmt(at_spec90[i][1]),
        ]
        for i, n in enumerate(res.label_names)
    ]
    where = (
        " The Youden thresholds are written into the checkpoint's metadata, where the scorer and the viewer read them."
        if res.checkpoint
        else ""
    )
    blocks: list[tuple] = [
        ("h2", "Operating points"),
        (
            "p",
            f"Thresholds were chosen on the **{res.threshold_split}** split and are applied here to the "
            f"{res.split} split (positive = probability >= threshold)." + where,
        ),
    ]
    if fallback:
        blocks.append(
            (
                "warn",
                f"Fallback thresholds (0.5, not chosen on data): {', '.join(res.thresholds_fallback)}. "
                f"The {res.threshold_split} split has no positive or no negative for these findings, so "
                f"no threshold could be chosen; their operating points mean nothing.",
            )
        )
    header = ["Finding", "Youden threshold", "sensitivity", "specificity"]
    header += ["90%-spec. threshold", "sensitivity", "specificity"]
    blocks.append(("table", header, op_rows))
    return blocks


def _calibration_blocks(res: EvalResult) -> list[tuple]:
    """Expected calibration error with the reliability diagram, then the ROC and PR curve images
    (the files :func:`write_plots` wrote)."""
    return [
        ("h2", "Calibration"),
        (
            "p",
            f"Expected calibration error over all (image, finding) pairs with known labels: "
            f"**{_fmt(res.calibration['ece'])}** ({res.calibration['n_bins']} equal-width bins).",
        ),
        ("img", "reliability.png", "reliability diagram"),
        ("h2", "ROC and precision-recall curves"),
        ("img", "roc.png", "ROC curves"),
        ("img", "pr.png", "PR curves"),
    ]


def _localisation_blocks(loc: Mapping[str, Any] | None) -> list[tuple]:
    """IoBB accuracy at each of :data:`IOBB_THRESHOLDS`, mean IoBB and pointing game per finding
    and overall (Wang et al. 2017); nothing when no localisation was run."""
    if not loc:
        return []
    lrows = [
        [n, str(s["n"])]
        + [_fmt(s["iobb_accuracy"][str(t)]) for t in IOBB_THRESHOLDS]
        + [_fmt(s["mean_iobb"]), _fmt(s["pointing_game"])]
        for n, s in list(loc["per_finding"].items()) + [("**all**", loc["overall"])]
    ]
    return [
        ("h2", "Localisation (class activation maps)"),
        (
            "p",
            f"Map method: **{loc.get('method', 'not recorded')}** (medxray.cam.compute_maps, the maps "
            "the app and the scorer show). "
            "On images with ground-truth boxes: the finding's map is normalised to [0, 1], thresholded, and "
            "each connected region's bounding box is compared with the ground truth. A box counts as "
            "correct when IoBB (intersection over the predicted box's area) exceeds T, as in Wang et al. "
            "2017. Pointing game: the CAM's maximum lies inside the ground-truth box.",
        ),
        (
            "table",
            ["Finding", "boxes"] + [f"IoBB>{t}" for t in IOBB_THRESHOLDS] + ["mean IoBB", "pointing game"],
            lrows,
        ),
    ]


def render_markdown(blocks: Sequence[tuple]) -> str:
    """Markdown of report blocks: ("h1"|"h2"|"p"|"warn", text), ("list", items),
    ("table", header, rows), ("img", src, alt)."""
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h1":
            out.append(f"# {b[1]}\n")
        elif kind == "h2":
            out.append(f"## {b[1]}\n")
        elif kind == "p":
            out.append(f"{b[1]}\n")
        elif kind == "warn":
            out.append(f"> **Note:** {b[1]}\n")
        elif kind == "list":
            out.append("\n".join(f"- {x}" for x in b[1]) + "\n")
        elif kind == "table":
            header, rows = b[1], b[2]
            lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
            out.append("\n".join(lines) + "\n")
        elif kind == "img":
            out.append(f"![{b[2]}]({b[1]})\n")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then render the two Markdown inline forms the report uses (**bold**, `code`)."""
    import re

    t = html.escape(str(text))
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def render_html(blocks: Sequence[tuple]) -> str:
    """A standalone HTML page of the same blocks as :func:`render_markdown` (text escaped)."""
    body = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{_inline(b[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(b[1])}</p>")
        elif kind == "warn":
            body.append(f'<p class="warn"><b>Note:</b> {_inline(b[1])}</p>')
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{_inline(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            body.append(f'<p><img src="{html.escape(b[1])}" alt="{html.escape(b[2])}"></p>')
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}.warn{background:#fff3cd;padding:.6em;border:1px solid #e0c36c}"
        "img{max-width:100%}"
    )
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>medxray evaluation report</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
