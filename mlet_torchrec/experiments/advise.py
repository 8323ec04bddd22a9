"""``mlet advise``: does MLET help on a user's own sweep? The family reports' verdict, for any results store.

Every MLET method of the store (model, epochs, d, k, sigma) is one **cell** against its single-layer baseline
at the tuned learning rates (:func:`.family_tables.cells`, whatever the config, model or optimizer); its mark says
whether a gain survives tuning both methods' learning rates alike and the number of cells tested (Benjamini-Hochberg
q < 0.05, as in the family reports). The cells are pooled (:func:`.family_tables.pool`: cells sharing a baseline
clustered, Hartung-Knapp interval) and summed up in a few plain lines, with what to run next when the store cannot
answer: fewer than 2 seeds, or a baseline (or MLET) run at one embedding learning rate only.

Example:
    >>> recs = [_example(k, s, auc) for s in range(3) for k, auc in ((None, 0.70), (16, 0.72 + s / 1000))]
    >>> a = advise(recs, "runs/sweep.jsonl")
    >>> a.verdict[0]
    'MLET beats the baseline (one learning rate) in 1 of 1 cells (dlrm d=4 k=16 σ=0.5).'
    >>> a.advice[1][:68]
    'The baseline ran at one embedding learning rate (0.2), so did MLET: '
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlet_torchrec.errors import InputNotFound, UserError
from mlet_torchrec.experiments.families import EXTEND
from mlet_torchrec.experiments.family_data import Family, edge_choices, replicated
from mlet_torchrec.experiments.family_tables import LOSS, LR, PENDING, TIE, WIN, Cell, Records, _num, cells, pool
from mlet_torchrec.experiments.grid import K_PER_D
from mlet_torchrec.experiments.markdown import _table
from mlet_torchrec.experiments.records import MethodKey, finished, method_of
from mlet_torchrec.experiments.stats import Pooled, fmt_interval, fmt_p
from mlet_torchrec.experiments.store import load_results

EVERY_METHOD = Family(name="advise", title="every method of the store", setup="", epochs=())
"""Empty tuples mean "any": every model, d, k/d and epoch count of the store belongs to it."""
ADVISED_SEEDS = 5  # the families' seed count: 3 seeds leave the paired tests little power


@dataclass(frozen=True)
class Advice:
    """What ``mlet advise`` prints: the cells, their pooled estimate, the verdict lines and what to run next."""

    store: str
    cells: list[Cell]
    pooled: Pooled
    verdict: list[str]
    advice: list[str] = field(default_factory=list)  # empty: the store can answer the question
    command: str | None = None  # the `mlet sweep` line that fills the gaps of ``advice``
    baseline_tuned: bool = True  # False: the baseline ran at one embedding learning rate, so it was not tuned


def load_store(path: Path | str) -> tuple[Records, Path]:
    """The store's records and its path (a directory stands for its ``results.jsonl``); a missing or empty
    store, or one without a finished single-layer run, is a ``UserError`` naming it (exit 2, one line)."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.jsonl"
    if not path.is_file():
        raise InputNotFound(f"--input {path} does not exist (expected a results store written by `mlet sweep`)")
    records = load_results(path)
    if not records:
        raise UserError(f"{path}: no runs in this results store")
    done = finished(records)
    if not any(not method_of(r).is_mlet for r in done):
        raise UserError(
            f"{path}: no finished single-layer run (k null) to compare MLET with; "
            'add k=none to the sweep\'s --grid, e.g. "k=[none,64]"'
        )
    if not any(method_of(r).is_mlet for r in done):
        raise UserError(
            f'{path}: no finished MLET run (k set); add MLET cells to the sweep\'s --grid, e.g. "k=[none,64]"'
        )
    return records, path


