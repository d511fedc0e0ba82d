"""Classification metrics of an evaluation: AUROC, bootstrap CIs, AUPRC, operating points, calibration.

All functions take ``probs``, ``labels`` and ``masks`` as (N, C) arrays (mask 1 = label known)
and count only known labels. AUROC counts ties one half (Mann-Whitney U); bootstrap intervals
resample images jointly, so the mean AUROC gets an interval too (percentile bootstrap, Efron and
Tibshirani 1993); thresholds are positive = ``p >= t``; calibration is the expected calibration
error over equal-width bins (Guo et al. 2017).

Pure NumPy / scikit-learn on arrays: must not import torch, models, data, training or the rest
of :mod:`medxray.evaluation`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def weighted_auroc(scores: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """AUROC for each row of ``weights`` (B, n) over samples (n,), ties counted one half.

    With integer bootstrap counts as weights this is the AUROC of each resample, computed for
    all resamples at once (a sort per class instead of one per resample).
    Returns NaN where a resample has no positive or no negative.
    """
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y) > 0.5
    W = np.ones((1, len(scores))) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if len(scores) == 0:
        return np.full(W.shape[0], np.nan)
    order = np.argsort(scores, kind="mergesort")
    s, yy, W = scores[order], y[order], W[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first index of each run of equal scores
    gpos = np.add.reduceat(W * yy, starts, axis=1)
    gneg = np.add.reduceat(W * ~yy, starts, axis=1)
    neg_below = np.cumsum(gneg, axis=1) - gneg
    num = (gpos * (neg_below + 0.5 * gneg)).sum(1)
    den = gpos.sum(1) * gneg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def auroc_per_class(probs: np.ndarray, labels: np.ndarray, masks: np.ndarray | None = None) -> list[float]:
    """AUROC of each class over its known labels; NaN where a class lacks positives or negatives."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    masks = np.ones_like(labels) if masks is None else np.asarray(masks)
    out = []
    for c in range(probs.shape[1] if probs.ndim == 2 else 0):
        k = masks[:, c] > 0.5
        out.append(float(weighted_auroc(probs[k, c], labels[k, c])[0]))
    return out


def bootstrap_auroc(
    probs: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    chunk: int = 200,
) -> dict[str, Any]:
    """Percentile bootstrap CIs of per-class AUROC and of their mean (images resampled jointly)."""
    n, c = probs.shape
    if n_boot <= 0 or n == 0:
        nan = (float("nan"), float("nan"))
        return {"per_class": [nan] * c, "mean": nan, "n_boot": 0}
    rng = np.random.default_rng(seed)
    per = np.full((n_boot, c), np.nan)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        counts = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)
        for j in range(c):
            k = masks[:, j] > 0.5
            per[done : done + b, j] = weighted_auroc(probs[k, j], labels[k, j], counts[:, k])
        done += b
    lo_q, hi_q = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def ci(v: np.ndarray) -> tuple[float, float]:
        v = v[np.isfinite(v)]
        return (float(np.percentile(v, lo_q)), float(np.percentile(v, hi_q))) if len(v) else (float("nan"),) * 2

    with np.errstate(invalid="ignore"), _NanOk():
        means = np.nanmean(per, axis=1)
    return {"per_class": [ci(per[:, j]) for j in range(c)], "mean": ci(means), "n_boot": n_boot}


class _NanOk:
    """Silence numpy's 'mean of empty slice' for all-NaN rows (a local, not a global, filter)."""

    def __enter__(self) -> None:
        import warnings

        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("ignore", category=RuntimeWarning)

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)


def auprc_per_class(probs: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> list[float]:
    """Average precision (area under the precision-recall curve, scikit-learn's step-wise
    estimate) of each class over its known labels; NaN where a class lacks positives or negatives."""
    from sklearn.metrics import average_precision_score

    out = []
    for c in range(probs.shape[1]):
        k = masks[:, c] > 0.5
        y = labels[k, c] > 0.5
        out.append(float(average_precision_score(y, probs[k, c])) if 0 < y.sum() < len(y) else float("nan"))
    return out


def operating_points(
    probs: np.ndarray,
    labels: np.ndarray,
    masks: np.ndarray,
    label_names: Sequence[str],
    specificity: float = 0.9,
) -> dict[str, dict[str, dict[str, float]]]:
    """Per class: the Youden-J threshold and the threshold reaching ``specificity`` (positive = p >= t)."""
    from sklearn.metrics import roc_curve

    out: dict[str, dict[str, dict[str, float]]] = {}
    for c, name in enumerate(label_names):
        k = masks[:, c] > 0.5
        y = labels[k, c] > 0.5
        if not 0 < y.sum() < len(y):
            out[name] = {}
            continue
        fpr, tpr, thr = roc_curve(y, probs[k, c])
        thr = np.clip(np.where(np.isfinite(thr), thr, 1.0), 0.0, 1.0)
        j = int(np.argmax(tpr - fpr))
        ok = np.flatnonzero(fpr <= 1.0 - specificity + 1e-12)
        s = int(ok[-1]) if len(ok) else 0
        key = f"spec{int(round(specificity * 100))}"
        out[name] = {
            "youden": {"threshold": float(thr[j]), "sensitivity": float(tpr[j]), "specificity": float(1 - fpr[j])},
            key: {"threshold": float(thr[s]), "sensitivity": float(tpr[s]), "specificity": float(1 - fpr[s])},
        }
    return out


def sens_spec_at(
    probs: np.ndarray, labels: np.ndarray, masks: np.ndarray, thresholds: Sequence[float]
) -> list[tuple[float, float]]:
    """(sensitivity, specificity) of each class at a given threshold (positive = p >= t)."""
    out = []
    for c, t in enumerate(thresholds):
        k = masks[:, c] > 0.5
        y, pred = labels[k, c] > 0.5, probs[k, c] >= t
        sens = float((pred & y).sum() / y.sum()) if y.sum() else float("nan")
        spec = float((~pred & ~y).sum() / (~y).sum()) if (~y).sum() else float("nan")
        out.append((sens, spec))
    return out


def calibration(probs: np.ndarray, labels: np.ndarray, masks: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Expected calibration error over all known (image, finding) pairs, and per class.

    ECE = sum over equal-width probability bins of |observed rate - mean probability| weighted by
    the bin's share of pairs. ``bins`` holds what the reliability plot draws.
    """

    def ece_of(p: np.ndarray, y: np.ndarray) -> tuple[float, list[dict[str, float]]]:
        if len(p) == 0:
            return float("nan"), []
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
        bins, ece = [], 0.0
        for b in range(n_bins):
            sel = idx == b
            if not sel.any():
                continue
            conf, acc, share = float(p[sel].mean()), float(y[sel].mean()), float(sel.mean())
            ece += share * abs(acc - conf)
            bins.append(
                {
                    "lo": float(edges[b]),
                    "hi": float(edges[b + 1]),
                    "mean_prob": conf,
                    "observed": acc,
                    "count": int(sel.sum()),
                }
            )
        return float(ece), bins

    known = masks > 0.5
    ece, bins = ece_of(probs[known], labels[known].astype(np.float64))
    per_class = [
        ece_of(probs[known[:, c], c], labels[known[:, c], c].astype(np.float64))[0] for c in range(probs.shape[1])
    ]
    return {"ece": ece, "bins": bins, "per_class": per_class, "n_bins": n_bins}
