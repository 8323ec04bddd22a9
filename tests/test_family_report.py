"""The family reports (mlet_torchrec.experiments.family_report / family_tables) on small constructed stores."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlet_torchrec.experiments.families import SWEEPS
from mlet_torchrec.experiments.family_data import FAMILIES
from mlet_torchrec.experiments.family_report import GENERATED, render_families
from mlet_torchrec.experiments.family_tables import (
    LOSS,
    LR,
    PENDING,
    TIE,
    WIN,
    cells,
    expected_methods,
    interp_log,
    judge,
    lr_points,
    mark,
    paper_lrs,
)
from mlet_torchrec.experiments.predictions import encode_predictions
from mlet_torchrec.experiments.records import MethodKey, as_splits
from mlet_torchrec.experiments.stats import paired_test
from mlet_torchrec.io import OutputError

REPO = Path(__file__).resolve().parents[1]
FAMILY = {f.name: f for f in FAMILIES}
PAPER = (0.02, 0.02)  # the deepctr configs' learning rates


def rec(
    d: int,
    k: int | None,
    seed: int,
    lr: float,
    valid: float,
    test: float,
    role: str,
    dense_lr: float = 0.02,
    model: str = "deepfm",
    sigma: float = 0.5,
    rank: int = 4,
) -> dict[str, Any]:
    """One store line as the sweep writes it (the fields the reports read)."""
    return {
        "key": f"{model}-{d}-{k}-{sigma}-{seed}-{lr}-{dense_lr}",
        "status": "ok",
        "role": role,
        "d": d,
        "k": k,
        "seed": seed,
        "sparse_lr": lr,
        "dense_lr": dense_lr,
        "config": {"model": {"name": model}, "train": {"epochs": 1}, "embedding": {"sigma": sigma}},
        "valid": {"auc": valid},
        "test": {"auc": test},
        "spectrum": {"t_a": {"above_1pct": rank, "rows": 1000}, "t_b": {"above_1pct": d, "rows": 10}},
    }


def seeds(d: int, k: int | None, tests: list[float], paper_test: float, tuned_lr: float = 0.08) -> list[dict]:
    """Seed 0: a run at the paper lrs (role grid) and one tuning run that wins on validation; seeds 1-4: the
    selected runs. ``tests[s]`` is seed s's tuned test AUC."""
    out = [
        rec(d, k, 0, PAPER[0], 0.60, paper_test, "grid"),
        rec(d, k, 0, tuned_lr, 0.70, tests[0], "tune"),
    ]
    out += [rec(d, k, s, tuned_lr, 0.70, t, "selected") for s, t in enumerate(tests) if s > 0]
    return out


BASE = [0.700, 0.702, 0.698, 0.701, 0.699]  # seed std 0.0016


def deepctr_store() -> list[dict]:
    """d=4: k=16 (4d) clearly worse than the baseline on every seed; k=4 (d) tied when tuned but far better at
    the paper lrs (lr-explained); d=8: k=32 better on every seed."""
    r = seeds(4, None, BASE, paper_test=0.650)
    r += seeds(4, 16, [b - 0.02 + 0.001 * (s % 2) for s, b in enumerate(BASE)], paper_test=0.655)
    r += seeds(4, 4, [b + (0.001 if s % 2 else -0.001) for s, b in enumerate(BASE)], paper_test=0.690)
    base8 = [b + 0.01 for b in BASE]
    r += seeds(8, None, base8, paper_test=0.66)
    r += seeds(8, 32, [b + 0.01 + 0.0005 * s for s, b in enumerate(base8)], paper_test=0.665)
    return r


