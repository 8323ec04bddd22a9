"""Family (e) with power: does Theorem 1's mapping (baseline lr = k·σ²·η) fit better than wrong ones?

"Within one seed std" cannot tell a right mapping from a wrong one: near a flat optimum any mapping matches. Here
every mapping ``factor``·k·σ²·η (the theorem's factor is 1) is scored by the |Δ test AUC| between each seed-0 MLET
run and the baseline interpolated at the mapped lr (:func:`.family_tables.lr_points`); a wrong mapping is
**rejected** when its |Δ| is larger than the theorem's on the same points (paired over the points inside the
baseline's grid for both; one-sided Wilcoxon signed-rank test, p < 0.05). The scan over factors says which
mapping fits best.

Example:
    >>> FACTORS
    (0.0625, 0.25, 1.0, 4.0, 16.0)
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from scipy import stats as sps

from mlet_torchrec.experiments.family_data import Family
from mlet_torchrec.experiments.family_tables import LrPoint, lr_points
from mlet_torchrec.experiments.markdown import _table

FACTORS = (1 / 16, 1 / 4, 1.0, 4.0, 16.0)
"""The mappings compared: baseline lr = factor·k·σ²·η (1 is Theorem 1's)."""


def _key(p: LrPoint) -> tuple[Any, ...]:
    return (p.method, p.dense_lr, p.eta)


def mapping_errors(family: Family, records: list[dict[str, Any]], factor: float) -> dict[tuple[Any, ...], float]:
    """|Δ test AUC| per MLET point (method, dense lr, η) whose mapped lr is inside the baseline's grid."""
    return {_key(p): abs(p.diff) for p in lr_points(records, factor) if p.diff is not None and family.has(p.method)}


def reject_p(theorem: dict[tuple[Any, ...], float], other: dict[tuple[Any, ...], float]) -> tuple[float, int]:
    """One-sided Wilcoxon signed-rank p that ``other`` fits worse (larger |Δ|) than ``theorem`` on their common
    points, and how many points that is (p nan below 2 points or when every pair ties).

    >>> reject_p({1: 0.0, 2: 0.01, 3: 0.0, 4: 0.0, 5: 0.0, 6: 0.0}, {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.1, 5: 0.2, 6: 0.3})
    (0.015625, 6)
    """
    common = sorted(set(theorem) & set(other), key=repr)
    diffs = [other[k] - theorem[k] for k in common]
    if len(common) < 2 or all(d == 0 for d in diffs):
        return float("nan"), len(common)
    return float(sps.wilcoxon(diffs, alternative="greater").pvalue), len(common)


def mapping_section(family: Family, recs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The Markdown section: per data set, one row per mapping factor."""
    L = [
        "## Does the theorem's mapping fit better than wrong ones?",
        "",
        "The count of 'same' points above has no power: a wrong mapping can match as often. Each mapping "
        "factor·k·σ²·η is scored by |Δ test AUC| (MLET at η against the baseline interpolated at the mapped lr, "
        "seed 0, points inside the baseline's grid). A wrong mapping is **rejected** when its |Δ| exceeds the "
        "theorem's (factor 1) on the same points: one-sided Wilcoxon signed-rank test, p < 0.05.",
        "",
    ]
    for ds, rs in recs.items():
        errors = {f: mapping_errors(family, rs, f) for f in FACTORS}
        L += [f"### {ds}", ""]
        if not errors[1.0]:
            L += ["No point inside the baseline's grid yet.", ""]
            continue
        rows = []
        for f in FACTORS:
            e = list(errors[f].values())
            p, n = reject_p(errors[1.0], errors[f]) if f != 1.0 else (math.nan, len(e))
            verdict = "theorem" if f == 1.0 else ("rejected" if p < 0.05 else "not rejected")
            rows.append(
                [
                    f"{f:g}",
                    str(len(e)),
                    "–" if not e else f"{statistics.fmean(e):.4f}",
                    "–" if not e else f"{statistics.median(e):.4f}",
                    "–" if f == 1.0 else f"{n}",
                    "–" if math.isnan(p) else f"{p:.3g}",
                    verdict,
                ]
            )
        head = ["factor", "points inside grid", "mean abs Δ test", "median abs Δ test", "points paired with 1"]
        L += _table([*head, "p (fits worse than 1)", "mapping"], rows)
        best = min((f for f in FACTORS if errors[f]), key=lambda f: statistics.fmean(errors[f].values()))
        L += ["", f"Best-fitting factor (smallest mean abs Δ test): {best:g}.", ""]
    return L