def cell_label(m: MethodKey, with_epochs: bool = False) -> str:
    """A cell in a verdict line (the epoch count only when the store trains several).

    >>> cell_label(MethodKey("dlrm", 3, 8, 32, 0.25), with_epochs=True)
    'dlrm 3 ep d=8 k=32 σ=0.25'
    """
    return " ".join([m.model, *([f"{m.epochs} ep"] if with_epochs else []), f"d={m.d}", f"k={m.k}", f"σ={m.sigma:g}"])


def verdict_lines(cs: Sequence[Cell], pooled: Pooled, tuned: bool = True) -> list[str]:
    """2-4 plain lines: wins, lr-explained gains, losses, ties and pending cells; the pooled estimate (2 or more
    baselines: one has nothing to pool); a reading. ``tuned``: the baseline ran at 2 or more embedding lrs."""
    many_epochs = len({c.method.epochs for c in cs}) > 1
    base = "the tuned baseline" if tuned else "the baseline (one learning rate)"

    def named(mark: str) -> list[str]:
        return [cell_label(c.method, many_epochs) for c in cs if c.mark == mark]

    def cells_(names: list[str], listed: bool = True) -> str:  # "1 cell (a)", "2 cells (a, b)"
        return f"{len(names)} cell{'s' * (len(names) != 1)}" + (f" ({', '.join(names)})" if listed else "")

    win, lr, loss, tie, pending = (named(m) for m in (WIN, LR, LOSS, TIE, PENDING))
    n = len(cs)
    first = f"MLET beats {base} in {len(win)} of {n} cells" + (f" ({', '.join(win)})" if win else "")
    rest = []
    if lr:
        rest.append(f"in {cells_(lr)} tuning the baseline's learning rate does the same")
    if loss:
        rest.append(f"it loses in {cells_(loss)}")
    if tie:
        rest.append(f"no difference in {cells_(tie, listed=False)}")
    if pending:
        rest.append(f"{cells_(pending)} with fewer than 2 seeds: no test")
    lines = [first + ("; " + "; ".join(rest) if rest else "") + "."]
    if pooled.n_cells >= 2:
        lines.append(
            f"Pooled over {pooled.n_cells} baseline cluster(s), MLET minus {base} is "
            f"{fmt_interval(pooled.estimate, pooled.lo, pooled.hi)} test AUC (95% interval, {pooled.method})."
        )
    if win and not tuned:
        lines.append("Reading: MLET is ahead of a baseline at one learning rate; tune both (below) before trusting it.")
    elif win and not loss:
        lines.append(
            "Reading: MLET helps here in the cells named above; the others gain nothing over a tuned baseline."
        )
    elif win:
        lines.append("Reading: mixed; MLET helps in some cells and hurts in others: pick d and k from the cells above.")
    elif loss:
        lines.append("Reading: MLET does not beat a tuned baseline here and loses in some cells: keep the baseline.")
    elif n > len(pending) and tuned:
        lines.append("Reading: MLET does not beat a baseline whose learning rate is tuned: tune that instead.")
    elif n > len(pending):
        lines.append("Reading: no gain over a baseline at one learning rate; tune both (below) before concluding.")
    return lines


def _lrs(records: Records, mlet: bool, key: str) -> list[float]:
    return sorted({float(r[key]) for r in finished(records) if method_of(r).is_mlet == mlet and r.get(key) is not None})


def _grid_of(values: Sequence[float]) -> str:
    """A tuning grid of at least 3 values: the values the store tried when there are 3 or more, two values and
    one step below them, or 1/4x .. 16x a single value.

    >>> _grid_of([0.2]), _grid_of([0.1, 1.0]), _grid_of([1, 2, 4])
    ('[0.05,0.2,0.8,3.2]', '[0.01,0.1,1]', '[1,2,4]')
    """
    vals = list(values)
    if len(vals) == 1:
        vals = [vals[0] * 4.0**i for i in (-1, 0, 1, 2)]
    elif len(vals) == 2:
        vals = [vals[0] * vals[0] / vals[1], *vals]
    return "[" + ",".join(f"{v:.6g}" for v in vals) + "]" if vals else "[...]"


