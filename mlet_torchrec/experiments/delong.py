"""Test-set uncertainty of an AUC difference: DeLong's paired test on two models' scores of the same test rows.

Seeds only measure training noise; every cell of a data set is scored on the same test rows, so their sampling
noise is in no seed interval. DeLong, DeLong & Clarke-Pearson (1988) estimate the variance of an AUC, and the
covariance of two AUCs on the same rows, from the placement values of each positive among the negatives (and vice
versa); this is the midrank form of Sun & Xu (2014), O(n log n) with ``scipy.stats.rankdata``.

Example:
    >>> import numpy as np
    >>> y = np.array([0, 0, 1, 1, 0, 1])
    >>> a = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    >>> round(auc(a, y), 4)
    0.8889
    >>> r = delong_paired(a, a, y)
    >>> r.diff, r.p
    (0.0, 1.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps


@dataclass(frozen=True)
class PairedAUC:
    """AUC of a and b on the same rows, a − b with its DeLong standard error, 95% interval and two-sided p."""

    auc_a: float
    auc_b: float
    diff: float
    se: float
    lo: float
    hi: float
    p: float


def _placements(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(V10 per positive, V01 per negative): the share of the other class each row outranks, ties counting 1/2."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    m, n = pos.size, neg.size
    all_ranks = sps.rankdata(np.concatenate([pos, neg]))
    v10 = (all_ranks[:m] - sps.rankdata(pos)) / n
    v01 = 1.0 - (all_ranks[m:] - sps.rankdata(neg)) / m
    return v10, v01


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC (the Mann-Whitney statistic; ties count 1/2); nan without both classes."""
    labels = np.asarray(labels)
    if not (labels == 1).any() or not (labels == 0).any():
        return float("nan")
    return float(_placements(np.asarray(scores, dtype=np.float64), labels)[0].mean())


def delong_paired(a: np.ndarray, b: np.ndarray, labels: np.ndarray) -> PairedAUC:
    """DeLong's test of AUC(a) = AUC(b) for two models' scores of the same rows (any monotone scores: logits).

    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 400)
    >>> good, bad = y + rng.normal(0, 1, 400), y + rng.normal(0, 3, 400)
    >>> r = delong_paired(good, bad, y)
    >>> r.diff > 0 and r.p < 0.05 and r.lo < r.diff < r.hi
    True
    """
    labels = np.asarray(labels)
    a10, a01 = _placements(np.asarray(a, dtype=np.float64), labels)
    b10, b01 = _placements(np.asarray(b, dtype=np.float64), labels)
    s10, s01 = np.cov(np.vstack([a10, b10])), np.cov(np.vstack([a01, b01]))
    contrast = np.array([1.0, -1.0])
    var = float(contrast @ s10 @ contrast / a10.size + contrast @ s01 @ contrast / a01.size)
    auc_a, auc_b = float(a10.mean()), float(b10.mean())
    diff = auc_a - auc_b
    se = math.sqrt(max(var, 0.0))
    if se == 0.0:
        p = 1.0 if diff == 0 else 0.0
        return PairedAUC(auc_a, auc_b, diff, 0.0, diff, diff, p)
    z = float(sps.norm.ppf(0.975))
    p = float(2 * sps.norm.sf(abs(diff) / se))
    return PairedAUC(auc_a, auc_b, diff, se, diff - z * se, diff + z * se, p)
