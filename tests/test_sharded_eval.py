"""Sharded, bounded-memory evaluation: AUC from groups, the histogram's error bound, and the same metrics on 1,
2 and 3 real gloo ranks (accumulators alone, then ``mlet evaluate`` on a trained run)."""

import json
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mlet_torchrec.evaluation import metrics as metrics_module
from mlet_torchrec.evaluation.metrics import MetricAccumulator, ctr_metrics
from mlet_torchrec.evaluation.ranking import (
    BIN_WIDTH,
    auc_error_bound,
    auc_from_groups,
    average_precision_from_groups,
    exact_groups,
    histogram,
)
from mlet_torchrec.training.launcher import run_local

REPO = Path(__file__).resolve().parents[1]


def brute_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney over every (positive, negative) pair, ties ½."""
    pos, neg = scores[labels > 0.5].double(), scores[labels <= 0.5].double()
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def brute_ap(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Average precision: over distinct thresholds (descending), recall gain x precision."""
    total, ap, prev_tp = float(labels.sum()), 0.0, 0.0
    for t in sorted(set(scores.tolist()), reverse=True):
        above = scores >= t
        tp, n = float(labels[above].sum()), float(above.sum())
        ap += (tp - prev_tp) / total * (tp / n)
        prev_tp = tp
    return ap


def ctr_like(n: int, seed: int, spread: float = 1.5, quantum: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, generator=g) * spread - 2.5
    if quantum:
        logits = torch.round(logits / quantum) * quantum  # many exact ties
    labels = (torch.rand(n, generator=g) < torch.sigmoid(logits)).float()
    return logits, labels


def test_groups_give_the_pairwise_auc_and_ap():
    # groups in ascending score: (pos, neg) = (0, 2), (1, 1), (2, 0): 17 of 18 half-pairs won
    pos, neg = torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0])
    assert auc_from_groups(pos, neg) == 17 / 18
    assert auc_error_bound(pos, neg) == 1 / 18
    for seed, quantum in ((0, 0.0), (1, 0.25)):
        s, y = ctr_like(700, seed, quantum=quantum)
        p, n = exact_groups(s, y)
        assert auc_from_groups(p, n) == pytest.approx(brute_auc(s, y), abs=1e-12)
        assert average_precision_from_groups(p, n) == pytest.approx(brute_ap(s, y), abs=1e-12)
    one_class = torch.tensor([3, 0]), torch.tensor([0, 0])
    assert math.isnan(auc_from_groups(*one_class)) and math.isnan(average_precision_from_groups(*one_class))


def test_histogram_auc_is_within_its_bound_of_the_exact_auc():
    cases = {
        "ctr-like": ctr_like(5000, 2),
        "wide": ctr_like(5000, 3, spread=6.0),  # many scores past the clamp: the end bins
        "narrow": ctr_like(5000, 4, spread=0.002),  # every score in a handful of bins
    }
    for name, (s, y) in cases.items():
        counts = histogram(s, y)
        hist, bound = auc_from_groups(counts[1], counts[0]), auc_error_bound(counts[1], counts[0])
        exact = brute_auc(s, y)
        assert abs(hist - exact) <= bound + 1e-15, name
    assert auc_error_bound(*histogram(*cases["ctr-like"]).flip(0)) < 1e-3  # 2^16 bins: tight on CTR scores
    assert auc_error_bound(*histogram(*cases["narrow"]).flip(0)) > 0.01  # ~25 bins: the bound says so
    # known answer, bound reached: every positive a hair above every negative, in the same bin
    s = torch.cat([torch.zeros(30), torch.full((20,), BIN_WIDTH / 8)])
    y = torch.cat([torch.zeros(30), torch.ones(20)])
    counts = histogram(s, y)
    assert brute_auc(s, y) == 1.0
    assert auc_from_groups(counts[1], counts[0]) == 0.5 and auc_error_bound(counts[1], counts[0]) == 0.5


