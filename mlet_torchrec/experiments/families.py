"""The experiment families of docs/results/families: which sweeps fill which store, in which order.

Five families ask where MLET helps, sized to finish in a few hours on 2 CPU cores:

* (a) ``models``: DeepFM, DCN (and AutoInt on MovieLens) with Adagrad (the paper's DeepCTR-Torch setup), d in
  {4, 8, 16, 32}, k in {d, 4d, 16d} against the single-layer table;
* (b) ``sigma``: the W2 initialisation scale sigma in {0.01, 0.05, 0.25, 0.5, 1.0} at d = 4, k = 64 (DLRM, SGD);
* (c) ``small_k``: k in {d/2, d} against k = 4d (DeepFM, Adagrad);
* (d) ``epochs_width``: 1 against 3 epochs, and d up to 64 (DeepFM, Adagrad);
* (e) ``lr_equivalence``: MLET at embedding lr eta against the single-layer table at k·sigma²·eta (the papers'
  Theorem 1), from family (b)'s learning-rate grid;
* (f) ``resplit``: 10 random re-splits of the Criteo sample (DeepFM, then DCN) and of MovieLens-100K (DeepFM), d in
  {8, 32}, k in {d, 4d}, every method's lrs chosen on each split's validation rows (first in priority).

Every method, the baseline included, gets the same tuning grid of embedding **and** dense/W2 learning rates on
every seed, and each seed chooses on its own validation AUC (the choice is replicated, not seed 0's for all); a
grid whose best value sits at an end grows by up to ``EXTEND`` steps there (``mlet sweep --extend-grid``). Stores
made before this rule hold seeds 1-4 at seed 0's choice only; the reports say how many choices are replicated.
Runs with equal configs are one run, so the families share a store per (setup, data set) and the reports filter
it (``StoreSpec.store``). ``mlet results run`` runs the sweeps in order and resumes where it stopped.

Example:
    >>> [s.name for s in SWEEPS][:2]
    ['resplit_criteo_sample_deepfm_0', 'resplit_criteo_sample_deepfm_1']
    >>> sorted({s.store for s in SWEEPS})[0]
    'docs/results/families/deepctr_criteo_sample/results.jsonl'
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlet_torchrec.errors import UserError
from mlet_torchrec.experiments.cell_pool import CellPool
from mlet_torchrec.experiments.grid import parse_grid
from mlet_torchrec.experiments.sweep import SweepSettings, run_sweep
from mlet_torchrec.io import atomic_write_bytes
from mlet_torchrec.stale import pid_alive

log = logging.getLogger("mlet.results")

ROOT = "docs/results/families"
SEEDS = "seed=[0,1,2,3,4]"
# 4x steps; widened at both ends once MLET (k >= 4d) kept choosing 0.005 and the baseline 0.08: an optimum at
# the edge of the grid may lie outside it, and the comparison is only fair when both optima are inside
# the dense lr grids have 3 values: with 2, every dense choice was at an edge (Adagrad chose 0.02, SGD 0.2, mostly)
ADAGRAD_TUNE = "lr=[0.00125,0.005,0.02,0.08,0.32] dense_lr=[0.005,0.02,0.08]"
SGD_TUNE = "lr=[0.05,0.2,0.8,3.2,12.8,51.2,204.8,819.2] dense_lr=[0.05,0.2,0.8]"
SGD_TUNE_SYNTH = "lr=[0.2,0.8,3.2,12.8,51.2,204.8] dense_lr=[0.05,0.2,0.8]"  # 8 s a run: 2 of the 8 lrs cut
EXTEND = 2
"""Steps a tuning axis may grow past each end of its grid while a method's choice sits there."""
SIGMAS = "embedding.sigma=[0.01,0.05,0.25,0.5,1.0]"

