"""The runs of the experiment families, indexed by method: the one place that says which run stands for what.

A **method** (:class:`.records.MethodKey`) is a trained configuration minus its learning rates and seed. Per
(method, seed) a store holds the whole tuning grid, or (the older rule) only the run at the values seed 0 chose
(role ``selected``); :func:`tuned` picks the best **validation** AUC of a seed's own grid, and for a
``selected`` seed the run at seed 0's current choice (a seed whose run at that choice is not in the store yet is
missing, not replaced by a run at an older choice). Duplicate lines (two sweeps that ran the same cell) count once.

Example:
    >>> recs = [_example(0.71, 0.70, lr) for lr in (0.1, 1.0)]
    >>> runs = tuned(recs)
    >>> [(m.k, s, r["sparse_lr"]) for (m, s), r in runs.items()]
    [(0, 0, 1.0)]
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from mlet_torchrec.experiments.families import SPLITS
from mlet_torchrec.experiments.records import MethodKey, by_method, method_of


@dataclass(frozen=True)
class Family:
    """One experiment family: the store setup its runs come from and which methods belong to it."""

    name: str
    title: str
    setup: str  # 'deepctr' or 'dlrm_sgd' (families.FamilySweep.setup)
    models: tuple[str, ...] = ()
    ds: tuple[int, ...] = ()
    kds: tuple[float, ...] = ()  # k/d values; 0 is the baseline
    epochs: tuple[int, ...] = (1,)  # () for every epoch count (the DLRM configs train 2 or 3 epochs)
    replicate: str = "seed"  # what the paired differences pair over: "seed", or "split" (:func:`as_splits`)
    expected: int = 5  # replicates each cell should have

    def has(self, m: MethodKey) -> bool:
        return (
            (not self.models or m.model in self.models)
            and (not self.ds or m.d in self.ds)
            and (not self.kds or m.kd in self.kds)
            and (not self.epochs or m.epochs in self.epochs)
        )


FAMILIES = [
    Family(
        "models",
        "(a) DeepCTR-style models with Adagrad (DeepFM, DCN; AutoInt on MovieLens), d in {4, 8, 16, 32}, k in {d, "
        "4d, 16d}",
        "deepctr",
        ("deepfm", "dcn", "autoint"),
        (4, 8, 16, 32),
        (0, 1, 4, 16),
    ),
    Family("sigma", "(b) the W2 initialisation scale sigma (DLRM, SGD, d = 4, k = 64)", "dlrm_sgd", epochs=()),
    Family(
        "small_k",
        "(c) k in {d/2, d} against k = 4d (DeepFM, Adagrad)",
        "deepctr",
        ("deepfm",),
        (8, 16, 32),
        (0, 0.5, 1, 4),
    ),
    Family(
        "epochs_width",
        "(d) 1 against 3 epochs, and d up to 64 (DeepFM, Adagrad)",
        "deepctr",
        ("deepfm",),
        (4, 16, 64),
        (0, 4),
        (1, 3),
    ),
    Family(
        "lr_equivalence", "(e) MLET at lr eta against the baseline at k sigma^2 eta (DLRM, SGD)", "dlrm_sgd", epochs=()
    ),
    Family(
        "resplit",
        "(f) random re-splits of the small real sets: lrs chosen per split (DeepFM, DCN, d in {8, 32}, k in {d, 4d})",
        "resplit",
        ("deepfm", "dcn"),
        (8, 32),
        (0, 1, 4),
        replicate="split",
        expected=SPLITS,
    ),
]
"""The five families of docs/results/families (the sweeps that fill them: :mod:`.families`)."""


TUNE_SEED = 0
"""The seed whose full learning-rate grid chooses every seed's learning rates (``mlet sweep --tune-seeds 0``)."""


def _lrs(r: dict[str, Any]) -> tuple[Any, Any]:
    return r.get("sparse_lr"), r.get("dense_lr")


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda r: float(r["valid"]["auc"]))


def own_grid(runs: list[dict[str, Any]]) -> bool:
    """Whether a (method, seed)'s runs include a learning-rate grid of its own (2+ lr pairs not run as seed 0's
    choice): its choice is then made on its own validation AUC."""
    return len({_lrs(r) for r in runs if r.get("role") != "selected"}) >= 2


def replicated(records: list[dict[str, Any]]) -> tuple[int, int]:
    """(how many, of all) finished (method, seed) pairs chose their learning rates on a grid of their own."""
    runs = by_method(records)
    return sum(own_grid(rs) for rs in runs.values()), len(runs)


