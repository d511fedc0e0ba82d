"""Is model B better than model A? Paired comparison of per-finding AUROC on the same images.

* DeLong's test for two correlated ROC curves (DeLong, DeLong and Clarke-Pearson, Biometrics 1988),
  computed with the fast midrank algorithm of Sun and Xu (IEEE Signal Processing Letters 2014):
  the structural components of each curve come from three rankings instead of an m x n comparison.
  Two-sided p-value from the normal approximation of the AUROC difference.
* A paired percentile bootstrap CI of the difference: images are resampled jointly, and the same
  resample scores both models, so the interval reflects their correlation.
* One verdict per finding. With 14 findings tested at once, p-values are adjusted by Holm's
  step-down method (Holm 1979) before the verdict, so "better" is not a multiple-testing artefact.

Inputs are (N, C) probability arrays of the two models on the same images with one label set.
:func:`compare_sources` takes two checkpoints or two predictions files and writes
``comparison.md`` / ``comparison.csv`` / ``comparison.json``.

Must not import torch or training; scoring a checkpoint goes through :mod:`medxray.evaluation.run`,
imported only when a checkpoint is given.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medxray.errors import ConfigError, DataError
from medxray.evaluation.metrics import weighted_auroc
from medxray.fileio import atomic_output, atomic_write_text, json_line


def midrank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (Sun and Xu 2014, Algorithm 1)."""
    from scipy.stats import rankdata

    return rankdata(x, method="average")


def delong_test(y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict[str, float]:
    """DeLong's test of AUROC(b) - AUROC(a) on the same cases (fast algorithm of Sun and Xu 2014).

    ``y``: (n,) 0/1 labels; ``scores_a``, ``scores_b``: (n,) scores. Returns ``auc_a``, ``auc_b``,
    ``diff`` (b - a), ``se`` (its standard error), ``z`` and two-sided ``p``. Ties count one half.
    With no positive or no negative every value is NaN; with zero variance (identical rankings)
    ``p`` is 1 when the difference is 0.
    """
    y = np.asarray(y) > 0.5
    s = np.stack([np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)])
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        nan = float("nan")
        return {"auc_a": nan, "auc_b": nan, "diff": nan, "se": nan, "z": nan, "p": nan}
    pos, neg = s[:, y], s[:, ~y]
    v10 = np.empty((2, m))
    v01 = np.empty((2, n))
    auc = np.empty(2)
    for k in range(2):
        tx, ty = midrank(pos[k]), midrank(neg[k])
        tz = midrank(np.concatenate([pos[k], neg[k]]))
        auc[k] = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        v10[k] = (tz[:m] - tx) / n  # per positive: share of negatives scored below it
        v01[k] = 1.0 - (tz[m:] - ty) / m  # per negative: share of positives scored above it
    s10 = np.cov(v10) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(v01) if n > 1 else np.zeros((2, 2))
    cov = s10 / m + s01 / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = float(auc[1] - auc[0])
    if var <= 1e-18:
        se, z, p = 0.0, float("nan"), 1.0 if abs(diff) < 1e-15 else 0.0
    else:
        se = math.sqrt(var)
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2.0))
    return {"auc_a": float(auc[0]), "auc_b": float(auc[1]), "diff": diff, "se": se, "z": z, "p": p}


