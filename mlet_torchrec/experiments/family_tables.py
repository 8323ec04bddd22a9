"""The numbers of the family reports: one paired cell per MLET method, its mark, the lr equivalence, the ranks.

A **cell** is one MLET method (model, epochs, d, k, sigma) against its single-layer baseline on one data set:
test AUC of both at their tuned learning rates (:func:`.family_data.tuned`), the per-seed paired differences,
their t-test (:func:`.stats.paired_test`), and the difference at the config's ("paper") learning rates on seed 0.
Its **mark** (:func:`mark`) says whether a gain survives tuning both methods' learning rates alike.

Example:
    >>> interp_log([(0.1, 0.70), (10.0, 0.72)], 1.0)
    0.71
    >>> interp_log([(0.1, 0.70), (10.0, 0.72)], 100.0) is None
    True
    >>> t = paired_test([0.001, -0.001, 0.0005])
    >>> mark(t, t.p, paper_diff=0.01, base_std=0.002)
    'lr explains the gain'
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import product
from typing import Any

from mlet_torchrec.experiments.families import FamilySweep
from mlet_torchrec.experiments.family_data import Family, auc_by_seed, tuned
from mlet_torchrec.experiments.grid import K_PER_D, parse_grid
from mlet_torchrec.experiments.markdown import _table
from mlet_torchrec.experiments.records import MethodKey, finished, method_of
from mlet_torchrec.experiments.stats import (
    _ALPHA,
    PairedTest,
    Pooled,
    _signed,
    bh_q,
    cluster_cells,
    mean_std,
    paired_test,
    pooled_estimate,
    t_interval,
)

EXPECTED_SEEDS = 5
WIN, LOSS, LR = "gain beyond lr tuning", "loses", "lr explains the gain"
TIE, PENDING = "no difference", "pending (n<2)"
SHORT = {WIN: "win", LOSS: "LOSS", LR: "lr", TIE: "tie", PENDING: "n<2"}  # the marks in the matrix tables

Records = list[dict[str, Any]]
Interval = tuple[float, float, float, int]  # mean, lo, hi, n (stats.t_interval)


def mark(test: PairedTest, q: float, paper_diff: float, base_std: float) -> str:
    """The cell's mark: significant tuned Δ first (Benjamini-Hochberg q < 0.05 over the report's cells, either
    way), then whether the config's learning rates alone made MLET look better (seed 0, by more than the
    baseline's seed std) -- a gain that tuning the learning rates removes."""
    if test.n < 2 or math.isnan(test.p):
        return PENDING
    if q < _ALPHA:
        return WIN if test.mean > 0 else LOSS
    if paper_diff > base_std:  # nan (a missing run or std) compares False: no claim without both
        return LR
    return TIE


@dataclass(frozen=True)
class Cell:
    method: MethodKey
    base: Interval  # test AUC of the tuned baseline over seeds
    mlet: Interval  # test AUC of tuned MLET over seeds
    test: PairedTest  # of the per-seed differences MLET − baseline
    diffs: tuple[float, ...]
    seeds: tuple[int, ...]  # the seed of each difference
    base_std: float  # seed std of the tuned baseline's test AUC
    paper_diff: float  # seed 0 at the paper lrs: MLET − baseline test AUC (nan when a run is missing)
    q: float  # Benjamini-Hochberg adjusted p over the cells judged together (:func:`judge`)
    mark: str


def judge(groups: Sequence[Sequence[Cell]]) -> list[list[Cell]]:
    """The cells with their q (Benjamini-Hochberg over every cell of every group: all cells of one report) and
    the mark that q gives; the groups keep their order.

    >>> t = paired_test([0.01, 0.012, 0.011])
    >>> c = Cell(MethodKey("m", 1, 4, 4, 0.5), (0.7, 0.7, 0.7, 3), (0.71, 0.7, 0.72, 3), t, (), (), 0.0, 0.0, 1.0, "")
    >>> [(round(x.q, 4), x.mark) for x in judge([[c], [c]])[1]]
    [(0.0027, 'gain beyond lr tuning')]
    """
    flat = [c for g in groups for c in g]
    qs = iter(bh_q([c.test.p for c in flat]))
    out: list[list[Cell]] = []
    for g in groups:
        out.append([])
        for c in g:
            q = next(qs)
            out[-1].append(replace(c, q=q, mark=mark(c.test, q, c.paper_diff, c.base_std)))
    return out