DATASETS = {
    # name: (DeepCTR base config, DLRM base config, --freq-features)
    "movielens": (
        "configs/experiments/families/movielens_deepctr.yaml",
        "configs/experiments/movielens_dlrm.yaml",
        ["item_id"],
    ),
    "criteo_sample": (
        "configs/experiments/families/criteo_sample_deepctr.yaml",
        "configs/experiments/criteo_sample_dlrm.yaml",
        None,
    ),
    "synth1m": (
        "configs/experiments/families/synth1m_deepctr.yaml",
        "configs/experiments/synth1m_dlrm.yaml",
        None,
    ),
}

SPLITS = 10
"""Random re-splits of each small real data set (the re-split sweeps): split ``i`` is its rows split with seed ``i``."""
POOLED_CRITEO = "data/criteo_sample_pooled.tsv"


def split_path(dataset: str, i: int) -> str:
    """The data set directory of re-split ``i`` of ``dataset`` ('criteo_sample' or 'movielens').

    >>> split_path("criteo_sample", 3)
    'data/exp_criteo_split3'
    """
    return f"data/exp_{'criteo' if dataset == 'criteo_sample' else 'ml'}_split{i}"


DATA_COMMANDS = [
    "mlet convert movielens --input ../shared/data/movielens_100k --output data/exp_ml --row-group-rows 2048",
    "mlet convert criteo --input ../shared/data/criteo_kaggle/train.tsv --valid ../shared/data/criteo_kaggle/valid.tsv"
    " --test ../shared/data/criteo_kaggle/test.tsv --output data/exp_criteo --row-group-rows 128",
    "mlet synth --output data/exp_synth1m rows=1000000 num_dense=4 num_sparse=8 min_cardinality=100"
    " max_cardinality=100000 row_group_size=8192 seed=0",
    # the re-splits: the Criteo sample's three files pooled (8,000 rows), then split 90/5/5 with seed i (about the
    # sample's own 7,200 / 409 / 391); MovieLens-100K split 80/10/10 with seed i (split 0 is data/exp_ml's split)
    "pool --input ../shared/data/criteo_kaggle/train.tsv --input ../shared/data/criteo_kaggle/valid.tsv"
    f" --input ../shared/data/criteo_kaggle/test.tsv --output {POOLED_CRITEO}",
    *[
        f"mlet convert criteo --input {POOLED_CRITEO} --split 0.9 0.05 0.05 --seed {i}"
        f" --output {split_path('criteo_sample', i)} --row-group-rows 128"
        for i in range(SPLITS)
    ],
    *[
        f"mlet convert movielens --input ../shared/data/movielens_100k --seed {i}"
        f" --output {split_path('movielens', i)} --row-group-rows 2048"
        for i in range(SPLITS)
    ],
]
"""The data the sweeps read (as in docs/results/*/COMMANDS.md); ``mlet results run`` makes what is missing. A
``pool`` line concatenates its text inputs into its output (:func:`pool_files`)."""


@dataclass(frozen=True)
class FamilySweep:
    """One ``mlet sweep`` call of the families: its grid, tuning grid and store."""

    name: str
    dataset: str
    setup: str  # 'deepctr' (Adagrad, DeepCTR-style models), 'dlrm_sgd', or 'resplit' (deepctr on re-splits)
    grid: str
    tune: str
    overrides: tuple[str, ...] = field(default_factory=tuple)

    @property
    def config(self) -> str:
        deepctr, dlrm, _ = DATASETS[self.dataset]
        return dlrm if self.setup == "dlrm_sgd" else deepctr

    @property
    def store(self) -> str:
        return f"{ROOT}/{self.setup}_{self.dataset}/results.jsonl"

    def settings(self, runs_dir: str = "runs/exp/families") -> SweepSettings:
        return SweepSettings(
            config=self.config,
            grid=parse_grid(self.grid),
            tune=parse_grid(self.tune),
            tune_mlet=True,
            tune_seeds=None,  # every seed tunes: the choice is replicated
            extend=EXTEND,
            results=self.store,
            base_overrides=list(self.overrides),
            nproc=1,
            in_process=True,
            runs_dir=f"{runs_dir}/{self.setup}_{self.dataset}",
            freq_features=DATASETS[self.dataset][2],
            dataset=self.dataset,
            compression=False,  # INT8/SVD are measured in docs/results/{synth1m,movielens,criteo_sample}
        )

    def command(self) -> str:
        """The equivalent ``mlet sweep`` command line (for the reports' COMMANDS section)."""
        s = self.settings()
        ff = f" --freq-features {' '.join(s.freq_features)}" if s.freq_features else ""
        extra = "".join(f" {o}" for o in self.overrides)
        return (
            f'mlet sweep --config {self.config} --grid "{self.grid}" --tune "{self.tune}" --extend-grid {EXTEND} '
            f"--output {self.store} --nproc-per-node 1 --in-process --no-compression --runs-dir {s.runs_dir}"
            f"{ff} --dataset {self.dataset}{extra}"
        )