def paired_bootstrap_diff(
    y: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of AUROC(b) - AUROC(a), each resample scoring both models on the same images."""
    n = len(y)
    if n_boot <= 0 or n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    d = weighted_auroc(scores_b, y, counts) - weighted_auroc(scores_a, y, counts)
    d = d[np.isfinite(d)]
    if not len(d):
        return float("nan"), float("nan")
    return float(np.percentile(d, (1 - level) / 2 * 100)), float(np.percentile(d, (1 + level) / 2 * 100))


def holm(p: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (NaN entries stay NaN and do not count as tests)."""
    idx = [i for i, v in enumerate(p) if math.isfinite(v)]
    order = sorted(idx, key=lambda i: p[i])
    out = [float("nan")] * len(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        out[i] = running
    return out


def verdict(row: dict[str, Any], alpha: float, a_name: str, b_name: str) -> str:
    """One line per finding from the adjusted p-value and the CI of the difference."""
    if not math.isfinite(row["p"]):
        return "not testable: no positive or no negative image"
    lo, hi = row["diff_ci95"]
    ci = f"diff {row['diff']:+.3f}, 95% CI {lo:+.3f} to {hi:+.3f}, p {row['p']:.3g}, Holm-adjusted {row['p_holm']:.3g}"
    if row["p_holm"] < alpha:
        better = b_name if row["diff"] > 0 else a_name
        return f"{better} better ({ci})"
    return f"no significant difference ({ci})"


@dataclass
class Comparison:
    """Per-finding rows (auc_a, auc_b, diff, diff_ci95, se, z, p, p_holm, n, positives, verdict)."""

    a: str
    b: str
    n_images: int
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)


def compare_arrays(
    label_names: Sequence[str],
    Y: np.ndarray,
    M: np.ndarray,
    Pa: np.ndarray,
    Pb: np.ndarray,
    *,
    a: str = "A",
    b: str = "B",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> Comparison:
    """Compare two models' (N, C) probabilities on the same images (labels ``Y``, masks ``M``)."""
    if Pa.shape != Pb.shape or Pa.shape != Y.shape:
        raise DataError(f"the two models' predictions differ in shape: {Pa.shape} vs {Pb.shape} (labels {Y.shape})")
    res = Comparison(a=a, b=b, n_images=int(len(Y)))
    for c, name in enumerate(label_names):
        k = M[:, c] > 0.5
        t = delong_test(Y[k, c], Pa[k, c], Pb[k, c])
        t["diff_ci95"] = list(paired_bootstrap_diff(Y[k, c], Pa[k, c], Pb[k, c], n_boot=n_boot, seed=seed + c))
        t["n"] = int(k.sum())
        t["positives"] = int((Y[k, c] > 0.5).sum())
        res.rows[name] = t
    for name, ph in zip(label_names, holm([res.rows[n]["p"] for n in label_names])):
        res.rows[name]["p_holm"] = ph
        res.rows[name]["verdict"] = verdict(res.rows[name], alpha, a, b)
    return res


_CSV_HEADER = [
    "finding",
    "auroc_a",
    "auroc_b",
    "diff_b_minus_a",
    "diff_ci95_lo",
    "diff_ci95_hi",
    "se",
    "z",
    "p_delong",
    "p_holm",
    "n",
    "positives",
    "verdict",
]
_JSON_KEYS = ["auc_a", "auc_b", "diff", "diff_ci95", "se", "z", "p", "p_holm", "n", "positives", "verdict"]


def write_comparison(res: Comparison, out: Path, note: str | None = None) -> dict[str, Path]:
    """``comparison.csv``, ``comparison.json`` and ``comparison.md`` in ``out``; also set as ``res.files``."""
    out.mkdir(parents=True, exist_ok=True)
    _write_comparison_csv(res, out / "comparison.csv")
    findings = {n: {k: r[k] for k in _JSON_KEYS} for n, r in res.rows.items()}
    doc = {"a": res.a, "b": res.b, "n_images": res.n_images, "findings": findings}
    atomic_write_text(out / "comparison.json", json.dumps(json.loads(json_line(doc)), indent=2))
    atomic_write_text(out / "comparison.md", _comparison_markdown(res, note))
    res.files = {k: out / f"comparison.{k}" for k in ("md", "csv", "json")}
    return res.files


def _write_comparison_csv(res: Comparison, path: Path) -> None:
    """One row per finding: both AUROCs, B - A with its 95% CI, DeLong's z and p, Holm's p, verdict."""
    with atomic_output(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(_CSV_HEADER)
        for name, r in res.rows.items():
            w.writerow(
                [
                    name,
                    r["auc_a"],
                    r["auc_b"],
                    r["diff"],
                    *r["diff_ci95"],
                    r["se"],
                    r["z"],
                    r["p"],
                    r["p_holm"],
                    r["n"],
                    r["positives"],
                    r["verdict"],
                ]
            )


def _comparison_markdown(res: Comparison, note: str | None = None) -> str:
    """The comparison as Markdown: what A and B are, the method (paired bootstrap CI, DeLong's test
    (DeLong et al. 1988; Sun and Xu 2014), Holm's adjustment) and one table row per finding."""

    def f(v: float, d: int = 3) -> str:
        return f"{v:.{d}f}" if math.isfinite(v) else "n/a"

    lines = [
        "# medxray model comparison\n",
        f"A = `{res.a}`  \nB = `{res.b}`  \n{res.n_images} images, the same for both.\n",
    ]
    if note:
        lines.append(f"> **Note:** {note}\n")
    lines += [
        "Difference = AUROC(B) - AUROC(A); 95% CI by paired bootstrap over images; p from DeLong's test "
        "(DeLong et al. 1988, fast algorithm of Sun and Xu 2014), adjusted for the number of findings by Holm's "
        "method; verdict at 0.05 on the adjusted p.\n",
        "| Finding | AUROC A | AUROC B | B - A (95% CI) | p (DeLong) | p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res.rows.items():
        lo, hi = r["diff_ci95"]
        lines.append(
            f"| {name} | {f(r['auc_a'])} | {f(r['auc_b'])} | {f(r['diff'])} ({f(lo)} to {f(hi)}) | "
            f"{r['p']:.3g} | {r['p_holm']:.3g} | {r['verdict'].split(' (')[0]} |"
        )
    return "\n".join(lines) + "\n"


def is_predictions_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".csv"


def compare_sources(
    a: str | Path,
    b: str | Path,
    *,
    out_dir: str | Path,
    split: str = "test",
    n_bootstrap: int = 1000,
    seed: int = 0,
    **evaluate_options: Any,
) -> tuple[Comparison, Any, Any]:
    """Evaluate ``a`` and ``b`` (two checkpoints, or two predictions CSVs) on ``split`` into
    ``out_dir/A`` and ``out_dir/B``, then compare them on the images both cover.

    Checkpoints are evaluated without writing thresholds back (a comparison changes neither model).
    Returns (:class:`Comparison`, EvalResult of A, EvalResult of B). Raises :class:`ConfigError`
    when one is a CSV and the other a checkpoint, :class:`DataError` when they share no image.
    """
    out = Path(out_dir)
    kinds = {is_predictions_file(a), is_predictions_file(b)}
    if len(kinds) != 1:
        raise ConfigError("--compare takes two checkpoints or two predictions files (.csv), not one of each")
    results = [
        _evaluate_source(src, out / tag, split, n_bootstrap, seed, evaluate_options)
        for tag, src in (("A", a), ("B", b))
    ]
    ra, rb = results
    if ra.label_names != rb.label_names:
        raise DataError(f"{a} and {b} predict different findings; compare models of the same label set")
    tables = [read_scored(r.files["predictions"], r.label_names) for r in results]
    common = sorted(set(tables[0][0]) & set(tables[1][0]))
    if not common:
        raise DataError(f"{a} and {b} share no image on the {split} split; a paired comparison needs the same images")
    pos = [{n: i for i, n in enumerate(t[0])} for t in tables]
    ia, ib = [pos[0][n] for n in common], [pos[1][n] for n in common]
    Y, M = tables[0][2][ia], tables[0][3][ia]
    note = None
    if len(common) < max(ra.n_images, rb.n_images):
        note = f"only the {len(common)} images both evaluations cover are compared (A {ra.n_images}, B {rb.n_images})"
    comp = compare_arrays(
        ra.label_names, Y, M, tables[0][1][ia], tables[1][1][ib], a=str(a), b=str(b), n_boot=n_bootstrap, seed=seed
    )
    cov = ra.coverage_note
    write_comparison(comp, out, note="; ".join(x for x in (cov, note) if x) or None)
    return comp, ra, rb


def _evaluate_source(
    src: str | Path, out: Path, split: str, n_bootstrap: int, seed: int, evaluate_options: Mapping[str, Any]
) -> Any:
    """Evaluate one side of a comparison into ``out``: a predictions CSV with
    :func:`~medxray.evaluation.external.evaluate_predictions` (of the options only the threshold
    split, dataset and data root apply), a checkpoint with :func:`~medxray.evaluation.run.evaluate`
    (no localisation, thresholds not written back). Returns its EvalResult."""
    if is_predictions_file(src):
        from medxray.evaluation.external import evaluate_predictions

        opts = {
            k: v
            for k, v in evaluate_options.items()
            if k == "threshold_split" or (k in ("dataset", "data_root") and v is not None)
        }
        return evaluate_predictions(src, split=split, out_dir=out, n_bootstrap=n_bootstrap, seed=seed, **opts)
    from medxray.evaluation.run import evaluate

    return evaluate(
        src, split=split, out_dir=out, n_bootstrap=n_bootstrap, seed=seed, localisation=False, **evaluate_options
    )


def read_scored(path: Path, label_names: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(names, probs, labels, masks) from an evaluation's ``predictions.csv`` (empty label cell = unknown)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    c = len(label_names)
    names = [r[0] for r in rows[1:]]
    P = np.array([[float(v) for v in r[1 : 1 + c]] for r in rows[1:]], dtype=np.float64).reshape(-1, c)
    Y = np.array([[float(v) if v != "" else 0.0 for v in r[1 + c : 1 + 2 * c]] for r in rows[1:]]).reshape(-1, c)
    M = np.array([[1.0 if v != "" else 0.0 for v in r[1 + c : 1 + 2 * c]] for r in rows[1:]]).reshape(-1, c)
    return names, P, Y, M