def _axis(values: Sequence[Any]) -> str:
    return "[" + ",".join("none" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in values) + "]"


def sweep_command(records: Records, store: str) -> str:
    """The ``mlet sweep`` line that reruns the store's grid with 5 seeds and both learning rates tuned on every
    seed (each seed chooses on its own validation AUC: a replicated choice), grids of 3+ values that extend past
    an end while a choice sits there (``--extend-grid``); the store's config and grid when its records carry
    them. Runs the store already holds are not run again."""
    rec = next((r for r in records if r.get("grid")), records[0])
    config = rec.get("base_config") or "CONFIG"
    overrides = "".join(f" {o}" for o in rec.get("base_overrides") or [])
    skip = {"train.seed", "sparse_optimizer.lr", "dense_optimizer.lr"}  # seeds below; lrs go to --tune
    axes = [f"{'kd' if k == K_PER_D else k}={_axis(v)}" for k, v in (rec.get("grid") or {}).items() if k not in skip]
    axes.append(f"seed={_axis(list(range(ADVISED_SEEDS)))}")
    sparse = _grid_of(sorted(set(_lrs(records, False, "sparse_lr")) | set(_lrs(records, True, "sparse_lr"))))
    dense = _grid_of(sorted(set(_lrs(records, False, "dense_lr")) | set(_lrs(records, True, "dense_lr"))))
    return (
        f'mlet sweep --config {config}{overrides} --grid "{" ".join(axes)}" '
        f'--tune "lr={sparse} dense_lr={dense}" --extend-grid {EXTEND} --output {store}'
    )


def advice_lines(records: Records, cs: Sequence[Cell]) -> list[str]:
    """What the store lacks to answer the question, one line each (empty when nothing)."""
    out = []
    seeds = max((c.test.n for c in cs), default=0)
    if seeds < 2:
        out.append(
            f"Fewer than 2 seeds per cell: no paired test is possible. Run {ADVISED_SEEDS} seeds "
            f"(seed={_axis(list(range(ADVISED_SEEDS)))} in --grid)."
        )
    elif seeds < ADVISED_SEEDS:
        out.append(
            f"{seeds} seeds per cell: the paired tests have little power; {ADVISED_SEEDS} seeds "
            f"(seed={_axis(list(range(ADVISED_SEEDS)))} in --grid) detect smaller differences."
        )
    base, mlet = _lrs(records, False, "sparse_lr"), _lrs(records, True, "sparse_lr")
    if len(base) < 2:
        also = ", so did MLET" if len(mlet) < 2 else ""
        one = f" ({base[0]:g})" if base else ""
        out.append(
            f"The baseline ran at one embedding learning rate{one}{also}: a gain may be only the larger step "
            'MLET takes (k·σ²·lr, paper 001 Theorem 1). Tune both over the same grid: --tune "lr=[...]".'
        )
    elif len(mlet) < 2:
        out.append(
            "MLET ran at one embedding learning rate while the baseline was tuned: tune both over the same grid "
            '(--tune "lr=[...]") before reading a loss as MLET\'s.'
        )
    dense = sorted(set(_lrs(records, False, "dense_lr")) | set(_lrs(records, True, "dense_lr")))
    if len(dense) < 3:
        had = f" ({', '.join(f'{v:g}' for v in dense)})" if dense else ""
        out.append(
            f"The dense (and W2) learning rate ran at {len(dense)} value(s){had}: every choice sits at an edge; "
            "give dense_lr=[...] 3 or more values in --tune."
        )
    own, pairs = replicated(records)
    if own < pairs:
        out.append(
            f"{pairs - own} of {pairs} (method, seed) pairs took another seed's learning rates (--tune-seeds): "
            "run the grid on every seed so each chooses on its own validation AUC (a replicated choice)."
        )
    for lr, what in (("sparse_lr", "embedding"), ("dense_lr", "dense")):
        edges = edge_choices(records, lr)
        if edges:
            names = ", ".join(
                f"{m.model} {m.epochs} ep d={m.d} {m.label()} ({why})" for m, why in sorted(edges.items())
            )
            out.append(
                f"The {what} lr chosen is at an end of the grid for {names}: its optimum may lie outside; "
                f"--extend-grid {EXTEND} grows the grid past that end while the choice sits there."
            )
    return out