def _deepctr(dataset: str, name: str, grid: str) -> FamilySweep:
    return FamilySweep(f"deepctr_{dataset}_{name}", dataset, "deepctr", f"{SEEDS} {grid}", ADAGRAD_TUNE)


# In order of priority: `mlet results run` takes them top-down, so a cut-short run leaves the cheapest, most
# central families complete. Seed is the slowest axis, so a cut-short second pass still has whole seeds.
_MODELS = "d=[4,8,16,32] kd=[none,1,4,16]"
_SMALL_K = "model.name=[deepfm] d=[8,16,32] kd=[none,0.5,1,4]"
_EPOCHS = "model.name=[deepfm] d=[4,16,64] kd=[none,4] train.epochs=[1,3]"
_SIGMA = f"{SEEDS} d=[4] k=[none,64] {SIGMAS}"
# The re-splits: one seed per split, every method's lrs chosen on that split's validation rows. One sweep per
# (model, split), so each split's grids are extended before the next split starts and a cut-short run leaves
# whole splits: DeepFM's splits first, then DCN's on the Criteo sample.
RESPLIT_TUNE = "lr=[0.00125,0.005,0.02,0.08] dense_lr=[0.005,0.02,0.08]"


def _resplit(dataset: str, model: str, i: int) -> FamilySweep:
    grid = f"data.path=[{split_path(dataset, i)}] seed=[0] model.name=[{model}] d=[8,32] kd=[none,1,4]"
    return FamilySweep(f"resplit_{dataset}_{model}_{i}", dataset, "resplit", grid, RESPLIT_TUNE)


SWEEPS: list[FamilySweep] = [
    *[_resplit("criteo_sample", "deepfm", i) for i in range(SPLITS)],
    *[_resplit("movielens", "deepfm", i) for i in range(SPLITS)],
    *[_resplit("criteo_sample", "dcn", i) for i in range(SPLITS)],
    FamilySweep("dlrm_sgd_movielens", "movielens", "dlrm_sgd", _SIGMA, SGD_TUNE),
    FamilySweep("dlrm_sgd_criteo_sample", "criteo_sample", "dlrm_sgd", _SIGMA, SGD_TUNE),
    FamilySweep("dlrm_sgd_synth1m", "synth1m", "dlrm_sgd", _SIGMA, SGD_TUNE_SYNTH),
    _deepctr("movielens", "fast", f"model.name=[deepfm,dcn] {_MODELS}"),
    _deepctr("criteo_sample", "fast", f"model.name=[deepfm,dcn] {_MODELS}"),
    _deepctr("movielens", "small_k", _SMALL_K),
    _deepctr("criteo_sample", "small_k", _SMALL_K),
    _deepctr("movielens", "epochs_width", _EPOCHS),
    _deepctr("criteo_sample", "epochs_width", _EPOCHS),
    _deepctr("synth1m", "deepfm", "model.name=[deepfm] d=[4,16] kd=[none,1,4,16]"),
    _deepctr("movielens", "autoint", f"model.name=[autoint] {_MODELS}"),
]
# Dropped (family_report.CUTS says why): AutoInt and xDeepFM on the Criteo sample, xDeepFM on MovieLens.