def tuned(records: list[dict[str, Any]]) -> dict[tuple[MethodKey, int], dict[str, Any]]:
    """Per (method, seed): the run with the best validation AUC over that seed's own grid (ties: the first); for a
    seed that ran only at seed 0's choice (role ``selected``, no grid of its own), the run at seed 0's current
    choice. Sorted by method and seed."""
    runs = by_method(records)
    choice = {m: _lrs(_best(rs)) for (m, s), rs in runs.items() if s == TUNE_SEED}
    out: dict[tuple[MethodKey, int], dict[str, Any]] = {}
    for (m, s), rs in sorted(runs.items()):
        if s != TUNE_SEED and not own_grid(rs) and any(r.get("role") == "selected" for r in rs):
            rs = [r for r in rs if m in choice and _lrs(r) == choice[m]]
        if rs:
            out[(m, s)] = _best(rs)
    return out


_TUNE_KEY = {"sparse_lr": "sparse_optimizer.lr", "dense_lr": "dense_optimizer.lr"}


def edge_choices(records: list[dict[str, Any]], lr: str = "sparse_lr") -> dict[MethodKey, str]:
    """Methods whose choice of embedding lr (``lr="dense_lr"``: dense/W2 lr) is at an end of the grid they tried:
    ``"lowest"`` or ``"highest"``
    (a highest lr is an edge only when no larger one was tried and diverged), on every replicate (seed or split)
    that ran a grid of its own; with several such replicates, how many chose an edge (``"lowest in 2 of 7"``).
    The optimum may then lie outside the grid, and the comparison of that method is not settled by it.

    >>> recs = [_example(0.7, 0.7, lr) for lr in (0.1, 1.0)]
    >>> [(m.k, why) for m, why in edge_choices(recs).items()]
    [(0, 'highest (bound hit)')]
    >>> edge_choices(recs, "dense_lr")  # one dense lr: no grid, no edge
    {}
    """
    tried: dict[tuple[MethodKey, int], set[float]] = defaultdict(set)
    for r in records:
        if r.get("status") in ("ok", "diverged") and "d" in r and r.get("role") != "selected" and r.get(lr):
            tried[(method_of(r), int(r["seed"]))].add(float(r[lr]))  # the grids only
    ends: dict[MethodKey, dict[str, int]] = defaultdict(lambda: {"lowest": 0, "highest": 0, "grids": 0, "open": 0})
    for (m, s), r in tuned(records).items():
        lrs = sorted(tried.get((m, s), ()))
        if len(lrs) < 2:  # this replicate ran at a chosen lr only
            continue
        ends[m]["grids"] += 1
        value, (low, high) = float(r[lr]), _lr_bounds(r, lr)
        if value == lrs[0]:
            ends[m]["lowest"] += 1
            ends[m]["open"] += value > low * (1 + 1e-9)
        elif value == lrs[-1]:
            ends[m]["highest"] += 1
            ends[m]["open"] += value < high * (1 - 1e-9)
    out = {}
    for m, n in sorted(ends.items()):
        at = [
            f"{side}" + (f" in {n[side]} of {n['grids']}" if n["grids"] > 1 else "")
            for side in ("lowest", "highest")
            if n[side]
        ]
        if at:
            out[m] = ", ".join(at) + (f" ({n['open']} not yet at the bound)" if n["open"] else " (bound hit)")
    return out


def _lr_bounds(rec: dict[str, Any], lr: str) -> tuple[float, float]:
    """The lrs (``lr``: ``sparse_lr`` or ``dense_lr``) the run's sweep may reach: its tuning grid's ends,
    ``extend`` steps past them (:func:`.grid.extensions`); the run's own lr for a line without a tuning grid."""
    from mlet_torchrec.experiments.grid import _edge_steps

    tune = rec.get("tune") or {}
    lrs = tune.get(_TUNE_KEY[lr])
    steps = _edge_steps({"lr": lrs}, int(rec.get("extend") or 0)) if lrs else {}
    if "lr" in steps:
        return steps["lr"][0], steps["lr"][1]
    if lrs and len(lrs) >= 2:
        return float(min(lrs)), float(max(lrs))
    return float(rec[lr]), float(rec[lr])


def auc_by_seed(runs: dict[tuple[MethodKey, int], dict[str, Any]], method: MethodKey) -> dict[int, float]:
    """Test AUC per seed of a method's tuned runs."""
    return {s: float(r["test"]["auc"]) for (m, s), r in runs.items() if m == method}


def _example(valid: float, test: float, lr: float) -> dict[str, Any]:
    return {
        "key": f"k{lr}",
        "status": "ok",
        "d": 4,
        "k": None,
        "seed": 0,
        "sparse_lr": lr,
        "config": {"model": {"name": "deepfm"}, "train": {"epochs": 1}, "embedding": {"sigma": 0.5}},
        "valid": {"auc": valid + lr / 100},
        "test": {"auc": test},
    }
