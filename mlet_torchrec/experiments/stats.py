"""Seed statistics of the report: mean ± sample std over seeds, and the paired t-test verdict.

Example:
    >>> fmt([0.71, 0.73])
    '0.7200 ± 0.0141'
    >>> verdict([0.01, 0.012, 0.011])
    'MLET better (t=+19.1, p<0.05)'
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

# two-sided 95% critical values of Student's t by degrees of freedom
_T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t95(df: int) -> float:
    if df <= 0:
        return float("inf")
    keys = sorted(_T95)
    for k in keys:
        if df <= k:
            return _T95[k]
    return 1.96


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
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


def _get(rec: dict[str, Any], path: str) -> float | None:
    node: Any = rec
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return None if node is None else float(node)


def verdict(diffs: Sequence[float], higher_is_better: bool = True) -> str:
    m, s, n = mean_std(diffs)
    if n < 2 or math.isnan(s):
        return "n<2: no test"
    if s == 0:
        return "identical" if m == 0 else ("MLET better" if (m > 0) == higher_is_better else "MLET worse")
    t = m / (s / math.sqrt(n))
    if abs(t) < t95(n - 1):
        return f"within noise (t={t:+.1f})"
    return f"MLET {'better' if (t > 0) == higher_is_better else 'worse'} (t={t:+.1f}, p<0.05)"