def sweeps(names: list[str] | None = None) -> list[FamilySweep]:
    """The sweeps to run, in priority order: all, or those named."""
    known = {s.name for s in SWEEPS}
    unknown = sorted(set(names or []) - known)
    if unknown:
        from mlet_torchrec.config import ConfigError

        raise ConfigError(f"unknown sweep(s) {unknown}; known: {sorted(known)}")
    return [s for s in SWEEPS if not names or s.name in names]


def data_command_paths(command: str) -> tuple[str, list[str]]:
    """The data set directory a ``DATA_COMMANDS`` line writes and the raw files it reads.

    >>> data_command_paths("mlet convert criteo --input a.tsv --valid b.tsv --test c.tsv --output data/x")
    ('data/x', ['a.tsv', 'b.tsv', 'c.tsv'])
    """
    argv = shlex.split(command)
    out, inputs = "", []
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--output":
            out = value
        elif flag in ("--input", "--valid", "--test"):
            inputs.append(value)
    return out, inputs


def _data_paths(sweep: FamilySweep) -> list[str]:
    """The data set directories a sweep reads: its grid's ``data.path`` values (the re-splits), else its config's."""
    from mlet_torchrec.config import load_config

    grid = parse_grid(sweep.grid).get("data.path") or [load_config(sweep.config).data.path]
    return [os.path.normpath(p) for p in grid]


def pool_files(inputs: list[str], output: str) -> None:
    """Concatenate text files (e.g. the Criteo sample's train, valid and test rows) into ``output``, atomically;
    a last line without a newline gets one, so no two rows are joined."""
    parts = [Path(p).read_bytes() for p in inputs]
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, b"".join(b if b.endswith(b"\n") or not b else b + b"\n" for b in parts))


def _make_data(command: str) -> None:
    """Run one ``DATA_COMMANDS`` line (``mlet ...`` with this interpreter, or ``pool``); a failure stops
    ``results run``."""
    if command.startswith("pool "):
        out, inputs = data_command_paths(command)
        pool_files(inputs, out)
        return
    argv = [sys.executable, "-m", "mlet_torchrec.cli", *shlex.split(command)[1:]]
    rc = subprocess.run(argv, check=False).returncode
    if rc:
        raise UserError(f"making the data failed (exit {rc}, its error is above): {command}")


def _users(todo: list[FamilySweep]) -> dict[str, set[str]]:
    """Per ``DATA_COMMANDS`` output: the sweeps that need it, directly or through a later command reading it."""
    users: dict[str, set[str]] = {}
    for s in todo:
        for path in _data_paths(s):
            users.setdefault(path, set()).add(s.name)
    for command in reversed(DATA_COMMANDS):
        out, inputs = data_command_paths(command)
        for p in inputs:
            users.setdefault(os.path.normpath(p), set()).update(users.get(os.path.normpath(out), set()))
    return users


def prepare_data(names: list[str] | None = None, dry_run: bool = False) -> list[str]:
    """Make the missing data sets of the sweeps (all, or those named) with ``DATA_COMMANDS``; a data set whose
    directory exists is left alone. Returns the sweeps that cannot run, each group named in one line with the
    reason (its raw files, e.g. ../shared/data/criteo_kaggle, are absent). ``dry_run`` says what it would make.

    >>> prepare_data(["deepctr_movielens_fast"], dry_run=True)  # doctest: +SKIP
    results: would make data/exp_ml: mlet convert movielens --input ../shared/data/movielens_100k ...
    []
    """
    todo = sweeps(names)
    users = _users(todo)
    made: set[str] = set()
    skipped: set[str] = set()
    for command in DATA_COMMANDS:
        out, inputs = data_command_paths(command)
        who = [s.name for s in todo if s.name in users.get(os.path.normpath(out), set()) - skipped]  # in order
        made.add(os.path.normpath(out))
        if not who or Path(out).exists():
            continue
        missing = [p for p in inputs if not Path(p).exists() and os.path.normpath(p) not in made]
        if missing:
            print(f"results: skipping {', '.join(who)}: missing {', '.join(missing)} (the raw files of {out})")
            skipped.update(who)
        elif dry_run:
            print(f"results: would make {out}: {command}")
        else:
            print(f"results: making {out}: {command}", flush=True)
            _make_data(command)
    orphans = [
        s.name
        for s in todo
        if s.name not in skipped and any(p not in made and not Path(p).exists() for p in _data_paths(s))
    ]
    for name in orphans:  # a data set no DATA_COMMANDS line makes
        print(f"results: skipping {name}: its data set is missing and DATA_COMMANDS does not make it")
    return [s.name for s in todo if s.name in skipped] + orphans