def pool(cs: Sequence[Cell]) -> Pooled:
    """The cells' pooled Δ: cells sharing a baseline (model, epochs, d) clustered into one (their seed-wise mean
    Δ, :func:`.stats.cluster_cells`), then random effects with a Hartung-Knapp interval over the clusters."""
    per_seed = [dict(zip(c.seeds, c.diffs, strict=True)) for c in cs]
    return pooled_estimate(cluster_cells(per_seed, [c.method.baseline() for c in cs]))


def _close(a: Any, b: float) -> bool:
    return a is not None and math.isclose(float(a), b, rel_tol=1e-9)


def paper_lrs(records: Records) -> tuple[float, float] | None:
    """The config's (sparse, dense) learning rates: those of the seed-0 runs with role ``grid`` (the sweep runs
    each grid cell at the config's values), else the store's base config."""
    pairs = sorted(
        {
            (float(r["sparse_lr"]), float(r["dense_lr"]))
            for r in records
            if r.get("role") == "grid"
            and r.get("seed") == 0
            and r.get("sparse_lr") is not None
            and r.get("dense_lr") is not None
        }
    )
    if pairs:
        return pairs[0]
    for r in records:
        if r.get("base_config"):
            try:
                from mlet_torchrec.config import load_config

                cfg = load_config(r["base_config"], list(r.get("base_overrides") or []))
                return float(cfg.sparse_optimizer.lr), float(cfg.dense_optimizer.lr)
            except Exception:  # noqa: BLE001 -- a moved config file leaves the paper lrs unknown, not an error
                return None
    return None


def _at(runs: Records, m: MethodKey, seed: int, lrs: tuple[float, float] | None) -> dict[str, Any] | None:
    if lrs is None:
        return None
    for r in runs:
        if (
            int(r["seed"]) == seed
            and _close(r.get("sparse_lr"), lrs[0])
            and _close(r.get("dense_lr"), lrs[1])
            and method_of(r) == m
        ):
            return r
    return None


def cells(family: Family, records: Records, expected: Sequence[MethodKey] = ()) -> list[Cell]:
    """Every MLET method of ``family`` in ``records`` (and those ``expected`` but not run yet), sorted, judged
    together (:func:`judge`; a report of several stores judges all their cells again, jointly)."""
    runs = {key: r for key, r in tuned(records).items() if family.has(key[0])}
    done = finished(records)
    lrs = paper_lrs(records)
    methods = sorted({m for m, _ in runs if m.is_mlet} | {m for m in expected if m.is_mlet and family.has(m)})
    out = []
    for m in methods:
        base, mine = auc_by_seed(runs, m.baseline()), auc_by_seed(runs, m)
        seeds = tuple(s for s in sorted(mine) if s in base)
        diffs = tuple(mine[s] - base[s] for s in seeds)
        t = paired_test(diffs)
        std = mean_std(list(base.values()))[1]
        rm, rb = _at(done, m, 0, lrs), _at(done, m.baseline(), 0, lrs)
        pd = float(rm["test"]["auc"]) - float(rb["test"]["auc"]) if rm and rb else float("nan")
        ivs = t_interval(list(base.values())), t_interval(list(mine.values()))
        out.append(Cell(m, *ivs, t, diffs, seeds, std, pd, float("nan"), PENDING))
    return judge([out])[0]