def dlrm_store() -> list[dict]:
    """Seed 0 of DLRM: the baseline at lr 0.1, 0.4 and 1.6; MLET (k=64, sigma=0.25: k·sigma² = 4) at eta 0.05
    (baseline at 0.2: between 0.1 and 0.4) and at eta 1.0 (baseline at 4: outside the grid)."""
    base = [rec(4, None, 0, lr, v, v, "tune", 0.2, "dlrm") for lr, v in ((0.1, 0.60), (0.4, 0.64), (1.6, 0.62))]
    base += [rec(4, None, s, 0.4, 0.64, 0.64 + 0.001 * s, "selected", 0.2, "dlrm") for s in (1, 2)]
    mlet = [rec(4, 64, 0, eta, v, v, "tune", 0.2, "dlrm", sigma=0.25) for eta, v in ((0.05, 0.63), (1.0, 0.65))]
    return base + mlet


def write(root: Path, name: str, records: list[dict]) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def stores(tmp_path: Path) -> Path:
    root = tmp_path / "families"
    write(root, "deepctr_movielens", deepctr_store())
    write(root, "dlrm_sgd_movielens", dlrm_store())
    return root


def test_mark_rule_on_known_differences() -> None:
    win, loss = paired_test([0.01, 0.012, 0.011]), paired_test([-0.01, -0.012, -0.011])
    assert mark(win, win.p, float("nan"), 0.01) == WIN
    assert mark(loss, loss.p, 0.5, 0.01) == LOSS  # significance beats the paper lrs
    assert mark(win, 0.06, float("nan"), 0.01) == TIE  # p < 0.05 but not after Benjamini-Hochberg: no win
    noisy = paired_test([0.001, -0.001, 0.0005])
    assert mark(noisy, noisy.p, paper_diff=0.02, base_std=0.01) == LR
    assert mark(noisy, noisy.p, paper_diff=0.005, base_std=0.01) == TIE
    assert mark(noisy, noisy.p, paper_diff=float("nan"), base_std=0.01) == TIE  # a missing paper-lr run: no claim
    one = paired_test([0.05])
    assert mark(one, one.p, 0.5, 0.01) == PENDING


def test_judge_adjusts_over_every_cell_of_the_report() -> None:
    """A p of 0.04 is a win alone; among 9 null cells Benjamini-Hochberg takes it back (q = 0.4)."""
    recs = deepctr_store()
    cs = cells(FAMILY["models"], recs)
    lone = replace(cs[0], test=replace(cs[0].test, p=0.04, mean=0.01))
    nulls = [replace(cs[0], test=replace(cs[0].test, p=0.9)) for _ in range(9)]
    assert judge([[lone]])[0][0].mark == WIN
    both = judge([[lone], nulls])
    assert both[0][0].q == pytest.approx(0.4) and both[0][0].mark != WIN
    assert [c.q for c in both[1]] == pytest.approx([0.9] * 9)


def test_cells_from_records() -> None:
    recs = deepctr_store()
    assert paper_lrs(recs) == PAPER
    got = {(c.method.d, c.method.k): c for c in cells(FAMILY["models"], recs)}
    assert set(got) == {(4, 4), (4, 16), (8, 32)}
    assert got[(4, 16)].mark == LOSS and got[(4, 16)].test.mean == pytest.approx(-0.0196)
    assert got[(4, 4)].mark == LR
    assert got[(4, 4)].paper_diff == pytest.approx(0.04)  # 0.690 − 0.650, the seed-0 grid runs
    assert got[(8, 32)].mark == WIN and got[(8, 32)].test.n == 5


def test_expected_cells_show_as_missing() -> None:
    extra = MethodKey("deepfm", 1, 16, 64, 0.5)
    cs = cells(FAMILY["models"], deepctr_store(), expected=[extra])
    missing = [c for c in cs if c.method == extra]
    assert len(missing) == 1 and missing[0].test.n == 0 and missing[0].mark == PENDING


def test_expected_methods_from_the_sweep_grids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the sweeps name their base configs relative to the repository
    got = expected_methods(SWEEPS, "deepctr", "synth1m")
    assert {(m.model, m.d, m.k) for m in got} == {("deepfm", d, d * kd) for d in (4, 16) for kd in (1, 4, 16)}


