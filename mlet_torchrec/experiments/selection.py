"""Which run stands for a row of the single-sweep report (``mlet report``): its picks, always on validation.

A :class:`Pick` is a selection rule, not a method (what was trained is :class:`.records.MethodKey`): the baseline
at the paper's (config's) learning rate, the tuned baseline (best validation AUC over the tuning grid), MLET at
each k, MLET with its lr tuned, or MLET's best k; :class:`Results` indexes one data set's runs (store lines,
:mod:`.records`) by (variant, d, seed) and applies each pick.

Example:
    >>> res = Results([{"d": 4, "k": None, "seed": 0, "sparse_lr": 0.1, "role": "grid", "test": {"auc": 0.7}}])
    >>> [m.kind for m in res.picks()]
    ['paper']
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlet_torchrec.experiments.stats import _get


@dataclass
class Pick:
    """A row of the single-sweep report: its label and the rule that picks its run in each (variant, d, seed)."""

    name: str
    kind: str  # 'paper', 'tuned' (baseline); 'mlet' (config's lr), 'mlet_tuned' (lr tuned), 'mlet_best' (MLET)
    k: int | None = None


def _variant(rec: dict[str, Any]) -> str:
    """Grid values other than d, k, seed and the tuning axes (usually empty)."""
    tune = set(rec.get("tune") or {})
    skip = {"embedding.k", "embedding.d", "train.seed"} | tune
    return " ".join(f"{k}={json.dumps(v)}" for k, v in sorted((rec.get("overrides") or {}).items()) if k not in skip)


class Results:
    """Results of one data set, indexed by (variant, d, seed)."""

    def __init__(self, records: list[dict[str, Any]], diverged: Sequence[dict[str, Any]] = ()) -> None:
        self.records = records
        # every embedding lr tried, diverged runs included (a diverged top value still counts as tried)
        self.tried_lrs = sorted({r["sparse_lr"] for r in [*records, *diverged]})
        self.ds = sorted({r["d"] for r in records})
        self.ks = sorted({r["k"] for r in records if r["k"] is not None})
        self.seeds = sorted({r["seed"] for r in records})
        self.variants = sorted({_variant(r) for r in records})
        self.cells: dict[tuple[str, int, int], list[dict[str, Any]]] = defaultdict(list)
        for r in records:
            self.cells[(_variant(r), r["d"], r["seed"])].append(r)
        self.paper_lrs = sorted({r["sparse_lr"] for r in records if r["k"] is None and r.get("role") == "grid"})
        self.tune_lrs = sorted({r["sparse_lr"] for r in records if r["k"] is None})
        self.has_tuning = any(r.get("role") == "tune" and r["k"] is None for r in records)
        # `mlet sweep --tune`: MLET's learning rate tuned over the same grid as the baseline's
        self.mlet_tuned = any(r.get("role") == "tune" and r["k"] is not None for r in records)

    def picks(self) -> list[Pick]:
        lrs = "{" + ", ".join(map(_g, self.tune_lrs)) + "}"
        out = [Pick(f"baseline (paper lr {','.join(map(_g, self.paper_lrs))})", "paper")]
        if self.has_tuning:
            out.append(Pick(f"baseline (tuned lr ∈ {lrs})", "tuned"))
        paper_lr = f" (paper lr {','.join(map(_g, self.paper_lrs))})" if self.mlet_tuned else ""
        out += [Pick(f"MLET k={k}{paper_lr}", "mlet", k) for k in self.ks]
        if self.mlet_tuned:
            out += [Pick(f"MLET k={k} (tuned lr)", "mlet_tuned", k) for k in self.ks]
        if len(self.ks) > 1 or self.mlet_tuned:
            out.append(Pick("MLET best k, lr (valid)" if self.mlet_tuned else "MLET best k (valid)", "mlet_best"))
        return out

    def pick(self, method: Pick, variant: str, d: int, seed: int) -> dict[str, Any] | None:
        runs = self.cells.get((variant, d, seed), [])
        base = [r for r in runs if r["k"] is None]
        if method.kind == "paper":
            c = [r for r in base if r.get("role") == "grid"]
            return c[0] if c else None
        if method.kind == "tuned":
            return _best_valid(base)
        if method.kind == "mlet":
            c = [r for r in runs if r["k"] == method.k]
            grid = [r for r in c if r.get("role", "grid") == "grid"]
            chosen = grid or c
            return chosen[0] if chosen else None
        if method.kind == "mlet_tuned":
            return _best_valid([r for r in runs if r["k"] == method.k])
        if method.kind == "mlet_best":
            return _best_valid([r for r in runs if r["k"] is not None])
        raise ValueError(method.kind)

    def values(self, method: Pick, variant: str, d: int, path: str) -> list[float]:
        out = []
        for s in self.seeds:
            r = self.pick(method, variant, d, s)
            v = None if r is None else _get(r, path)
            if v is not None:
                out.append(v)
        return out

    def paired(self, a: Pick, b: Pick, variant: str, d: int, path: str) -> list[float]:
        """Per-seed differences a - b (seeds where both exist)."""
        out = []
        for s in self.seeds:
            ra, rb = self.pick(a, variant, d, s), self.pick(b, variant, d, s)
            if ra is None or rb is None:
                continue
            va, vb = _get(ra, path), _get(rb, path)
            if va is not None and vb is not None:
                out.append(va - vb)
        return out


def _g(x: float) -> str:
    return f"{x:g}"


def _best_valid(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [(v, r) for v, r in ((_get(r, "valid.auc"), r) for r in runs) if v is not None and not math.isnan(v)]
    if not scored:
        return runs[0] if runs else None
    return max(scored, key=lambda x: x[0])[1]
