"""``mlet sweep``: run a grid of training runs into a resumable results store (one JSON line per run).

    mlet sweep --config FILE --grid "embedding.d=[4,8,16] embedding.k=[none,64,128] seed=[0,1,2]" \\
        --tune-baseline "sparse_optimizer.lr=[0.2,0.8]" --output docs/results/x/results.jsonl

* **Grid**: space-separated ``key=[v1,v2,...]`` axes; each list is read as YAML (``none``/``null`` -> None);
  keys are the dotted overrides of ``mlet train``; ``seed`` means ``train.seed``. Every combination is a cell.
* **Fair baseline** (``--tune-baseline``): each cell with ``embedding.k`` null is also run with every value of
  the tuning axes (the baseline's learning-rate grid); the report picks, per (d, seed), the run with the best
  **validation** AUC (never test). Budget: MLET gets one run per k value for each (d, seed), the tuned baseline
  one run per tuning value; the sweep warns when the two counts differ (give the lr grid as many values as
  the grid has non-null k values).
* **Every method tuned** (``--tune``, instead of ``--tune-baseline``): the tuning axes run for every cell, MLET
  too, so the baseline and MLET at each k get the same learning-rate grid (equal budgets per k); the report then
  compares like with like (paper lr against paper lr, tuned against tuned). Use it when the config's learning
  rate may be far from either method's best (docs/results: 60-1000x the paper's SGD lr of 0.2 in these short runs).
* **Divergence is a result**: a run the NaN guard stops (``TrainingDiverged``: this learning rate is too large)
  is stored with ``status: diverged`` and no metrics, so a rerun skips it and the report counts it as never chosen.
* **Store**: every finished run appends one line (written, flushed and fsynced in a single ``write``) holding
  its resolved config, metrics and measurements; its key is a hash of the resolved config without ``run``
  and logging keys. A rerun skips keys already in the store, so a killed sweep resumes where it stopped.
* Each run goes in a fresh child process (``python -m mlet_torchrec.experiments.sweep --cell``) that trains (on
  ``--nproc`` ranks via ``train_local``, or in-process for 1), then, in that same process and single-process,
  loads the checkpoint and measures what the report needs (see ``analyse_run``).

Measurements in a result line:
* ``valid``/``test``: AUC, LogLoss, PR-AUC of the trained model (rank 0's summary of ``train``).
* ``freq``: test rows ranked by the train-split frequency of their ids. A row's frequency is the **minimum**
  over the frequency features (default: every sparse feature; ``--freq-features`` picks some, e.g. the item
  for MovieLens) of the train count of its id (multi-hot: min over the bag; empty bags are skipped; ids
  unseen in train, and the converters' OOV id (values rarer than ``--min-count``), count 0).
  ``top10``/``bottom10``: AUC/PR-AUC/positive rate on the 10% of test rows with the highest/lowest frequency
  (ties broken by row order of the test split).
* ``peak_rss_mb``: max resident set size of the training process(es): with ``nproc > 1`` the
  ``RUSAGE_CHILDREN`` max RSS of the cell process (= the largest of its training workers, read right after
  ``train_local`` returns); with ``nproc == 1`` the cell process's own ``RUSAGE_SELF`` max RSS read right after
  training, before the analysis.
* ``seconds_per_iter``: ``train_seconds / steps`` (training loop only, no startup or final eval).
* ``spectrum``: per table, the singular values of the collapsed W = W1 @ W2 (W1 for the baseline) and the
  count above 1% of the largest.
* ``compression``: test AUC/LogLoss and relative table size (paper A.4.4) of the collapsed model in FP32, INT8
  (max-abs and grid scale) and, for single-layer runs, rank d/4 and d/2 SVD, from
  ``mlet_torchrec.experiments.compression.compression_study`` (``--no-compression`` skips it).
  Hashing needs its own training runs on a hashed data set, so it is not measured per cell.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlet_torchrec.experiments.analysis import analyse_run
from mlet_torchrec.experiments.cell import _cell_main, run_cell_here
from mlet_torchrec.experiments.cell_pool import CellPool, CellPoolBroken
from mlet_torchrec.experiments.grid import (
    ALIASES,
    Cell,
    budget_note,
    cell_key,
    expand_grid,
    format_override,
    parse_grid,
    plan_cells,
)
from mlet_torchrec.experiments.store import STORE_VERSION, ResultsStore, load_results
from mlet_torchrec.io import atomic_write_text, check_location

log = logging.getLogger("mlet.sweep")


@dataclass
class SweepSettings:
    config: str | None
    grid: dict[str, list[Any]]
    tune: dict[str, list[Any]] = field(default_factory=dict)
    tune_mlet: bool = False  # run the tuning axes for the MLET cells too (every method tuned alike)
    results: str = "results.jsonl"
    base_overrides: list[str] = field(default_factory=list)
    nproc: int = 1
    parallel: int = 1
    runs_dir: str | None = None
    freq_features: list[str] | None = None
    keep_runs: bool = False
    dataset: str | None = None
    dry_run: bool = False
    in_process: bool = False
    compression: bool = True
    cell_timeout: float | None = None
    tune_seeds: list[int] | None = None  # tune on these seeds only; the others run at their choice (grid.plan_cells)
    extend: int = 0  # steps a tuning axis may grow past each end while a choice sits there (grid.extensions)


def _run_cell_subprocess(cell: Cell, s: SweepSettings, work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    spec = work / f"{cell.key}.spec.json"
    out = work / f"{cell.key}.out.json"
    logf = work / f"{cell.key}.log"
    out.unlink(missing_ok=True)
    atomic_write_text(
        spec,
        json.dumps(
            {
                "config": cell.config.model_dump(mode="json"),
                "nproc": s.nproc,
                "freq_features": s.freq_features,
                "output": str(out),
                "compression": s.compression,
            }
        ),
    )
    with open(logf, "w") as lf:
        proc = subprocess.run(
            [sys.executable, "-m", "mlet_torchrec.experiments.sweep", "--cell", str(spec)],
            stdout=lf,
            stderr=subprocess.STDOUT,
            timeout=s.cell_timeout,
        )
    if proc.returncode != 0 or not out.exists():
        tail = logf.read_text()[-2000:]
        raise RuntimeError(
            f"cell {cell.key} ({cell.label()}) failed with exit code {proc.returncode}; log {logf}:\n{tail}"
        )
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _data_hashing(data_path: str) -> dict[str, Any] | None:
    """The hashing a data set was made with (``mlet compression hash``);
    None if un-hashed."""
    from data_pipes.schema import DatasetMeta

    try:
        source = DatasetMeta.load(data_path).source
    except FileNotFoundError:  # only in tests that fake the training; a trained cell's data is there
        return None
    hashing = source.get("hashing")
    return hashing if isinstance(hashing, dict) else None


def run_sweep(s: SweepSettings, pool: CellPool | None = None) -> dict[str, int]:
    """Run every cell not yet in the store; returns counts {planned, skipped, ran, failed, pending}.

    With ``tune_seeds`` the sweep runs in passes: the tuning seeds' runs first, then the other seeds at the
    values those chose (planned from the store, so a resumed sweep picks up either pass). With ``pool`` the
    cells train in its worker processes (as many at once as it has workers; ``in_process`` settings)."""
    counts = {"planned": 0, "skipped": 0, "ran": 0, "failed": 0, "pending": 0}
    for _ in range(4 + 2 * s.extend):  # tune; extend the grids step by step; run the chosen values; plan nothing
        before = counts["ran"]
        cells, pending = _run_pass(s, counts, pool)
        counts["planned"], counts["pending"] = len(cells), pending
        # new tuning runs can change a choice even when nothing waited (a widened grid): plan again
        if s.dry_run or counts["ran"] == before or (s.tune_seeds is None and not s.extend):
            break
    done = "dry run, nothing ran" if s.dry_run else f"{counts['ran']} ran, {counts['failed']} failed"
    print(
        f"sweep: {counts['planned']} planned, {counts['skipped']} already in {s.results}, {done}"
        + (f", {counts['pending']} waiting for tuning runs" if counts["pending"] else ""),
        flush=True,
    )
    if counts["pending"]:
        log.warning("%d run(s) still wait for tuning runs that failed or are missing", counts["pending"])
    return counts


def _run_pass(s: SweepSettings, counts: dict[str, int], pool: CellPool | None) -> tuple[list[Cell], int]:
    store = ResultsStore(s.results)
    runs_dir = s.runs_dir or str(Path("runs/sweep") / Path(s.results).parent.name)
    check_location(runs_dir, [s.results])  # it holds the cells' run dirs: never /, ~, the cwd, or the store
    records = store.load()
    cells, pending = plan_cells(
        s.config, s.grid, s.tune, s.base_overrides, runs_dir, s.tune_mlet, s.tune_seeds, records, s.extend
    )
    done = {r["key"] for r in records if r.get("status") in ("ok", "diverged")}
    todo = [c for c in cells if c.key not in done]
    note = budget_note(s.grid, s.tune, s.tune_mlet, s.tune_seeds)
    ks = [k for k in s.grid.get("embedding.k", [None]) if k is not None]
    if s.tune and not s.tune_mlet and len(expand_grid(s.tune)) != len(ks):
        log.warning("budget not matched: %s", note)
    waiting = f", {pending} waiting for their tuning runs" if pending else ""
    print(
        f"sweep: {len(cells)} runs planned, {len(cells) - len(todo)} already in {s.results}, {len(todo)} to run"
        f"{waiting}; budget {note}",
        flush=True,
    )
    counts["skipped"] = len(cells) - len(todo)
    if s.dry_run:
        for c in todo:
            print(f"  {c.key} [{c.role}] {c.label()}")
        return cells, pending
    if s.in_process and pool is None and (s.nproc != 1 or s.parallel != 1):
        raise ValueError("--in-process needs --nproc-per-node 1 and --parallel 1")
    dataset = s.dataset or Path(cells[0].config.data.path).name if cells else s.dataset
    runner = _CellRunner(s, store, note, dataset, Path(runs_dir) / "_cells", counts, len(todo), pool)
    workers = pool.workers if pool is not None else s.parallel
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            list(ex.map(runner.run, range(len(todo)), todo))
    else:
        for i, cell in enumerate(todo):
            runner.run(i, cell)
    return cells, pending


@dataclass
class _CellRunner:
    """Runs one pass's cells (each call of :meth:`run` from any thread) and appends each one's line."""

    s: SweepSettings
    store: ResultsStore
    note: str
    dataset: str | None
    work: Path
    counts: dict[str, int]
    total: int
    pool: CellPool | None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, i: int, cell: Cell) -> None:
        s, tag = self.s, f"[{i + 1}/{self.total}] {cell.key}"
        if self.pool is not None:
            self.pool.check()  # stopped or broken: the pass's other cells start nothing
        t0 = time.time()
        fresh = not Path(cell.config.run.dir).exists()  # only a run dir this cell creates is removed after it
        print(f"{tag} [{cell.role}] {cell.label()} ...", flush=True)
        seconds = None  # a pool's cell: its time in the worker (the wait for a free worker is not the cell's)
        try:
            if self.pool is not None:
                meas, seconds = self.pool.run(cell.config, s.nproc, s.freq_features, compression=s.compression)
            elif s.in_process:
                meas = run_cell_here(
                    cell.config, s.nproc, s.freq_features, shared_process=True, compression=s.compression
                )
            else:
                meas = _run_cell_subprocess(cell, s, self.work)
        except CellPoolBroken:  # no cell can run any more: stop the sweep (a rerun trains this cell again)
            self._discard(cell, fresh)  # its worker is gone: nothing writes to the run dir any more
            raise
        except Exception as e:  # noqa: BLE001 - report and go on with the other cells
            print(f"{tag} FAILED: {e}", flush=True)
            with self.lock:
                self.counts["failed"] += 1
            return
        record = self._record(cell, time.time() - t0 if seconds is None else seconds, meas)
        self.store.append(record)
        self._discard(cell, fresh)
        t = record.get("test") or {}
        outcome = (
            "diverged (recorded; a rerun skips it)"
            if record["status"] == "diverged"
            else f"test AUC {t.get('auc', float('nan')):.4f} LogLoss {t.get('logloss', float('nan')):.4f}"
        )
        print(f"{tag} done in {record['wall_seconds']:.0f}s: {outcome}", flush=True)
        with self.lock:
            self.counts["ran"] += 1

    def _discard(self, cell: Cell, fresh: bool) -> None:
        """Removes the cell's run dir if the cell created it (``fresh``) and the sweep does not keep runs."""
        if fresh and not self.s.keep_runs:
            shutil.rmtree(cell.config.run.dir, ignore_errors=True)

    def _record(self, cell: Cell, wall_seconds: float, meas: dict[str, Any]) -> dict[str, Any]:
        s = self.s
        return {
            "version": STORE_VERSION,
            "key": cell.key,
            "status": meas.pop("status", "ok"),
            "role": cell.role,
            "dataset": self.dataset,
            "overrides": cell.overrides,
            "base_config": s.config,
            "base_overrides": list(s.base_overrides),
            "grid": s.grid,
            "tune": s.tune,
            "tune_mlet": s.tune_mlet,
            "tune_seeds": s.tune_seeds,
            "extend": s.extend,
            "budget": self.note,
            "nproc": s.nproc,
            "parallel": s.parallel,
            "d": cell.config.embedding.d,
            "k": cell.config.embedding.k,
            "seed": cell.config.train.seed,
            "sparse_lr": cell.config.sparse_optimizer.lr,
            "dense_lr": cell.config.dense_optimizer.lr,
            "config": cell.config.model_dump(mode="json"),
            "data_hashing": _data_hashing(cell.config.data.path),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_seconds": wall_seconds,
            **meas,
        }


# the sweep's public names, its own and those it re-exports from grid, store, cell and analysis
__all__ = [
    "ALIASES",
    "STORE_VERSION",
    "Cell",
    "ResultsStore",
    "SweepSettings",
    "analyse_run",
    "budget_note",
    "cell_key",
    "expand_grid",
    "format_override",
    "load_results",
    "parse_grid",
    "plan_cells",
    "run_cell_here",
    "run_sweep",
]


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--cell":
        sys.exit(_cell_main(sys.argv[2:]))
    print("usage: mlet sweep ... (this module's own entry point is internal: --cell SPEC)", file=sys.stderr)
    sys.exit(2)