def test_interp_log_known_answers() -> None:
    pts = [(0.1, 0.60), (0.4, 0.64), (1.6, 0.62)]
    assert interp_log(pts, 0.2) == pytest.approx(0.62)  # log-midpoint of 0.1 and 0.4
    assert interp_log(pts, 0.8) == pytest.approx(0.63)
    assert interp_log(pts, 0.4) == pytest.approx(0.64)
    assert interp_log(pts, 1.6 * (1 + 1e-12)) == pytest.approx(0.62)  # float noise at the edge is inside
    assert interp_log(pts, 0.05) is None and interp_log(pts, 4.0) is None
    assert interp_log([], 1.0) is None


def test_lr_points_rescale_by_k_sigma_squared() -> None:
    pts = {p.eta: p for p in lr_points(dlrm_store())}
    assert pts[0.05].scale == pytest.approx(4.0)
    assert pts[0.05].base_test == pytest.approx(0.62) and pts[0.05].diff == pytest.approx(0.01)
    assert pts[1.0].base_test is None and pts[1.0].diff is None


def test_render_is_byte_identical_and_lists_losses(stores: Path, tmp_path: Path) -> None:
    first = render_families(stores, sweeps=[], plots=False)
    texts = {p.name: p.read_bytes() for p in first}
    assert render_families(stores, sweeps=[], plots=False) == first
    assert {p.name: p.read_bytes() for p in first} == texts
    other = tmp_path / "copy"
    shutil.copytree(stores, other, ignore=shutil.ignore_patterns("*.md"))
    render_families(other, sweeps=[], plots=False)
    assert {p.name: (other / p.name).read_bytes() for p in first} == texts  # nothing depends on the place

    models = texts["models.md"].decode()
    loses = models.split("## Where MLET loses")[1].split("##")[0]
    assert "d=4, MLET k=16" in loses and "k=32" not in loses and "k=4 " not in loses
    assert LR in models and WIN in models and GENERATED in models
    pooled = models.split("Pooled Δ AUC over cells")[1].split("##")[0]
    # three cells on two baselines (d=4: k=4 and k=16; d=8: k=32): two clusters
    assert "| all cells |" in pooled and "| 2 of 2 | hartung-knapp |" in pooled
    assert pooled.index("k = 1d") < pooled.index("k = 4d")  # groups in numeric order
    readme = texts["README.md"].decode()
    assert "| [models](models.md) | movielens |" in readme and "1 / 0 / 1 / 1" in readme
    assert "d=4, MLET k=16" in readme.split("Every significantly worse cell")[1]
    lr = texts["lr_equivalence.md"].decode()
    assert "outside grid" in lr and "0.6200" in lr


def test_refuses_a_file_it_did_not_write(stores: Path) -> None:
    (stores / "README.md").write_text("# hand-written notes\n")
    with pytest.raises(OutputError, match="did not write"):
        render_families(stores, sweeps=[], plots=False)
    assert (stores / "README.md").read_text() == "# hand-written notes\n"
    assert not (stores / "models.md").exists()  # checked before anything is written


def test_effective_rank_verdict_follows_the_spectra() -> None:
    from mlet_torchrec.experiments.family_tables import rank_rows, rank_verdict

    def store(mlet_rank: int) -> list[dict]:
        return [rec(8, None, s, 0.02, 0.7, 0.7, "grid", rank=6) for s in (0, 1)] + [
            rec(8, 32, s, 0.02, 0.7, 0.7, "grid", rank=mlet_rank) for s in (0, 1)
        ]

    rows = rank_rows(FAMILY["models"], store(2))
    assert [(m.k, a, b, n) for m, a, b, n in rows] == [(32, 2.0, 6.0, 2)]  # the largest table (t_a) counts
    assert "agrees with paper 003" in rank_verdict(rows)
    assert "contradicts paper 003" in rank_verdict(rank_rows(FAMILY["models"], store(8)))
    assert "neither" in rank_verdict(rank_rows(FAMILY["models"], store(6)))


