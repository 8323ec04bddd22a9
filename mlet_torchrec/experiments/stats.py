"""Seed statistics of the report, on scipy.stats: mean ± std, t intervals, the paired test, Benjamini-Hochberg q,
pooling over cells (clustered by shared baseline, Hartung-Knapp intervals).

Every comparison in the report is paired: MLET and its baseline run with the same seed, so each seed gives one
difference and the test is a one-sample t-test of those differences against 0.

Example:
    >>> fmt([0.71, 0.73])
    '0.7200 ± 0.0141'
    >>> round(t95(11), 3), round(t95(40), 3), t95(0)
    (2.201, 2.021, inf)
    >>> m, lo, hi, n = t_interval([1.0, 2.0, 3.0])
    >>> m, round(lo, 3), round(hi, 3), n
    (2.0, -0.484, 4.484, 3)
    >>> r = paired_test([0.01, 0.012, 0.011])
    >>> round(r.t, 1), r.p < 0.05
    (19.1, True)
    >>> verdict(r)
    'MLET better (t=+19.1, p<0.05)'
    >>> verdict(paired_test([0.01, -0.012, 0.011]))
    'within noise (t=+0.4)'
    >>> fmt_p(0.25), fmt_p(0.00001), fmt_p(0.00001, smallest=0.0), fmt_p(float("nan"))
    ('0.250', '<0.001', '0.000', '–')
    >>> p = pooled_estimate([[0.010, 0.012, 0.011], [0.004, 0.006, 0.005]])
    >>> round(p.estimate, 4), p.n_cells
    (0.008, 2)
    >>> fmt_interval(0.0012, -0.0003, 0.0027)
    '+0.0012 [−0.0003, +0.0027]'
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats as sps

_ALPHA = 0.05  # the report's one significance level: "p<0.05" in the verdicts


def t95(df: int) -> float:
    """Two-sided 95% critical value of Student's t with ``df`` degrees of freedom (inf when ``df <= 0``).

    >>> round(t95(1), 3)
    12.706
    """
    if df <= 0:
        return float("inf")
    return float(sps.t.ppf(0.975, df))


def _clean(values: Sequence[float | None]) -> list[float]:
    # missing metrics come through as None (or NaN from a diverged run): they are not seeds
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """Mean, sample std (nan for one value) and count of the values that are present.

    >>> mean_std([1.0, None, 3.0])
    (2.0, 1.4142135623730951, 2)
    """
    vals = _clean(values)
    if not vals:
        return float("nan"), float("nan"), 0
    m = statistics.fmean(vals)
    s = statistics.stdev(vals) if len(vals) > 1 else float("nan")
    return m, s, len(vals)


def fmt(values: Sequence[float | None], digits: int = 4, scale: float = 1.0) -> str:
    """``mean ± std`` over seeds (just the mean for one value, ``–`` for none)."""
    m, s, n = mean_std([v * scale for v in values if v is not None])
    if n == 0:
        return "–"
    if n == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _signed(x: float, digits: int) -> str:
    if math.isnan(x):
        return "–"
    # a true minus sign: it lines up with "+" in Markdown tables and is not read as a hyphen
    return f"{x:+.{digits}f}".replace("-", "−")


def fmt_interval(mean: float, lo: float, hi: float, digits: int = 4) -> str:
    """``+mean [lo, hi]`` with explicit signs (U+2212 for minus); ``–`` for a missing mean or bound.

    >>> fmt_interval(-0.5, -1.25, 0.25, digits=2)
    '−0.50 [−1.25, +0.25]'
    >>> fmt_interval(0.5, float("nan"), float("nan"), digits=1)
    '+0.5 [–, –]'
    """
    if math.isnan(mean):
        return "–"
    return f"{_signed(mean, digits)} [{_signed(lo, digits)}, {_signed(hi, digits)}]"


def _get(rec: dict[str, Any], path: str) -> float | None:
    node: Any = rec
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return None if node is None else float(node)


def t_interval(values: Sequence[float | None], level: float = 0.95) -> tuple[float, float, float, int]:
    """Student-t interval of the mean: ``(mean, lo, hi, n)``; the interval is nan for fewer than 2 values.

    >>> t_interval([0.5])
    (0.5, nan, nan, 1)
    >>> t_interval([2.0, 2.0])
    (2.0, 2.0, 2.0, 2)
    """
    m, s, n = mean_std(values)
    if n < 2:
        return m, float("nan"), float("nan"), n
    half = float(sps.t.ppf(0.5 + level / 2, n - 1)) * s / math.sqrt(n)
    return m, m - half, m + half, n


@dataclass(frozen=True)
class PairedTest:
    """One-sample t-test of per-seed differences against 0, with the 95% t interval of their mean.

    ``p`` is two-sided. Degenerate inputs are decided without scipy (which would warn and return nan):
    n < 2 gives ``t = p = nan``; all differences equal (std 0) gives ``p = 1`` when they are all 0 (the data
    are exactly the null, ``t = 0``) and ``p = 0`` otherwise (``t = ±inf``: no noise can explain the gap).
    """

    mean: float
    std: float
    n: int
    t: float
    p: float
    lo: float
    hi: float


def paired_test(diffs: Sequence[float | None]) -> PairedTest:
    """Test whether the mean per-seed difference is 0 (``scipy.stats.ttest_1samp``; see ``PairedTest``).

    >>> paired_test([0.0, 0.0, 0.0]).p
    1.0
    >>> r = paired_test([0.1, 0.1])
    >>> r.t, r.p
    (inf, 0.0)
    """
    m, lo, hi, n = t_interval(diffs)
    s = mean_std(diffs)[1]
    if n < 2:
        return PairedTest(m, s, n, float("nan"), float("nan"), lo, hi)
    if s == 0:
        t = 0.0 if m == 0 else math.copysign(math.inf, m)
        return PairedTest(m, s, n, t, 1.0 if m == 0 else 0.0, lo, hi)
    res = sps.ttest_1samp(_clean(diffs), 0.0)
    return PairedTest(m, s, n, float(res.statistic), float(res.pvalue), lo, hi)


def verdict(r: PairedTest, higher_is_better: bool = True, q: float | None = None) -> str:
    """The report's one-phrase reading of a paired test (:func:`paired_test`): significant when the two-sided
    p < 0.05, or, given the test's Benjamini-Hochberg ``q`` among the report's tests (:func:`bh_q`), when q < 0.05.

    >>> r = paired_test([0.01, 0.012, 0.011])
    >>> verdict(r, higher_is_better=False)
    'MLET worse (t=+19.1, p<0.05)'
    >>> verdict(r, q=0.2), verdict(r, q=0.01)
    ('within noise (t=+19.1, q=0.200)', 'MLET better (t=+19.1, q<0.05)')
    >>> verdict(paired_test([0.0, 0.0])), verdict(paired_test([0.1]))
    ('identical', 'n<2: no test')
    """
    if r.n < 2:
        return "n<2: no test"
    better = (r.mean > 0) == higher_is_better
    if r.std == 0:
        return "identical" if r.mean == 0 else ("MLET better" if better else "MLET worse")
    if q is not None and not q < _ALPHA:
        return f"within noise (t={r.t:+.1f}, q={q:.3f})"
    if not r.p < _ALPHA:
        return f"within noise (t={r.t:+.1f})"
    return f"MLET {'better' if better else 'worse'} (t={r.t:+.1f}, {'p' if q is None else 'q'}<0.05)"


def fmt_p(p: float, smallest: float = 0.001) -> str:
    """A p or q value for a report's table: 3 decimals, ``<smallest`` below ``smallest``, ``–`` when missing (nan).
    The data-set reports pass ``smallest=0.0`` (their tables print ``0.000``)."""
    if math.isnan(p):
        return "–"
    return f"<{smallest:g}" if p < smallest else f"{p:.3f}"


@dataclass(frozen=True)
class Pooled:
    """A pooled mean difference over cells: estimate, its 95% interval, the cells used, tau² and the method."""

    estimate: float
    lo: float
    hi: float
    n_cells: int
    tau2: float
    method: str


def bh_q(ps: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (q) of a report's tests, in their order; a missing p (nan) stays nan
    and is not counted as a test (``scipy.stats.false_discovery_control``). A cell is significant at a false
    discovery rate of 5% when q < 0.05.

    >>> [round(q, 4) for q in bh_q([0.01, 0.04, float("nan"), 0.03, 0.2])]
    [0.04, 0.0533, nan, 0.0533, 0.2]
    """
    present = [i for i, p in enumerate(ps) if not math.isnan(p)]
    out = [float("nan")] * len(ps)
    if present:
        qs = sps.false_discovery_control([ps[i] for i in present], method="bh")
        for i, q in zip(present, qs, strict=True):
            out[i] = float(q)
    return out