def _claim(path: Path) -> bool:
    """Take the store's claim file (holding our pid); a claim whose process is gone is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # One claimer at a time: else two workers that both read a dead pid could each delete and take the claim.
    with open(path.parent / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _take(path)


def _take(path: Path) -> bool:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and pid_alive(pid):
                return False
            path.unlink(missing_ok=True)  # a dead worker's claim
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


POLL_S = 5.0
"""Seconds a worker waits before it looks again at the stores other workers hold."""


def work(todo: list[FamilySweep], claims: Path, pool: CellPool | None = None) -> int:
    """Run the sweeps top-down; a store another worker is filling is skipped until it is free, so two workers
    never run the same cell, and a sweep another worker finished (``claims/NAME.done``) is not run again.
    With ``pool`` the cells train in its processes. Returns the number of failed cells."""
    failed = 0
    remaining = list(todo)
    while remaining and (pool is None or pool.usable()):
        for sweep in remaining:
            claim = claims / Path(sweep.store).parent.name
            if not _claim(claim):
                continue
            done = claims / f"{sweep.name}.done"
            try:
                if not done.exists():  # checked under the claim: the worker that ran it has released it
                    print(f"results: sweep {sweep.name} -> {sweep.store}", flush=True)
                    failed += run_sweep(sweep.settings(), pool)["failed"]
                    done.touch()
            finally:
                claim.unlink(missing_ok=True)
            remaining.remove(sweep)
            break  # back to the top of the list
        else:
            time.sleep(POLL_S)  # every remaining store is being filled by another worker
    return failed


def run_families(names: list[str] | None = None, jobs: int = 2, claims: str = "runs/exp/families/.claims") -> int:
    """``mlet results run``: the sweeps, their cells trained ``jobs`` at a time. With ``jobs`` > 1 every store
    gets a thread that plans its sweeps and appends its lines (:func:`work`), and they share one pool of ``jobs``
    worker processes, which stays full while any store has runs left. Returns the number of failed cells."""
    todo = sweeps(names)
    for marker in Path(claims).glob("*.done"):  # from an earlier call: this one runs (resumes) every sweep
        marker.unlink(missing_ok=True)
    if jobs <= 1:
        return work(todo, Path(claims))
    with CellPool(jobs) as pool:
        return _threads(len({s.store for s in todo}), lambda: work(todo, Path(claims), pool), pool)


def _threads(n: int, target: Callable[[], int], pool: CellPool) -> int:
    """Run ``target`` in ``n`` threads; the sum of what they return, or the first exception one raised. On a
    Ctrl-C the pool stops and the threads get a few seconds to release their stores' claims."""
    results: list[int] = []
    errors: list[BaseException] = []
    ended: list[None] = []

    def one() -> None:
        try:
            results.append(target())
        except BaseException as e:  # noqa: BLE001 - handed to the caller below
            errors.append(e)
        finally:
            ended.append(None)

    def wait(seconds: float) -> None:  # sleeps, not Thread.join: a Ctrl-C in join leaves is_alive() wrong (3.11)
        end = time.monotonic() + seconds
        while len(ended) < n and time.monotonic() < end:
            time.sleep(0.1)

    for _ in range(n):
        threading.Thread(target=one, daemon=True).start()
    try:
        wait(math.inf)
    except BaseException:
        pool.close(stop=True)
        wait(10.0)
        raise
    if errors:
        raise errors[0]
    return sum(results)
