"""Test-set uncertainty of the family cells: DeLong's paired test on the stored test predictions of the chosen runs.

For each MLET cell and replicate (split) whose two chosen runs (MLET's and its baseline's, :func:`.family_data.tuned`)
kept their test predictions (:mod:`.predictions`), DeLong's test of their AUC difference on those rows
(:func:`.delong.delong_paired`). One split's DeLong interval is the test-set uncertainty a single split carries;
the spread of Δ over splits is what a new split would show.

Example:
    >>> delong_rows([])
    []
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from mlet_torchrec.experiments.delong import PairedAUC, delong_paired
from mlet_torchrec.experiments.family_data import tuned
from mlet_torchrec.experiments.predictions import decode_predictions
from mlet_torchrec.experiments.records import MethodKey
from mlet_torchrec.experiments.stats import _signed, fmt_interval

HEAD = [
    "model",
    "d",
    "MLET",
    "splits with predictions",
    "DeLong Δ AUC [95%], first split",
    "p (DeLong)",
    "median test-set SE of Δ (DeLong)",
    "std of Δ over splits",
    "splits with DeLong p < 0.05",
]


def paired_aucs(records: list[dict[str, Any]]) -> dict[MethodKey, dict[int, PairedAUC]]:
    """Per MLET method, per replicate: DeLong's test of its chosen run against its baseline's chosen run, where
    both stored their test predictions (and scored the same rows)."""
    runs = tuned(records)
    out: dict[MethodKey, dict[int, PairedAUC]] = {}
    for (m, rep), r in sorted(runs.items()):
        base = runs.get((m.baseline(), rep))
        if not m.is_mlet or base is None or "test_predictions" not in r or "test_predictions" not in base:
            continue
        (a, y), (b, y_base) = decode_predictions(r["test_predictions"]), decode_predictions(base["test_predictions"])
        if len(y) != len(y_base) or (y != y_base).any():
            continue  # not the same rows: no paired test
        out.setdefault(m, {})[rep] = delong_paired(a, b, y)
    return out


def delong_rows(records: list[dict[str, Any]], include: Sequence[MethodKey] | None = None) -> list[list[str]]:
    """One table row (:data:`HEAD`) per MLET method with stored predictions (only those in ``include``)."""
    rows = []
    for m, per in paired_aucs(records).items():
        if include is not None and m not in include:
            continue
        first = per[min(per)]
        diffs = [t.diff for t in per.values()]
        spread = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        rows.append(
            [
                m.model,
                str(m.d),
                f"k={m.k} ({m.kd:g}d)",
                str(len(per)),
                fmt_interval(first.diff, first.lo, first.hi),
                f"{first.p:.3f}",
                f"{statistics.median(t.se for t in per.values()):.4f}",
                _signed(spread, 4).lstrip("+"),
                f"{sum(t.p < 0.05 for t in per.values())} of {len(per)}",
            ]
        )
    return rows