def expected_methods(sweeps: Sequence[FamilySweep], setup: str, dataset: str) -> list[MethodKey]:
    """The methods the sweeps of (setup, dataset) will run, from their grids (and base configs for the axes the
    grid leaves fixed); a base config that cannot be read contributes nothing."""
    out: set[MethodKey] = set()
    for s in sweeps:
        if s.setup != setup or s.dataset != dataset:
            continue
        g = parse_grid(s.grid)
        try:
            from mlet_torchrec.config import load_config

            cfg = load_config(s.config, list(s.overrides))
        except Exception:  # noqa: BLE001 -- see the docstring
            continue
        models = g.get("model.name", [cfg.model.name])
        epochs = g.get("train.epochs", [cfg.train.epochs])
        sigmas = g.get("embedding.sigma", [cfg.embedding.sigma])
        for model, ep, d, sigma in product(models, epochs, g.get("embedding.d", [cfg.embedding.d]), sigmas):
            ks = [None if kd is None else round(d * kd) for kd in g.get(K_PER_D, [])] + g.get("embedding.k", [])
            for k in ks or [cfg.embedding.k]:
                if k is not None:
                    out.add(MethodKey(str(model), int(ep), int(d), int(k), float(sigma)))
    return sorted(out)


def interp_log(points: Sequence[tuple[float, float]], lr: float) -> float | None:
    """The value at ``lr``, linear in log(lr) between the two nearest grid points; None outside the grid.

    >>> interp_log([(1.0, 0.5)], 1.0), interp_log([(1.0, 0.5), (4.0, 0.7)], 2.0)
    (0.5, 0.6)
    """
    pts = sorted(points)
    if not pts or lr <= 0:
        return None
    lo, hi = pts[0][0], pts[-1][0]
    if math.isclose(lr, lo, rel_tol=1e-9):
        return pts[0][1]
    if math.isclose(lr, hi, rel_tol=1e-9):
        return pts[-1][1]
    if lr < lo or lr > hi:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= lr <= x1:
            t = (math.log(lr) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return round(y0 + t * (y1 - y0), 12)  # rounded: the same stores give the same digits everywhere
    return None


@dataclass(frozen=True)
class LrPoint:
    """One seed-0 MLET run at (eta, dense lr) against the baseline interpolated at k·sigma²·eta."""

    method: MethodKey
    dense_lr: float
    eta: float
    mlet_valid: float
    mlet_test: float
    base_valid: float | None  # None: k·sigma²·eta outside the baseline's grid
    base_test: float | None

    @property
    def scale(self) -> float:
        return self.method.k * self.method.sigma**2

    @property
    def diff(self) -> float | None:
        return None if self.base_test is None else self.mlet_test - self.base_test


def lr_points(records: Records, factor: float = 1.0) -> list[LrPoint]:
    """Every finished seed-0 MLET run with its rescaled-lr baseline (same model, epochs, d and dense lr) at
    ``factor``·k·σ²·η (1: Theorem 1's mapping; others: wrong mappings, to show the comparison can reject them)."""
    runs = [r for r in finished(records) if int(r["seed"]) == 0]
    grid: dict[tuple[MethodKey, float], list[tuple[float, float, float]]] = defaultdict(list)
    for r in runs:
        if not method_of(r).is_mlet:
            grid[(method_of(r), float(r["dense_lr"]))].append(
                (float(r["sparse_lr"]), float(r["valid"]["auc"]), float(r["test"]["auc"]))
            )
    out = []
    for r in runs:
        m = method_of(r)
        if not m.is_mlet:
            continue
        eta, dense = float(r["sparse_lr"]), float(r["dense_lr"])
        pts = grid.get((m.baseline(), dense), [])
        target = factor * m.k * m.sigma**2 * eta
        bv = interp_log([(lr, v) for lr, v, _ in pts], target)
        bt = interp_log([(lr, t) for lr, _, t in pts], target)
        out.append(LrPoint(m, dense, eta, float(r["valid"]["auc"]), float(r["test"]["auc"]), bv, bt))
    return sorted(out, key=lambda p: (p.method, p.dense_lr, p.eta))


def chosen_lrs(records: Records) -> list[tuple[MethodKey, float, float]]:
    """(method, sparse lr, dense lr) each method chose on seed 0 (best validation AUC over its grid)."""
    return [(m, float(r["sparse_lr"]), float(r["dense_lr"])) for (m, s), r in tuned(records).items() if s == 0]


def effective_rank(rec: dict[str, Any]) -> float | None:
    """The count of singular values above 1% of the largest (``spectrum``) of the run's largest table (most
    rows; ties: the first by name): paper 003's measure, taken on the tables that hold almost every row.

    >>> effective_rank({"spectrum": {"a": {"above_1pct": 4, "rows": 9}, "b": {"above_1pct": 2, "rows": 900}}})
    2.0
    """
    tables = [t for _, t in sorted((rec.get("spectrum") or {}).items()) if isinstance(t, dict)]
    tables = [t for t in tables if t.get("above_1pct") is not None]
    if not tables:
        return None
    largest = max(tables, key=lambda t: int(t.get("rows") or 0))
    return float(largest["above_1pct"])


def rank_rows(family: Family, records: Records) -> list[tuple[MethodKey, float, float, int]]:
    """Per MLET method of the family: mean effective rank over its tuned runs (all seeds) of the collapsed
    table, the same for its baseline, and the number of MLET runs."""
    per: dict[MethodKey, list[float]] = defaultdict(list)
    for (m, _), r in tuned(records).items():
        er = effective_rank(r)
        if family.has(m) and er is not None:
            per[m].append(er)
    return [
        (m, statistics.fmean(v), statistics.fmean(per[m.baseline()]), len(v))
        for m, v in sorted(per.items())
        if m.is_mlet and per.get(m.baseline())
    ]


def rank_verdict(rows: Sequence[tuple[MethodKey, float, float, int]]) -> str:
    """Plain words: do the collapsed MLET tables have a lower effective rank than the baseline's (paper 003)?

    >>> m = MethodKey("deepfm", 1, 4, 16, 0.5)
    >>> rank_verdict([(m, 3.0, 4.0, 5)])
    '1 of 1 MLET methods have a lower mean count than their baseline, 0 equal, 0 higher: agrees with paper 003.'
    """
    if not rows:
        return "No spectra in these runs yet."
    lower = sum(round(a - b, 6) < 0 for _, a, b, _ in rows)
    higher = sum(round(a - b, 6) > 0 for _, a, b, _ in rows)
    equal = len(rows) - lower - higher
    if 2 * lower > len(rows):
        word = "agrees with paper 003"
    elif 2 * higher > len(rows):
        word = "contradicts paper 003 (it claims lower effective rank)"
    else:  # no majority either way: saying "agrees" would read a claim into ties
        word = "neither agrees nor disagrees with paper 003: this measure does not separate them"
    return (
        f"{lower} of {len(rows)} MLET methods have a lower mean count than their baseline, {equal} equal, "
        f"{higher} higher: {word}."
    )


def lr_same(family: Family, records: Records) -> list[tuple[LrPoint, bool | None]]:
    """The family's :func:`lr_points`, each with whether the rescaled-lr baseline does the same: |Δ test| below
    the seed std of the tuned baseline (None: outside the baseline's grid, or no seed std yet)."""
    std = {c.method.baseline(): c.base_std for c in cells(family, records)}
    out: list[tuple[LrPoint, bool | None]] = []
    for p in lr_points(records):
        if not family.has(p.method):
            continue
        s = std.get(p.method.baseline(), math.nan)
        out.append((p, None if p.diff is None or math.isnan(s) else abs(p.diff) < s))
    return out


def _num(x: float | None, digits: int = 4) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def _lr(x: float) -> str:
    return f"{x:.6g}"


def rank_section(family: Family, recs: dict[str, Records]) -> list[str]:
    L = ["## Effective rank of the collapsed tables (paper 003)", ""]
    L += [
        "Per method: the count of singular values above 1% of the largest (`spectrum.above_1pct`) of the largest "
        "table (most rows), averaged over the tuned runs of every seed; for MLET the collapsed table W = W1·W2. "
        "The count is at most d. Paper 003 (its Avazu d = 8, k = 64 example, the same measure on the two tables "
        "that hold 99.7% of the rows) claims MLET's tables have a **lower** effective rank.",
        "",
    ]
    for ds, rs in recs.items():
        rows = rank_rows(family, rs)
        L += [f"### {ds}", ""]
        if rows:
            L += _table(
                ["model", "epochs", "d", "MLET", "runs", "MLET count", "baseline count", "MLET − baseline"],
                [
                    [m.model, str(m.epochs), str(m.d), m.label(), str(n), f"{a:.2f}", f"{b:.2f}", _signed(a - b, 2)]
                    for m, a, b, n in rows
                ],
            ) + [""]
        L += [rank_verdict(rows), ""]
    return L


def lr_section(family: Family, recs: dict[str, Records]) -> list[str]:
    L = ["## MLET at lr η against the baseline at k·σ²·η (Theorem 1)", ""]
    L += [
        "Paper 001, Theorem 1: with W2 of scale σ, W2ᵀW2 ≈ kσ²·I, so an MLET step at embedding lr η moves the "
        "collapsed table like a single-layer step at k·σ²·η. Every finished seed-0 MLET run (every η and dense "
        "lr of its grid) against the seed-0 baseline at the same dense lr, its validation and test AUC "
        "interpolated linearly in log(lr) over the baseline's grid of finished runs (no extrapolation: *outside "
        "grid*; diverged runs are not points). 'same': |Δ test| < the seed std of the tuned baseline.",
        "",
    ]
    for ds, rs in recs.items():
        pts = lr_same(family, rs)
        L += [f"### {ds}", ""]
        if not pts:
            L += ["No finished seed-0 MLET runs yet.", ""]
            continue
        L += [lr_summary(pts), ""]
        chosen = [c for c in chosen_lrs(rs) if family.has(c[0])]
        base_lr = {m: lr for m, lr, _ in chosen if not m.is_mlet}
        rows = []
        for m, lr, dense in chosen:
            b = base_lr.get(m.baseline())
            scaled = m.k * m.sigma**2 * lr if m.is_mlet else None
            ratio = "–" if scaled is None or not b else f"{scaled / b:.3g}"
            rows.append(
                [
                    m.label(),
                    _lr(lr),
                    _lr(dense),
                    "–" if scaled is None else _lr(scaled),
                    "–" if b is None else _lr(b),
                    ratio,
                ]
            )
        L += ["Learning rates chosen on seed 0 (best validation AUC):", ""]
        L += _table(["method", "lr", "dense lr", "k·σ²·lr", "baseline lr", "k·σ²·lr / baseline lr"], rows) + [""]
        rows = [
            [
                f"{p.method.sigma:g}",
                f"{p.scale:.4g}",
                _lr(p.dense_lr),
                _lr(p.eta),
                f"{p.scale * p.eta:.4g}",
                f"{p.mlet_test:.4f}",
                "outside grid" if p.base_test is None else f"{p.base_test:.4f}",
                "–" if p.diff is None else _signed(p.diff, 4),
                "–" if p.base_valid is None else _signed(p.mlet_valid - p.base_valid, 4),
                {True: "same", False: "differs", None: "–"}[same],
            ]
            for p, same in pts
        ]
        head = ["σ", "k·σ²", "dense lr", "η", "k·σ²·η", "MLET test AUC", "baseline test AUC at k·σ²·η"]
        L += _table([*head, "Δ test", "Δ valid", "same?"], rows) + [""]
    return L


def lr_counts(pts: Sequence[tuple[LrPoint, bool | None]]) -> tuple[int, int, int, int]:
    """(same, inside the baseline's grid, outside it, inside without a seed std yet) of :func:`lr_same`."""
    inside = [s for p, s in pts if p.diff is not None]
    return sum(s is True for s in inside), len(inside), len(pts) - len(inside), sum(s is None for s in inside)


def lr_summary(pts: Sequence[tuple[LrPoint, bool | None]]) -> str:
    same, inside, outside, undecided = lr_counts(pts)
    return (
        f"**{same} of {inside}** (σ, η, dense lr) points inside the baseline's grid: the rescaled-lr baseline does "
        f"the same (|Δ| < seed std); {outside} point(s) outside the grid"
        + (f"; {undecided} without a seed std yet." if undecided else ".")
    )
