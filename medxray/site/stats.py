"""Small statistics the site reports need beside :mod:`medxray.evaluation.metrics`.

* Wilson score interval of a binomial proportion (Wilson, JASA 1927; recommended over the Wald
  interval by Brown, Cai and DasGupta, Statistical Science 2001).
* Two-proportion z-test with pooled variance (site vs validation sensitivity, specificity, ...).
* AUROC standard error of Hanley and McNeil (Radiology 1982), for an unpaired comparison of a site
  AUROC with the checkpoint's validation AUROC (different images, so DeLong's paired test does not apply).
* Population stability index over the reference's deciles (Yurdakul 2018; the credit-scoring
  convention: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift), with the small-sample
  noise floor subtracted before the levels apply (PSI is asymptotically chi-square scaled by
  1/n_e + 1/n_a; the floor is its 99.7% quantile), so a quiet day of 30 images does not look like drift.

Pure NumPy/SciPy; no medxray imports.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

PSI_WARN = 0.10
PSI_ALERT = 0.25
SCORE_BINS: tuple[float, ...] = tuple(np.round(np.linspace(0.0, 1.0, 11), 2).tolist())


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval (lo, hi) of k successes in n trials; (nan, nan) when n == 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1.0 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def two_proportion_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of the pooled two-proportion z-test; nan when either n is 0."""
    if n1 <= 0 or n2 <= 0:
        return float("nan")
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    z = (k1 / n1 - k2 / n2) / se
    return float(math.erfc(abs(z) / math.sqrt(2)))


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUROC from its value and the class counts (Hanley and McNeil 1982)."""
    if not (math.isfinite(auc) and n_pos > 0 and n_neg > 0):
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    return math.sqrt(max(var, 0.0))


def unpaired_auc_p(auc1: float, se1: float, auc2: float, se2: float) -> float:
    """Two-sided z-test p-value of two AUROCs on independent samples."""
    se = math.sqrt(se1 * se1 + se2 * se2) if math.isfinite(se1) and math.isfinite(se2) else float("nan")
    if not math.isfinite(se) or not math.isfinite(auc1) or not math.isfinite(auc2):
        return float("nan")
    if se == 0:
        return 1.0 if auc1 == auc2 else 0.0
    return float(math.erfc(abs(auc1 - auc2) / se / math.sqrt(2)))


def quantile_edges(reference: np.ndarray, bins: int = 10) -> list[float]:
    """Inner bin edges at the reference's quantiles (deciles by default), so every reference bin holds
    about the same share: the usual PSI binning. Ties collapse edges, so fewer bins may result."""
    r = np.asarray(reference, dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return []
    return sorted(set(float(q) for q in np.quantile(r, np.linspace(0, 1, bins + 1)[1:-1])))


def histogram(scores: np.ndarray, edges: Sequence[float] = SCORE_BINS[1:-1]) -> list[int]:
    """Counts of ``scores`` in the bins cut at the inner ``edges`` (len(edges) + 1 bins, open at both ends)."""
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), s, side="right")
    return [int(c) for c in np.bincount(idx, minlength=len(edges) + 1)]


def psi(expected: Sequence[float], actual: Sequence[float], pseudo: float = 0.5) -> float:
    """Population stability index sum((a - e) * ln(a / e)) of two binned count vectors, each bin
    count smoothed by ``pseudo`` (so an empty bin stays finite). nan when either side is empty."""
    e, a = np.asarray(expected, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if e.sum() <= 0 or a.sum() <= 0:
        return float("nan")
    e, a = (e + pseudo) / (e.sum() + pseudo * len(e)), (a + pseudo) / (a.sum() + pseudo * len(a))
    return float(np.sum((a - e) * np.log(a / e)))


PSI_NULL_QUANTILE = 0.997  # a finding's PSI must beat 99.7% of same-distribution samples before a level applies


def psi_noise_floor(n_bins: int, n_expected: int, n_actual: int, quantile: float = PSI_NULL_QUANTILE) -> float:
    """The PSI that two samples of one distribution stay below with probability ``quantile``:
    PSI is asymptotically chi-square with bins - 1 degrees of freedom scaled by 1/n_e + 1/n_a, so the
    floor is chi2.ppf(quantile, bins - 1) * (1/n_e + 1/n_a). The mean alone (bins - 1 times the
    scale) would be exceeded by 0.25 on roughly one finding in ten on a day of 60 images against a
    30-image reference; 14 findings a day would then raise a false alert most days. Levels apply to
    PSI above this floor. NaN when either sample is empty."""
    from scipy.stats import chi2

    if n_expected <= 0 or n_actual <= 0:
        return float("nan")
    return float(chi2.ppf(quantile, n_bins - 1)) * (1.0 / n_expected + 1.0 / n_actual)


def psi_level(value: float) -> str:
    """ "ok", "warn" (>= 0.10) or "alert" (>= 0.25) for a PSI value; "n/a" when not finite."""
    if not math.isfinite(value):
        return "n/a"
    return "alert" if value >= PSI_ALERT else "warn" if value >= PSI_WARN else "ok"