def test_metrics_of_known_answers():
    m = ctr_metrics(torch.tensor([0.2, 0.2, 0.8, 0.8], dtype=torch.float64), torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert m.auc == 0.5 and m.rows == 4 and m.positive_rate == 0.5
    assert m.logloss == pytest.approx(-(math.log(0.2) + math.log(0.8)) / 2, abs=1e-12)
    assert m.mean_prediction == pytest.approx(0.5) and m.calibration == pytest.approx(1.0)
    acc = MetricAccumulator("histogram")
    s, y = ctr_like(3000, 5)
    for part in range(3):  # batches in any split give the same state
        acc.update(s[part::3], y[part::3])
    h, e = acc.result(), ctr_metrics(torch.sigmoid(s), y)
    assert h.auc_mode == "histogram" and e.auc_mode == "exact" and e.auc_error_bound == 0.0
    assert abs(h.auc - e.auc) <= h.auc_error_bound and h.logloss == pytest.approx(e.logloss, abs=1e-9)


# --------------------------------------------------------------------------------------------
# 1, 2 and 3 real gloo ranks


def _rank_metrics() -> list[dict]:
    """One rank of a :func:`run_local` job: the metrics of its share of the rows; every rank's, in rank order."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")  # the launcher's rendezvous (MASTER_ADDR/PORT)
    try:
        metrics_module.CHUNK = 64  # several messages per rank in the exact stream
        s, y = ctr_like(1001, 7)
        mine = torch.arange(rank, s.numel(), world)  # rank r takes rows t = r (mod world), in uneven batches
        results = {}
        for mode in ("histogram", "exact"):
            acc = MetricAccumulator(mode)
            for chunk in torch.split(mine, 37 + 11 * rank):
                acc.update(s[chunk], y[chunk])
            results[mode] = acc.result().as_dict()
        found: list[dict] = [{} for _ in range(world)]
        dist.all_gather_object(found, results)
        return found
    finally:
        dist.destroy_process_group()


def _on_ranks(world: int) -> dict:
    ranks = run_local(world, _rank_metrics)
    assert len(ranks) == world and all(r == ranks[0] for r in ranks)  # every rank returns the same numbers
    return ranks[0]


def test_one_two_and_three_gloo_ranks_give_the_same_metrics():
    by_world = {w: _on_ranks(w) for w in (1, 2, 3)}
    s, y = ctr_like(1001, 7)
    assert by_world[1]["exact"]["auc"] == pytest.approx(brute_auc(s, y), abs=1e-12)
    assert by_world[1]["exact"]["pr_auc"] == pytest.approx(brute_ap(s, y), abs=1e-12)
    for w in (2, 3):
        for mode in ("histogram", "exact"):
            one, many = by_world[1][mode], by_world[w][mode]
            assert one["rows"] == many["rows"] == 1001
            for key, value in one.items():
                if isinstance(value, float):
                    assert many[key] == pytest.approx(value, abs=1e-9), (w, mode, key)
            assert many["auc"] == one["auc"] and many["pr_auc"] == one["pr_auc"]  # integer counts: identical


# --------------------------------------------------------------------------------------------
# mlet evaluate on a trained run


def _mlet(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "mlet_torchrec.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"mlet {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.slow
def test_mlet_evaluate_on_two_and_three_ranks_prints_the_one_process_metrics(tmp_path, synth_dataset):
    from mlet_torchrec.config import load_config
    from mlet_torchrec.serving.scoring import evaluate_path
    from mlet_torchrec.training.train import train

    data = synth_dataset(rows=4000, row_group_size=64)
    run = tmp_path / "run"
    train(
        load_config(
            "tiny",
            [
                f"data.path={data}",
                f"run.dir={run}",
                "train.max_steps=20",
                "embedding.tables.C2.sharding=row_wise",
                "embedding.tables.C3.sharding=column_wise",
            ],
        )
    )
    one = json.loads(_mlet("evaluate", "--input", str(run), "--split", "test", "--auc", "exact", "--json"))
    two = json.loads(
        _mlet("evaluate", "--input", str(run), "--split", "test", "--auc", "exact", "--nproc-per-node", "2", "--json")
    )
    three = run_local(3, partial(evaluate_path, run, "test", "histogram"))
    one_hist = evaluate_path(run, "test", "histogram")  # in this process
    assert one["rows"] == two["rows"] == three["rows"] > 0
    assert one["auc_mode"] == two["auc_mode"] == "exact" and three["auc_mode"] == "histogram"
    for key, value in one.items():
        if isinstance(value, float) and key not in ("auc", "pr_auc", "auc_error_bound"):
            assert two[key] == pytest.approx(value, abs=1e-9), key
            assert three[key] == pytest.approx(value, abs=1e-9), key
    assert two["auc"] == pytest.approx(one["auc"], abs=1e-9)
    assert two["pr_auc"] == pytest.approx(one["pr_auc"], abs=1e-9)
    assert three["auc"] == one_hist["auc"] and three["auc_error_bound"] == one_hist["auc_error_bound"]
    assert abs(three["auc"] - one["auc"]) <= three["auc_error_bound"]