def cluster_cells(cells: Sequence[Mapping[int, float]], clusters: Sequence[Hashable]) -> list[list[float]]:
    """One cell per cluster of cells that share a baseline: per seed that every member has, the mean of the
    members' differences (keyed by seed). Cells compared with one baseline run are not independent (its noise is
    in each of them); their seed-wise mean carries that shared noise once, so pooling the clusters does not count
    it several times. Clusters come out in order of first appearance.

    >>> cluster_cells([{0: 0.1, 1: 0.3}, {0: 0.3, 1: 0.5, 2: 9.0}, {0: 1.0}], ["a", "a", "b"])
    [[0.2, 0.4], [1.0]]
    """
    members: dict[Hashable, list[Mapping[int, float]]] = {}
    for cell, key in zip(cells, clusters, strict=True):
        members.setdefault(key, []).append(cell)
    out = []
    for group in members.values():
        seeds = sorted(set.intersection(*(set(c) for c in group)))
        out.append([statistics.fmean(c[s] for c in group) for s in seeds])
    return out


def pooled_estimate(cells: Sequence[Sequence[float]]) -> Pooled:
    """Random-effects pooled mean of per-cell paired differences: DerSimonian-Laird weights, Hartung-Knapp interval.

    Each cell (e.g. one d of a sweep, or a :func:`cluster_cells` cluster) is the list of its per-seed differences;
    its mean ``y_i`` has variance ``v_i = s_i²/n_i``. Cells with n < 2 carry no variance and are skipped. DL
    estimates the between-cell variance ``tau² = max(0, (Q − (k−1)) / C)`` from Cochran's Q of the fixed-effect
    fit and weights each cell by ``w_i = 1 / (v_i + tau²)``. The interval is Hartung-Knapp's: ``estimate ±
    t(k−1, 0.975)·SE`` with ``SE² = max(1, Σ w_i (y_i − estimate)² / (k − 1)) / Σ w_i`` (the truncation at 1 keeps
    it from being narrower than the DL one when cells agree). HK uses the scatter of the cells themselves, so it
    keeps its coverage with few cells, where DL's z interval is too narrow; with one cell there is no interval
    (``t(0)`` is infinite), and with two it is wide: the honest answer for two cells.

    A cell whose seeds agree exactly (``v_i = 0``) would get infinite weight: it is given the smallest positive
    variance among the cells instead. When every cell has zero variance the estimate is the plain mean of the
    cell means with a t interval over them (``method="mean of cell means"``).

    Worked example: three cells, each with seed std 0.001 over 3 seeds (``v_i = 1e-6/3``), means 0.011, 0.005,
    0.019. Equal weights give 0.011667; Q = 296 against k − 1 = 2, so ``tau² = 4.9e-5`` (DL). HK: Σ w_i (y_i −
    0.011667)² / 2 = 1.00 (with equal v_i, DL's tau² makes it exactly 1), so ``SE² = 1/Σw = (v + tau²)/3``,
    SE = 0.00406, and the interval is 0.011667 ± t(2)·0.00406 = ± 0.0175 (DL's z interval: ± 0.0080).

    >>> p = pooled_estimate([[0.010, 0.012, 0.011], [0.004, 0.006, 0.005], [0.020, 0.018, 0.019]])
    >>> round(p.estimate, 6), round(p.tau2, 7), round(p.lo, 4), round(p.hi, 4), p.n_cells, p.method
    (0.011667, 4.9e-05, -0.0058, 0.0291, 3, 'hartung-knapp')
    >>> pooled_estimate([[0.5, 0.5], [0.7, 0.7], [0.2]]).method
    'mean of cell means'
    >>> pooled_estimate([[0.5]]).n_cells
    0
    """
    stats = [mean_std(c) for c in cells]
    used = [(m, s * s / n) for m, s, n in stats if n >= 2]
    k = len(used)
    if k == 0:
        nan = float("nan")
        return Pooled(nan, nan, nan, 0, nan, "no cell with 2 seeds")
    ys = [y for y, _ in used]
    positive = [v for _, v in used if v > 0]
    if not positive:
        m, lo, hi, _ = t_interval(ys)
        return Pooled(m, lo, hi, k, 0.0, "mean of cell means")
    # weights are taken relative to the smallest variance so that 1/v cannot overflow for tiny variances
    vmin = min(positive)
    vs = [max(v, vmin) for _, v in used]
    r = [vmin / v for v in vs]
    sr = math.fsum(r)
    mu_fe = math.fsum(ri * y for ri, y in zip(r, ys, strict=True)) / sr
    q_scaled = math.fsum(ri * (y - mu_fe) ** 2 for ri, y in zip(r, ys, strict=True))  # Q · vmin
    c_scaled = sr - math.fsum(ri * ri for ri in r) / sr  # C · vmin
    tau2 = max(0.0, (q_scaled - (k - 1) * vmin) / c_scaled) if c_scaled > 0 else 0.0
    base = vmin + tau2
    rw = [base / (v + tau2) for v in vs]  # w_i · base
    srw = math.fsum(rw)
    est = math.fsum(w * y for w, y in zip(rw, ys, strict=True)) / srw
    if k < 2:
        return Pooled(est, float("nan"), float("nan"), k, tau2, "hartung-knapp")
    scatter = math.fsum(w * (y - est) ** 2 for w, y in zip(rw, ys, strict=True)) / base / (k - 1)
    se = math.sqrt(max(1.0, scatter) * base / srw)
    half = t95(k - 1) * se
    return Pooled(est, est - half, est + half, k, tau2, "hartung-knapp")
