"""The experiment families' runner (``mlet results``): workers share the sweeps without ever running two sweeps
of one store at once, stale claims are taken over, the sweep list is sound, and the data step skips what it
cannot make. No training: ``run_sweep`` is faked."""

from __future__ import annotations

import _thread
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mlet_torchrec.cli.main import main
from mlet_torchrec.config import load_config
from mlet_torchrec.experiments import families
from mlet_torchrec.experiments.cell_pool import CellPool, CellPoolBroken
from mlet_torchrec.experiments.families import SWEEPS, FamilySweep
from mlet_torchrec.experiments.grid import plan_cells

ROOT = Path(__file__).resolve().parents[1]


def _mlet(capsys, *argv: str) -> tuple:
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped (not reused within a test)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def fake_sweeps(tmp_path, monkeypatch) -> list[FamilySweep]:
    """Three small sweeps over two stores under tmp_path, on a tiny config whose data set is tmp_path/data/x."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  path: {tmp_path / 'data' / 'x'}\n")
    monkeypatch.setattr(families, "ROOT", str(tmp_path / "families"))
    monkeypatch.setattr(families, "DATASETS", {"fake": (str(cfg), str(cfg), None)})
    fakes = [
        FamilySweep("a1", "fake", "deepctr", "seed=[0,1] d=[4] kd=[none,1]", "lr=[0.01,0.02]"),
        FamilySweep("b1", "fake", "dlrm_sgd", "seed=[0] d=[4] k=[none]", "lr=[0.1]"),
        FamilySweep("a2", "fake", "deepctr", "seed=[0] d=[8] kd=[none]", "lr=[0.01]"),
    ]
    monkeypatch.setattr(families, "SWEEPS", fakes)
    monkeypatch.setattr(families, "DATA_COMMANDS", [])
    return fakes


# ----------------------------------------------------------------------------------- workers and claims


def test_two_workers_run_each_sweep_once_and_never_one_store_twice_at_once(tmp_path, monkeypatch, fake_sweeps):
    calls: list[str] = []
    active: dict[str, int] = {}
    overlaps: list[str] = []
    lock = threading.Lock()

    def fake_run_sweep(settings, pool=None):
        with lock:
            calls.append(settings.results)
            active[settings.results] = active.get(settings.results, 0) + 1
            if active[settings.results] > 1:
                overlaps.append(settings.results)
        time.sleep(0.2)
        with lock:
            active[settings.results] -= 1
        return {"failed": 1 if settings.results.endswith("dlrm_sgd_fake/results.jsonl") else 0}

    monkeypatch.setattr(families, "run_sweep", fake_run_sweep)
    monkeypatch.setattr(families, "POLL_S", 0.05)
    claims = tmp_path / "claims"
    failed: list[int] = []
    threads = [
        threading.Thread(target=lambda: failed.append(families.work(list(fake_sweeps), claims))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    stores = [s.store for s in fake_sweeps]
    assert sorted(calls) == sorted(stores)  # every sweep exactly once (a1 and a2 share a store)
    assert not overlaps, overlaps
    assert sum(failed) == 1  # b1's one failed cell, counted by whichever worker ran it
    left = {p.name for p in claims.iterdir()}
    assert left == {".lock", "a1.done", "b1.done", "a2.done"}  # every claim released, every sweep marked done


def test_run_families_runs_again_what_an_earlier_call_marked_done(tmp_path, monkeypatch, fake_sweeps):
    ran = []
    monkeypatch.setattr(
        families, "run_sweep", lambda settings, pool=None: ran.append(settings.results) or {"failed": 0}
    )
    claims = tmp_path / "claims"
    claims.mkdir()
    (claims / "a1.done").touch()  # an earlier `mlet results run`
    assert families.run_families(["a1"], jobs=1, claims=str(claims)) == 0
    assert ran == [fake_sweeps[0].store]
    assert families.work([fake_sweeps[0]], claims) == 0 and len(ran) == 1  # within one call: not again


def test_claim_takes_over_a_dead_pid_and_refuses_a_live_one(tmp_path):
    claim = tmp_path / "claims" / "store"
    claim.parent.mkdir()
    claim.write_text(str(_dead_pid()))
    assert families._claim(claim)
    assert claim.read_text() == str(os.getpid())
    claim.write_text(str(os.getppid()))  # a live process holds it
    assert not families._claim(claim)
    assert claim.read_text() == str(os.getppid())
    claim.unlink()
    assert families._claim(claim) and not families._claim(claim)  # our own claim is held too


# ----------------------------------------------------------------------------------- the shared cell pool


def fake_cell(config, nproc, freq_features, compression=True):
    """Stands in for training in a pool worker (importable there): logs its pid and time span beside the store;
    the first cell waits (up to 60 s) until a second one has started, so 2 workers must run 2 cells at once."""
    log_dir = Path(os.environ["FAKE_CELL_LOG"])
    Path(config.run.dir).mkdir(parents=True)  # as training does; the sweep removes it after the cell
    if os.environ.get("FAKE_CELL_DIE") and config.train.seed == 1:
        os._exit(3)  # a worker killed mid-cell
    if "dlrm_sgd" in config.run.dir:
        raise ValueError("this store's cells fail")
    start = time.time()
    (log_dir / f"{os.getpid()}-{start}.start").touch()
    while len(list(log_dir.glob("*.start"))) < 2 and time.time() - start < 60:
        time.sleep(0.02)
    time.sleep(float(os.environ.get("FAKE_CELL_SLEEP", "0.1")))
    (log_dir / f"{os.getpid()}-{start}-{time.time()}.span").touch()
    lr = config.sparse_optimizer.lr
    auc = 0.7 - abs(lr - 0.02)  # best inside the grid once it has grown past 0.02
    return {"valid": {"auc": auc}, "test": {"auc": auc, "logloss": 0.5}}


@pytest.fixture
def pooled(tmp_path, monkeypatch, fake_sweeps):
    """``run_families`` with a real pool of spawned workers that run :func:`fake_cell`; returns the span log."""
    monkeypatch.chdir(tmp_path)
    log_dir = tmp_path / "cell_log"
    log_dir.mkdir()
    monkeypatch.setenv("FAKE_CELL_LOG", str(log_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(families, "CellPool", lambda workers: CellPool(workers, fn=fake_cell))
    return log_dir


def _run_dirs_left(tmp_path: Path) -> list[str]:
    runs = tmp_path / "runs" / "exp" / "families"  # RUNS/<setup>_<dataset>/<key> (pooled chdirs to tmp_path)
    return sorted(str(p.relative_to(runs)) for p in runs.glob("*/*"))


def _spans(log_dir: Path) -> list[tuple[int, float, float]]:
    return [tuple(map(float, p.stem.split("-"))) for p in log_dir.glob("*.span")]  # type: ignore[misc]


def _most_at_once(spans) -> int:
    edges = sorted([(t0, 1) for _, t0, _ in spans] + [(t1, -1) for _, _, t1 in spans])
    now = most = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def test_one_store_left_fills_both_workers(tmp_path, pooled, fake_sweeps):
    """The last store with runs left used to run in one worker while the other idled: now both train its cells."""
    assert families.run_families(["a1"], jobs=2, claims=str(tmp_path / "claims")) == 0
    records = [json.loads(line) for line in Path(fake_sweeps[0].store).read_text().splitlines()]
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) > 8  # each cell once; the grid grew past its end (more than the 8 planned)
    spans = _spans(pooled)
    assert len(spans) == len(records) and len({pid for pid, _, _ in spans}) == 2
    assert _most_at_once(spans) == 2  # never more cells at once than workers
    assert {p.name for p in (tmp_path / "claims").iterdir()} == {".lock", "a1.done"}
    assert not _run_dirs_left(tmp_path)


def test_stores_share_the_pool_and_a_failing_cell_is_counted(tmp_path, pooled, fake_sweeps):
    failed = families.run_families(None, jobs=2, claims=str(tmp_path / "claims"))
    assert failed == 2  # b1's two cells (its grid run and its one tuning run) raised; the other stores' ran
    for sweep in (fake_sweeps[0], fake_sweeps[2]):  # a1 and a2 share a store: each of its keys once
        keys = [json.loads(line)["key"] for line in Path(sweep.store).read_text().splitlines()]
        assert len(keys) == len(set(keys))
    assert not Path(fake_sweeps[1].store).exists()
    assert _most_at_once(_spans(pooled)) == 2
    assert {p.name for p in (tmp_path / "claims").iterdir()} == {".lock", "a1.done", "b1.done", "a2.done"}


def test_a_dead_worker_stops_the_run_with_one_message(tmp_path, pooled, fake_sweeps, monkeypatch):
    monkeypatch.setenv("FAKE_CELL_DIE", "1")
    with pytest.raises(CellPoolBroken, match="rerun it to resume"):
        families.run_families(["a1"], jobs=2, claims=str(tmp_path / "claims"))
    store = Path(fake_sweeps[0].store)
    for line in store.read_text().splitlines() if store.exists() else []:
        assert json.loads(line)["seed"] == 0  # whatever finished is whole; seed 1's cells never finished
    assert not (tmp_path / "claims" / "a1.done").exists()
    assert not _run_dirs_left(tmp_path)  # the dead worker's cell leaves no run dir behind (a rerun trains it again)


def _nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def test_a_cells_time_is_its_time_in_the_worker_not_its_wait_for_one():
    times: list[tuple[float, float]] = []
    together = threading.Barrier(3)

    def one() -> None:
        together.wait(timeout=60)  # the three cells are submitted at once
        start = time.perf_counter()
        _, seconds = pool.run(0.5)
        times.append((seconds, time.perf_counter() - start))

    with CellPool(1, fn=_nap) as pool:
        pool.run(0.0)  # the worker is up
        threads = [threading.Thread(target=one) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert len(times) == 3 and all(0.5 <= seconds < 0.9 for seconds, _ in times)
    assert max(waited for _, waited in times) >= 1.2  # the last waited for the other two (1.5 s, less any skew)


def test_ctrl_c_stops_the_workers_quietly_and_releases_the_claims(tmp_path, pooled, fake_sweeps, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_CELL_SLEEP", "2")  # 8 cells of 2 s on 2 workers: still running at the Ctrl-C
    claims = tmp_path / "claims"
    timer = threading.Timer(3.0, _thread.interrupt_main)  # what a Ctrl-C raises in the main thread
    # Python's own Ctrl-C handler, as in `mlet results run` (a plugin or an earlier test may have set another)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            families.run_families(["a1"], jobs=2, claims=str(claims))
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert "FAILED" not in capsys.readouterr().out  # a cell the stop cut short is not a failed cell
    assert {p.name for p in claims.iterdir()} == {".lock"}  # the claim released, the sweep not marked done
    store = Path(fake_sweeps[0].store)
    keys = [json.loads(line)["key"] for line in store.read_text().splitlines()] if store.exists() else []
    assert len(keys) == len(set(keys)) < 8
    assert not _run_dirs_left(tmp_path)  # nor do the cells the stop cut short


# ----------------------------------------------------------------------------------- the real sweep list


def test_sweep_names_are_unique_and_every_config_and_grid_loads():
    names = [s.name for s in SWEEPS]
    assert len(names) == len(set(names))
    planned: set[tuple[str, str]] = set()
    for s in SWEEPS:
        assert (ROOT / s.config).is_file(), s.config
        load_config(str(ROOT / s.config), list(s.overrides))
        st = s.settings()
        assert st.tune_seeds is None and st.extend == families.EXTEND, s.name  # every seed tunes, grids extend
        assert all(len(v) >= 3 for v in st.tune.values()), s.name  # no axis whose every choice is an edge
        if (s.setup, s.dataset) in planned:  # one plan per (setup, data set) keeps this test fast
            continue
        planned.add((s.setup, s.dataset))
        grid = {**st.grid, "train.seed": st.grid["train.seed"][:1]}  # the plan's rules do not depend on seeds
        cells, pending = plan_cells(
            str(ROOT / s.config), grid, st.tune, st.base_overrides, "runs/x", st.tune_mlet, st.tune_seeds, []
        )
        assert cells and all(c.role in ("grid", "tune") for c in cells) and pending == 0, s.name
        if s.setup == "resplit":  # one seed per split, each split tuned on its own validation rows
            assert {c.config.data.path for c in cells} == set(families._data_paths(s)), s.name


def test_data_commands_name_their_output_and_inputs():
    made: set[str] = set()
    for command in families.DATA_COMMANDS:
        out, inputs = families.data_command_paths(command)
        assert out.startswith("data/"), command
        assert all(p.startswith("../shared/data/") or p in made for p in inputs), command  # raw, or made above
        made.add(out)
    for s in SWEEPS:  # every data set a sweep reads is made by a line
        assert set(families._data_paths(s)) <= made, s.name


# ----------------------------------------------------------------------------------- CLI


def test_results_list_prints_one_line_per_sweep(capsys, fake_sweeps):
    rc, out, _ = _mlet(capsys, "results", "list")
    lines = out.splitlines()
    assert rc == 0 and len(lines) == len(fake_sweeps)
    for line, s in zip(lines, fake_sweeps, strict=True):
        assert line.startswith(s.name + " ") and s.store in line and s.grid in line and s.tune in line


def test_results_run_dry_run_counts_planned_done_and_to_run(capsys, tmp_path, fake_sweeps, monkeypatch):
    (tmp_path / "data" / "x").mkdir(parents=True)
    a1 = fake_sweeps[0]
    st = a1.settings()
    cells, _ = plan_cells(st.config, st.grid, st.tune, st.base_overrides, "r", True, None, [])
    Path(a1.store).parent.mkdir(parents=True)
    from mlet_torchrec.experiments.store import ResultsStore

    store = ResultsStore(a1.store)
    store.append({"key": cells[0].key, "status": "ok", "seed": 0})
    store.append({"key": cells[1].key, "status": "failed", "seed": 0})  # a failed run is still to run
    monkeypatch.setattr(families, "run_families", lambda *a, **k: pytest.fail("--dry-run must not run sweeps"))
    rc, out, _ = _mlet(capsys, "results", "run", "a1", "b1", "--dry-run")
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 2
    assert (
        lines[0]
        == f"a1 -> {a1.store}: {len(cells)} planned, 1 done, {len(cells) - 1} to run"  # every seed tunes: none wait
    )
    assert lines[1].startswith(f"b1 -> {fake_sweeps[1].store}: 2 planned, 0 done, 2 to run")
    assert not Path(fake_sweeps[1].store).exists()  # nothing written


def test_results_run_passes_the_sweeps_and_jobs_on(capsys, tmp_path, fake_sweeps, monkeypatch):
    (tmp_path / "data" / "x").mkdir(parents=True)
    seen = []
    monkeypatch.setattr(families, "run_families", lambda names, jobs: seen.append((names, jobs)) or 0)
    rc, _, _ = _mlet(capsys, "results", "run", "--jobs", "3")
    assert rc == 0 and seen == [(["a1", "b1", "a2"], 3)]
    rc, _, err = _mlet(capsys, "results", "run", "nope")
    assert rc == 2 and "unknown sweep(s) ['nope']" in err


def test_results_report_renders_the_families_and_the_three_older_reports(capsys, monkeypatch):
    import types

    from mlet_torchrec.experiments import report

    rendered = []
    fake = types.ModuleType("mlet_torchrec.experiments.family_report")
    fake.render_families = lambda: [Path("docs/results/families/report.md")]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mlet_torchrec.experiments.family_report", fake)
    monkeypatch.setattr(report, "render_report", lambda store, out: rendered.append((store, out)) or f"{out}/r.md")
    rc, out, _ = _mlet(capsys, "results", "report")
    assert rc == 0
    assert rendered == [
        (f"docs/results/{n}/results.jsonl", f"docs/results/{n}") for n in ("synth1m", "movielens", "criteo_sample")
    ]
    assert out.splitlines()[0] == "wrote docs/results/families/report.md"


# ----------------------------------------------------------------------------------- data step


def test_prepare_data_skips_a_sweep_whose_raw_input_is_missing(capsys, tmp_path, monkeypatch, fake_sweeps):
    out_dir = tmp_path / "data" / "x"
    missing = tmp_path / "shared" / "train.tsv"
    monkeypatch.setattr(families, "DATA_COMMANDS", [f"mlet convert criteo --input {missing} --output {out_dir}"])
    made = []
    monkeypatch.setattr(families, "_make_data", made.append)
    assert families.prepare_data(["a1", "b1"]) == ["a1", "b1"]
    out = capsys.readouterr().out.splitlines()
    assert out == [f"results: skipping a1, b1: missing {missing} (the raw files of {out_dir})"]
    assert not made
    # the CLI says so and runs nothing else (all skipped), exit 0
    monkeypatch.setattr(families, "run_families", lambda *a, **k: pytest.fail("nothing to run"))
    rc, out, _ = _mlet(capsys, "results", "run")
    assert rc == 0 and "skipping a1, b1, a2" in out and "no sweep to run" in out


def test_prepare_data_makes_a_missing_data_set_once_and_leaves_an_existing_one(
    capsys, tmp_path, monkeypatch, fake_sweeps
):
    out_dir = tmp_path / "data" / "x"
    command = (
        f"mlet synth --output {out_dir} rows=400 num_dense=1 num_sparse=2 min_cardinality=4 max_cardinality=20"
        " row_group_size=128 seed=0"
    )
    monkeypatch.setattr(families, "DATA_COMMANDS", [command])
    assert families.prepare_data(None, dry_run=True) == []
    assert capsys.readouterr().out.startswith(f"results: would make {out_dir}: mlet synth")
    assert not out_dir.exists()
    assert families.prepare_data(None) == []
    assert (out_dir / "metadata.json").is_file()
    stamp = (out_dir / "metadata.json").stat().st_mtime_ns
    assert families.prepare_data(None) == []
    assert (out_dir / "metadata.json").stat().st_mtime_ns == stamp  # left alone


def test_prepare_data_pools_then_splits_and_skips_the_chain_when_its_raw_file_is_missing(
    capsys, tmp_path, monkeypatch, fake_sweeps
):
    raw = [tmp_path / "shared" / f"{n}.tsv" for n in ("train", "test")]
    pooled, split = tmp_path / "data" / "pooled.tsv", tmp_path / "data" / "x"
    inputs = " ".join(f"--input {p}" for p in raw)
    commands = [f"pool {inputs} --output {pooled}", f"mlet convert criteo --input {pooled} --seed 3 --output {split}"]
    monkeypatch.setattr(families, "DATA_COMMANDS", commands)
    made: list[str] = []
    monkeypatch.setattr(families, "_make_data", made.append)
    assert families.prepare_data(["a1"]) == ["a1"]  # the raw files are missing: the split cannot be made either
    assert capsys.readouterr().out.splitlines() == [
        f"results: skipping a1: missing {raw[0]}, {raw[1]} (the raw files of {pooled})"
    ]
    raw[0].parent.mkdir(parents=True)
    raw[0].write_text("0\t1\n1\t2")  # no newline at the end: pooling adds one
    raw[1].write_text("1\t3\n")
    assert families.prepare_data(["a1"]) == [] and made == commands  # in order: the pool, then the split
    families.pool_files([str(p) for p in raw], str(pooled))
    assert pooled.read_text() == "0\t1\n1\t2\n1\t3\n"


def test_prepare_data_skips_a_data_set_no_command_makes(capsys, fake_sweeps):
    assert families.prepare_data(["b1"]) == ["b1"]
    assert "DATA_COMMANDS does not make it" in capsys.readouterr().out