def test_a_selected_seed_follows_seed_0s_current_choice() -> None:
    from mlet_torchrec.experiments.family_data import tuned

    # seed 0 first chose lr 0.02 (seed 1 ran there), then a wider grid found 0.005 better: seed 1's old run
    # is not the protocol's any more, so seed 1 is missing until it runs at 0.005
    seed0 = [rec(8, None, 0, lr, v, 0.7, "tune") for lr, v in ((0.02, 0.70), (0.005, 0.72))]
    old = rec(8, None, 1, 0.02, 0.99, 0.7, "selected")
    assert [(s, r["sparse_lr"]) for (_, s), r in tuned([*seed0, old]).items()] == [(0, 0.005)]
    new = rec(8, None, 1, 0.005, 0.60, 0.7, "selected")
    assert [(s, r["sparse_lr"]) for (_, s), r in tuned([*seed0, old, new]).items()] == [(0, 0.005), (1, 0.005)]
    full = [rec(8, None, 1, lr, v, 0.7, "tune") for lr, v in ((0.02, 0.8), (0.005, 0.6))]  # a full grid on seed 1
    assert [(s, r["sparse_lr"]) for (_, s), r in tuned([*seed0, *full]).items()] == [(0, 0.005), (1, 0.02)]


def test_a_choice_at_the_end_of_the_grid_is_flagged() -> None:
    from mlet_torchrec.experiments.family_data import edge_choices

    grid = (0.005, 0.02, 0.08)
    low = [rec(8, 32, 0, lr, 0.8 - lr, 0.7, "tune") for lr in grid]  # best at 0.005: lowest
    mid = [rec(8, None, 0, lr, 0.8 - abs(lr - 0.02), 0.7, "tune") for lr in grid]  # best at 0.02: inside
    assert {m.k: why for m, why in edge_choices([*low, *mid]).items()} == {32: "lowest (bound hit)"}
    high = [rec(4, None, 0, lr, 0.5 + lr, 0.7, "tune") for lr in grid]
    assert {m.d: why for m, why in edge_choices(high).items()} == {4: "highest (bound hit)"}
    # a sweep that may extend 2 steps past 0.08 (x4 each) has not reached its bound at 0.08, nor at 0.32
    extending = [{**r, "tune": {"sparse_optimizer.lr": list(grid)}, "extend": 2} for r in high]
    assert {m.d: why for m, why in edge_choices(extending).items()} == {4: "highest (1 not yet at the bound)"}
    top = {**extending[0], "key": "top", "sparse_lr": 1.28, "valid": {"auc": 0.9}}
    assert {m.d: why for m, why in edge_choices([*extending, top]).items()} == {4: "highest (bound hit)"}
    # the dense lr is checked the same way: the best of 0.005, 0.02, 0.08 is the highest
    dense = [{**rec(8, 32, 0, 0.02, 0.6 + lr, 0.7, "tune", dense_lr=lr), "key": f"dense{lr}"} for lr in grid]
    assert {m.k: why for m, why in edge_choices(dense, "dense_lr").items()} == {32: "highest (bound hit)"}
    assert edge_choices(dense) == {}  # one embedding lr: no grid of it
    diverged = {**rec(4, None, 0, 0.32, 0.0, 0.0, "tune"), "status": "diverged", "key": "div"}
    assert edge_choices([*high, diverged]) == {}  # 0.32 diverged: 0.08 is the largest stable lr, not an edge


