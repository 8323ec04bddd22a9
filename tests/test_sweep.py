"""Fast tests of ``mlet sweep``'s pieces: the grid parser, cell planning and the resumable results store."""

import math

import pytest

from mlet_torchrec.config import ConfigError, load_config
from mlet_torchrec.experiments.analysis import _row_frequency
from mlet_torchrec.experiments.grid import budget_note, cell_key, expand_grid, parse_grid, plan_cells
from mlet_torchrec.experiments.stats import fmt, mean_std, paired_test, verdict
from mlet_torchrec.experiments.store import ResultsStore, load_results
from mlet_torchrec.experiments.sweep import SweepSettings, run_sweep


def test_parse_grid_reads_yaml_lists_none_and_aliases():
    g = parse_grid("embedding.d=[4, 8,16] k=[none, 16,64 ] seed=[0,1] lr=0.5 model.name=[dlrm,dcn]")
    assert g == {
        "embedding.d": [4, 8, 16],
        "embedding.k": [None, 16, 64],
        "train.seed": [0, 1],
        "sparse_optimizer.lr": [0.5],
        "model.name": ["dlrm", "dcn"],
    }
    assert parse_grid("k=[None] lr=[0.2,1.0e-1]") == {"embedding.k": [None], "sparse_optimizer.lr": [0.2, 0.1]}