def advise(records: Records, store: str) -> Advice:
    """The verdict of ``records`` (a loaded store): cells, pooled estimate, plain lines, advice and command."""
    cs = cells(EVERY_METHOD, records)
    pooled = pool(cs)
    advice = advice_lines(records, cs)
    command = sweep_command(records, store) if advice else None
    tuned = len(_lrs(records, False, "sparse_lr")) >= 2
    return Advice(store, cs, pooled, verdict_lines(cs, pooled, tuned), advice, command, tuned)


def format_text(a: Advice) -> str:
    """The table of cells (Markdown), then the verdict, then what to run next."""
    rows = [
        [
            c.method.model,
            str(c.method.epochs),
            str(c.method.d),
            str(c.method.k),
            f"{c.method.sigma:g}",
            _num(c.base[0]),
            _num(c.mlet[0]),
            fmt_interval(c.test.mean, c.test.lo, c.test.hi),
            fmt_p(c.test.p),
            fmt_p(c.q),
            str(c.test.n),
            c.mark,
        ]
        for c in a.cells
    ]
    head = ["model", "epochs", "d", "k", "σ", "baseline AUC", "MLET AUC", "Δ [95%]", "p", "q (BH)", "seeds", "mark"]
    baseline = "the tuned single-layer baseline" if a.baseline_tuned else "the single-layer baseline, not tuned"
    lines = [f"{a.store}: {len(a.cells)} MLET cells against {baseline} (test AUC)", ""]
    lines += _table(head, rows) + [""]
    lines += a.verdict
    if a.advice:
        lines += ["", "To answer this better:"] + [f"- {x}" for x in a.advice]
        lines += ["", a.command or ""]
    return "\n".join(lines).rstrip() + "\n"


def _f(x: float) -> float | None:
    return None if math.isnan(x) or math.isinf(x) else x  # JSON has no nan/inf


def as_json(a: Advice) -> str:
    """The same as :func:`format_text`, as one JSON object (nan -> null)."""
    cells_out = [
        {
            "model": c.method.model,
            "epochs": c.method.epochs,
            "d": c.method.d,
            "k": c.method.k,
            "sigma": c.method.sigma,
            "baseline_auc": _f(c.base[0]),
            "mlet_auc": _f(c.mlet[0]),
            "diff": _f(c.test.mean),
            "diff_lo": _f(c.test.lo),
            "diff_hi": _f(c.test.hi),
            "t": _f(c.test.t),
            "p": _f(c.test.p),
            "q": _f(c.q),
            "seeds": c.test.n,
            "mark": c.mark,
            "paper_lr_diff": _f(c.paper_diff),
        }
        for c in a.cells
    ]
    p = a.pooled
    pooled = {"estimate": _f(p.estimate), "lo": _f(p.lo), "hi": _f(p.hi), "n_cells": p.n_cells, "method": p.method}
    out = {"store": a.store, "cells": cells_out, "pooled": pooled, "verdict": a.verdict, "advice": a.advice}
    return json.dumps({**out, "command": a.command}, indent=2, ensure_ascii=False)


def _example(k: int | None, seed: int, auc: float) -> dict[str, Any]:
    return {
        "key": f"{k}-{seed}",
        "status": "ok",
        "role": "grid",
        "d": 4,
        "k": k,
        "seed": seed,
        "sparse_lr": 0.2,
        "dense_lr": 0.2,
        "config": {"model": {"name": "dlrm"}, "train": {"epochs": 1}, "embedding": {"sigma": 0.5}},
        "valid": {"auc": auc},
        "test": {"auc": auc},
    }