def resplit_store(splits: int = 3) -> list[dict]:
    """Per split (its own data set, seed 0): baseline and MLET k=32 at d=8, each with a two-lr grid, test
    predictions on the split's 40 rows; MLET's chosen run ranks the rows better on every split."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(splits):
        y = np.arange(40) % 2
        noise = rng.normal(0, 1, 40)
        for k, sep in ((None, 0.5), (32, 2.0)):
            for lr, valid in ((0.005, 0.70), (0.02, 0.72 if k else 0.69)):
                r = rec(8, k, 0, lr, valid, 0.7 + 0.01 * (k is not None) + 0.001 * i, "tune")
                r["key"] += f"-split{i}"
                r["config"]["data"] = {"path": f"data/exp_criteo_split{i}"}
                r["test_predictions"] = encode_predictions(sep * y + noise, y)
                out.append(r)
    return out


def test_resplit_family_pairs_over_splits_with_delong_per_split(tmp_path: Path) -> None:
    root = tmp_path / "families"
    write(root, "resplit_criteo_sample", resplit_store())
    render_families(root, sweeps=[], plots=False)
    text = (root / "resplit.md").read_text()
    section = text.split("## criteo_sample")[1]
    row = next(ln for ln in section.splitlines() if ln.startswith("| deepfm | 1 | 8 | k=32"))
    assert "| 3/10 |" in row and "+0.0100 [+0.0100, +0.0100]" in row  # paired over the 3 splits
    delong = next(ln for ln in section.splitlines() if ln.startswith("| deepfm | 8 | k=32 (4d) | 3 |"))
    assert delong.endswith("| 3 of 3 |")  # sep 2.0 against 0.5 on 40 rows: DeLong rejects on every split
    # the choice per split: the baseline's lowest lr, MLET's highest, on each of the 3 splits (edges)
    edges = text.split("## Learning rates chosen at the edge of the grid")[1]
    assert "| baseline | lowest in 3 of 3 (bound hit) |" in edges and "highest in 3 of 3 (bound hit) |" in edges
    assert as_splits([{"seed": 0, "config": {"data": {"path": "data/exp_ml"}}}]) == []


def test_lr_mapping_rejects_the_4x_and_quarter_mappings_when_the_theorem_holds() -> None:
    """The baseline's test AUC is a peaked curve of log(lr); MLET (k·σ² = 4) at η scores exactly the baseline's
    curve at 4η (noise 0.001): the theorem's factor fits, 4x and 1/4x are rejected, and 1 is the best factor."""
    from mlet_torchrec.experiments.lr_mapping import FACTORS, mapping_errors, mapping_section

    def curve(lr: float) -> float:
        return 0.75 - 0.02 * math.log2(lr / 1.6) ** 2

    grid = [0.05 * 2**i for i in range(12)]  # 0.05 .. 102.4
    runs = [rec(4, None, 0, lr, curve(lr), curve(lr), "tune", 0.2, "dlrm") for lr in grid]
    rng = np.random.default_rng(0)
    for eta in [0.1 * 2 ** (i / 2) for i in range(10)]:
        auc = curve(4 * eta) + rng.normal(0, 0.001)
        runs.append(rec(4, 64, 0, eta, auc, auc, "tune", 0.2, "dlrm", sigma=0.25))
    family = FAMILY["lr_equivalence"]
    errs = {f: mapping_errors(family, runs, f) for f in FACTORS}
    assert max(errs[1.0].values()) < 0.01 and statistics.fmean(errs[4.0].values()) > 0.05
    text = "\n".join(mapping_section(family, {"movielens": runs}))
    rows = {ln.split("|")[1].strip(): ln for ln in text.splitlines() if ln.startswith("| ") and "factor" not in ln}
    assert rows["4"].endswith("| rejected |") and rows["0.25"].endswith("| rejected |")
    assert rows["1"].endswith("| theorem |") and "Best-fitting factor (smallest mean abs Δ test): 1." in text


def test_seed_reports_show_the_across_split_interval_of_the_cells_family_f_ran(tmp_path: Path) -> None:
    root = tmp_path / "families"
    write(root, "deepctr_criteo_sample", deepctr_store())
    write(root, "resplit_criteo_sample", resplit_store())
    render_families(root, sweeps=[], plots=False)
    models = (root / "models.md").read_text().split("## criteo_sample")[1]
    across = models.split("The same cells over random re-splits")[1].split("Pooled Δ")[0]
    row = next(ln for ln in across.splitlines() if ln.startswith("| deepfm | 1 | 8 |"))
    assert "MLET k=32 (4d, σ=0.5)" in row and "+0.0100 [+0.0100, +0.0100] n=3" in row
    assert "| deepfm | 1 | 4 |" not in across  # family (f) did not run d = 4