def test_parse_grid_values_and_errors():
    g = parse_grid("embedding.d=[4,8] embedding.k=[none,16] seed=[0,1,2]")
    assert g == {"embedding.d": [4, 8], "embedding.k": [None, 16], "train.seed": [0, 1, 2]}
    assert parse_grid("") == {}
    assert parse_grid("model.name=[dlrm,dcn]") == {"model.name": ["dlrm", "dcn"]}
    with pytest.raises(ConfigError, match="repeats"):
        parse_grid("embedding.k=[none,null]")
    with pytest.raises(ConfigError, match="twice"):
        parse_grid("seed=[0] train.seed=[1]")
    with pytest.raises(ConfigError, match="cannot read"):
        parse_grid("embedding.d 4")
    assert len(expand_grid(g)) == 12
    assert expand_grid({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]


def test_plan_cells_tunes_only_the_baseline_and_dedups(tmp_path):
    grid = parse_grid("embedding.d=[4] embedding.k=[none,16,64] seed=[0,1]")
    tune = parse_grid("sparse_optimizer.lr=[0.2,0.8]")  # 0.2 is the default: the same run as the grid cell
    cells, _ = plan_cells(None, grid, tune, runs_dir=str(tmp_path))
    assert len(cells) == 2 * 3 + 2 * 1  # grid cells + one extra lr per baseline (d, seed)
    assert [c.role for c in cells].count("tune") == 2
    assert all(c.config.embedding.k is None for c in cells if c.role == "tune")
    assert len({c.key for c in cells}) == len(cells)
    assert all(c.config.run.dir.startswith(str(tmp_path)) for c in cells)
    assert "MLET 2 run(s)" in budget_note(grid, tune) and "tuned baseline 2 run(s)" in budget_note(grid, tune)
    assert budget_note(grid, {}).endswith("baseline 1 run, not tuned (no --tune axes)")  # not "value of nothing"


def test_cell_key_ignores_run_dir_and_logging_only():
    a = load_config(None, ["embedding.k=16", "run.dir=x", "train.progress=false"])
    b = load_config(None, ["embedding.k=16", "run.dir=y", "train.log_every=7"])
    c = load_config(None, ["embedding.k=16", "train.seed=1"])
    assert cell_key(a) == cell_key(b) != cell_key(c)


def test_store_appends_lines_and_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultsStore(path)
    store.append({"key": "a", "status": "ok", "x": 1})
    with open(path, "ab") as f:  # a writer killed mid-line
        f.write(b'{"key": "b", "sta')
    assert [r["key"] for r in load_results(path)] == ["a"]
    store.append({"key": "c", "status": "ok"})
    assert [r["key"] for r in load_results(path)] == ["a", "c"]
    assert store.done_keys() == {"a", "c"}
    # the torn line is cut before the next append: every line is complete, the half record is absent
    assert path.read_text().count("\n") == 2 and '"b"' not in path.read_text()


def test_sweep_skips_cells_already_in_the_store(tmp_path, monkeypatch, capsys):
    import mlet_torchrec.experiments.sweep as sweep

    trained = []

    def fake_cell(cell, s, work):
        trained.append(cell.key)
        if len(trained) == 3:
            raise RuntimeError("killed")  # an interrupted cell leaves no line
        return {"valid": {"auc": 0.5}, "test": {"auc": 0.5, "logloss": 0.7}}

    monkeypatch.setattr(sweep, "_run_cell_subprocess", fake_cell)
    s = SweepSettings(
        config=None,
        grid=parse_grid("embedding.k=[none,16] seed=[0,1]"),
        results=str(tmp_path / "r.jsonl"),
        runs_dir=str(tmp_path / "runs"),
    )
    first = run_sweep(s)
    assert first == {"planned": 4, "skipped": 0, "ran": 3, "failed": 1, "pending": 0}
    lines = load_results(tmp_path / "r.jsonl")
    assert len(lines) == 3 and all(r["status"] == "ok" for r in lines)
    assert {"key", "config", "overrides", "d", "k", "seed", "role", "test", "budget"} <= set(lines[0])
    trained.clear()
    second = run_sweep(s)
    assert second == {"planned": 4, "skipped": 3, "ran": 1, "failed": 0, "pending": 0}
    assert len(trained) == 1
    assert len(load_results(tmp_path / "r.jsonl")) == 4
    assert run_sweep(s)["skipped"] == 4


class _Jagged:
    def __init__(self, values, lengths):
        self._v, self._l = values, lengths

    def values(self):
        return self._v

    def lengths(self):
        return self._l


class _FakeKJT:  # the two methods _row_frequency uses; importing torchrec here costs a minute on a busy machine
    def __init__(self, d):
        self._d = d

    def to_dict(self):
        return self._d


def test_row_frequency_is_the_min_over_features():
    import torch

    t = torch.tensor
    kjt = _FakeKJT({"a": _Jagged(t([0, 1]), t([1, 1])), "b": _Jagged(t([2, 0]), t([2, 0]))})
    counts = {"a": t([5, 7, 1]), "b": t([3, 9, 4])}
    # row 0: a id0 (5), b ids {2, 0} (4, 3) -> 3; row 1: a id1 (7), b empty bag (skipped) -> 7
    assert _row_frequency(kjt, counts, 2).tolist() == [3, 7]


def test_report_helpers():
    assert mean_std([1.0, 3.0])[:2] == (2.0, pytest.approx(2**0.5))
    assert fmt([0.5, 0.7]) == "0.6000 ± 0.1414"
    assert fmt([0.5]) == "0.5000" and fmt([]) == "–"
    assert verdict(paired_test([0.01, 0.011, 0.012])).startswith("MLET better")
    assert verdict(paired_test([0.01, -0.01, 0.002])).startswith("within noise")
    assert verdict(paired_test([-0.01, -0.011, -0.012])).startswith("MLET worse")


def test_plan_cells_with_tune_mlet_tunes_every_method_alike(tmp_path):
    grid = parse_grid("embedding.d=[4] embedding.k=[none,16,64] seed=[0]")
    tune = parse_grid("sparse_optimizer.lr=[0.8,3.2]")
    cells, _ = plan_cells(None, grid, tune, runs_dir=str(tmp_path), tune_mlet=True)
    per_k = {
        k: sorted(c.config.sparse_optimizer.lr for c in cells if c.config.embedding.k == k) for k in (None, 16, 64)
    }
    assert per_k == {None: [0.2, 0.8, 3.2], 16: [0.2, 0.8, 3.2], 64: [0.2, 0.8, 3.2]}
    assert "the same 2 tuning run(s)" in budget_note(grid, tune, tune_mlet=True)


def test_a_diverged_cell_is_recorded_and_skipped_on_rerun(tmp_path, monkeypatch):
    import mlet_torchrec.experiments.cell as cell
    from mlet_torchrec.training.guardrails import TrainingDiverged

    calls = []

    def fake_here(config, *args, **kwargs):
        calls.append(config.embedding.k)
        if config.embedding.k is not None:
            raise TrainingDiverged("training loss became nan at step 3")
        return {"valid": {"auc": 0.5}, "test": {"auc": 0.5, "logloss": 0.7}}

    monkeypatch.setattr(cell, "_measure_cell", fake_here)
    s = SweepSettings(
        config=None,
        grid=parse_grid("embedding.k=[none,16]"),
        results=str(tmp_path / "r.jsonl"),
        runs_dir=str(tmp_path / "runs"),
        nproc=1,
        in_process=True,
    )
    assert run_sweep(s) == {"planned": 2, "skipped": 0, "ran": 2, "failed": 0, "pending": 0}
    lines = sorted(load_results(tmp_path / "r.jsonl"), key=lambda r: r["status"])
    assert [(r["k"], r["status"]) for r in lines] == [(16, "diverged"), (None, "ok")]
    assert "nan at step 3" in lines[0]["error"] and "test" not in lines[0]
    assert run_sweep(s)["skipped"] == 2 and calls == [None, 16]


def test_kd_axis_sets_k_per_d_and_the_baseline_ignores_sigma(tmp_path):
    grid = parse_grid("d=[4,8] kd=[none,0.5,4] embedding.sigma=[0.1,0.5]")
    cells, pending = plan_cells(None, grid, {}, runs_dir=str(tmp_path))
    got = sorted((c.config.embedding.d, c.config.embedding.k or 0, c.config.embedding.sigma) for c in cells)
    base_sigma = cells[0].config.embedding.sigma  # the baseline keeps the config's sigma: one run per d
    assert pending == 0
    assert got == sorted(
        [(4, 0, base_sigma), (8, 0, base_sigma)]
        + [(d, k, s) for d in (4, 8) for k in (d // 2, 4 * d) for s in (0.1, 0.5)]
    )
    low = [c for c in cells if c.config.embedding.k is not None and c.config.embedding.k < c.config.embedding.d]
    assert low and all(c.config.embedding.allow_k_below_d for c in low)
    with pytest.raises(ConfigError, match="whole inner dimension"):
        plan_cells(None, parse_grid("d=[3] kd=[0.5]"), {}, runs_dir=str(tmp_path))


def _finished(cell, valid_auc):
    return {
        "key": cell.key,
        "status": "ok",
        "overrides": cell.overrides,
        "seed": cell.config.train.seed,
        "config": cell.config.model_dump(mode="json"),
        "valid": {"auc": valid_auc},
    }


def test_tune_seeds_tune_once_then_run_other_seeds_at_the_validation_choice(tmp_path):
    grid = parse_grid("seed=[0,1,2] d=[4] k=[none,16]")
    tune = parse_grid("lr=[0.1,1.0] dense_lr=[0.05,0.2]")
    cells, pending = plan_cells(None, grid, tune, runs_dir=str(tmp_path), tune_mlet=True, tune_seeds=[0])
    assert {c.config.train.seed for c in cells} == {0} and pending == 4  # seeds 1, 2 x two methods wait
    # validation AUC peaks at lr 1.0 / dense 0.05 for the baseline and lr 0.1 / dense 0.2 for MLET
    best = {None: (1.0, 0.05), 16: (0.1, 0.2)}
    records = [
        _finished(
            c,
            0.9 if (c.config.sparse_optimizer.lr, c.config.dense_optimizer.lr) == best[c.config.embedding.k] else 0.6,
        )
        for c in cells
    ]
    cells2, pending2 = plan_cells(
        None, grid, tune, runs_dir=str(tmp_path), tune_mlet=True, tune_seeds=[0], records=records
    )
    selected = [c for c in cells2 if c.role == "selected"]
    assert pending2 == 0 and len(selected) == 4
    for c in selected:
        assert c.config.train.seed in (1, 2)
        assert (c.config.sparse_optimizer.lr, c.config.dense_optimizer.lr) == best[c.config.embedding.k]
    assert {c.key for c in cells} <= {c.key for c in cells2}  # pass 2 keeps pass 1's keys: a resume skips them


def test_sweep_with_tune_seeds_runs_both_passes(tmp_path, monkeypatch):
    import mlet_torchrec.experiments.sweep as sweep

    def fake_cell(cell, s, work):
        lr = cell.config.sparse_optimizer.lr
        return {"valid": {"auc": 0.5 + lr / 10}, "test": {"auc": 0.5}, "steps": 1}

    monkeypatch.setattr(sweep, "_run_cell_subprocess", fake_cell)
    s = SweepSettings(
        config=None,
        grid=parse_grid("seed=[0,1] d=[4] k=[none,16]"),
        tune=parse_grid("lr=[0.1,1.0]"),
        tune_mlet=True,
        tune_seeds=[0],
        results=str(tmp_path / "r.jsonl"),
        runs_dir=str(tmp_path / "runs"),
        nproc=1,
    )
    counts = run_sweep(s)
    recs = load_results(tmp_path / "r.jsonl")
    seed1 = [r for r in recs if r["seed"] == 1]
    assert counts["failed"] == 0 and counts["pending"] == 0
    assert len(seed1) == 2 and all(r["role"] == "selected" and r["sparse_lr"] == 1.0 for r in seed1)
    assert run_sweep(s)["ran"] == 0  # resumed: nothing left


def test_a_widened_tuning_grid_reruns_the_other_seeds_at_the_new_choice(tmp_path, monkeypatch):
    import mlet_torchrec.experiments.sweep as sweep

    def fake_cell(cell, s, work):
        lr = cell.config.sparse_optimizer.lr
        return {"valid": {"auc": 0.5 + lr / 100}, "test": {"auc": 0.5}, "steps": 1}

    monkeypatch.setattr(sweep, "_run_cell_subprocess", fake_cell)

    def settings(tune: str) -> SweepSettings:
        return SweepSettings(
            config=None,
            grid=parse_grid("seed=[0,1] d=[4] k=[none]"),
            tune=parse_grid(tune),
            tune_mlet=True,
            tune_seeds=[0],
            results=str(tmp_path / "r.jsonl"),
            runs_dir=str(tmp_path / "runs"),
            nproc=1,
        )

    run_sweep(settings("lr=[0.1,1.0]"))
    counts = run_sweep(settings("lr=[0.1,1.0,4.0]"))  # 4.0 wins on seed 0: seed 1 must run there too
    seed1 = sorted(r["sparse_lr"] for r in load_results(tmp_path / "r.jsonl") if r["seed"] == 1)
    assert seed1 == [1.0, 4.0] and counts["ran"] == 2


def test_tuning_runs_of_another_sweep_with_the_same_config_count(tmp_path):
    # sweep A tuned d=4 without an epochs axis; sweep B has train.epochs=[1]: the same runs, other overrides
    tune = parse_grid("lr=[0.1,1.0]")
    a, _ = plan_cells(None, parse_grid("seed=[0] d=[4]"), tune, runs_dir=str(tmp_path), tune_mlet=True, tune_seeds=[0])
    records = [_finished(c, 0.5 + c.config.sparse_optimizer.lr / 10) for c in a]
    b, pending = plan_cells(
        None,
        parse_grid("seed=[0,1] d=[4] train.epochs=[1]"),
        tune,
        runs_dir=str(tmp_path),
        tune_mlet=True,
        tune_seeds=[0],
        records=records,
    )
    selected = [c for c in b if c.role == "selected"]
    assert pending == 0 and [c.config.sparse_optimizer.lr for c in selected] == [1.0]


def test_extend_grid_grows_each_seeds_grid_past_the_edge_up_to_the_bound(tmp_path, monkeypatch):
    """Validation AUC peaks at lr 0.025 for the baseline (one step below the grid: found, then inside) and keeps
    rising towards 0 for MLET (two steps below, then the bound); every seed tunes on its own grid."""
    import mlet_torchrec.experiments.sweep as sweep
    from mlet_torchrec.experiments.family_data import edge_choices

    def fake_cell(cell, s, work):
        lr, k = cell.config.sparse_optimizer.lr, cell.config.embedding.k
        valid = -abs(math.log(lr / 0.025)) if k is None else -lr
        return {"valid": {"auc": 0.7 + valid / 100}, "test": {"auc": 0.5}, "steps": 1}

    monkeypatch.setattr(sweep, "_run_cell_subprocess", fake_cell)
    s = SweepSettings(
        config=None,
        grid=parse_grid("seed=[0,1] d=[4] k=[none,16]"),
        tune=parse_grid("lr=[0.1,0.4,1.6] dense_lr=[0.1,0.2]"),
        tune_mlet=True,
        results=str(tmp_path / "r.jsonl"),
        runs_dir=str(tmp_path / "runs"),
        nproc=1,
        extend=2,
    )
    assert run_sweep(s)["failed"] == 0
    recs = load_results(tmp_path / "r.jsonl")
    for seed in (0, 1):
        base = sorted({r["sparse_lr"] for r in recs if r["seed"] == seed and r["k"] is None})
        mlet = sorted({r["sparse_lr"] for r in recs if r["seed"] == seed and r["k"] == 16})
        # 0.2 is the config's lr (the grid run); 0.025 won: one more step below shows it inside
        assert base == pytest.approx([0.00625, 0.025, 0.1, 0.2, 0.4, 1.6])
        assert mlet == pytest.approx([0.00625, 0.025, 0.1, 0.2, 0.4, 1.6])  # still rising at 0.00625: the bound
    assert all(r["extend"] == 2 for r in recs)
    assert {m.k: why for m, why in edge_choices(recs).items()} == {16: "lowest in 2 of 2 (bound hit)"}
    assert run_sweep(s)["ran"] == 0  # resumed: nothing left to extend
