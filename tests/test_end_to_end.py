"""The demo's pieces end to end on a tiny data set: synth -> train (2 ranks) -> collapse -> evaluate."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipes.synth import SynthConfig, generate
from mlet_torchrec.experiments.demo import run_demo

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _mlet(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "mlet_torchrec.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mlet {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "data"
    # small tables, so that three epochs of a few thousand rows learn the planted signal
    generate(
        SynthConfig(
            rows=8000, num_dense=4, num_sparse=4, min_cardinality=5, max_cardinality=200, row_group_size=512, seed=2
        ),
        out,
        progress=False,
    )
    return out


def test_cli_train_collapse_evaluate(tiny_data, tmp_path):
    run = tmp_path / "run"
    trained = _mlet(
        "train",
        "--config",
        "tiny",
        "--input",
        str(tiny_data),
        "--output",
        str(run),
        "train.epochs=3",
        "train.progress=true",  # the default of every other config: a bar on a terminal only, not here
        "--nproc-per-node",
        "2",
    )
    assert "deprecated and goes in the next release" not in trained.stderr  # the current flag vocabulary
    # log lines say when, which rank and what level; at the default level nothing warns and no bar is drawn
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} rank0 INFO mlet\.", trained.stderr, re.MULTILINE)
    assert "WARNING" not in trained.stderr and "Warning" not in trained.stderr, trained.stderr
    assert "step/s" not in trained.stderr and len(trained.stderr.splitlines()) <= 4, trained.stderr  # split, 3 epochs
    # a short summary for a person; every figure in metrics.json (and on stdout with --json)
    summary = trained.stdout.splitlines()
    assert 3 <= len(summary) <= 10 and summary[0].startswith("trained ") and "{" not in trained.stdout, summary
    assert any(line.split()[:2] == ["test:", "AUC"] for line in summary), summary
    assert summary[-1].startswith(f"every figure: {run / 'metrics.json'}"), summary
    for name in ("config.yaml", "plan.json", "metrics.jsonl", "metrics.json", "checkpoints/LATEST"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] > 0
    # the planted signal is learnt: test LogLoss below the label-entropy bar
    assert metrics["test"]["logloss"] < metrics["test"]["label_entropy"]

    out = _mlet("collapse", "--input", str(run), "--output", str(tmp_path / "collapsed"))
    assert "max |p_collapsed - p_factored|" in out.stdout
    report = json.loads((tmp_path / "collapsed" / "collapse_report.json").read_text())
    assert report["max_abs_diff"] <= 1e-5 and report["rows_checked"] == metrics["test"]["rows"]
    manifest = json.loads((tmp_path / "collapsed" / "manifest.json").read_text())
    assert {t["d"] for t in manifest["tables"].values()} == {4} and {t["k"] for t in manifest["tables"].values()} == {
        16
    }

    scored = _mlet("evaluate", "--input", str(run)).stdout.splitlines()  # names the model, split and data set
    assert len(scored) == 2 and scored[0].endswith(
        f"on the test split of {tiny_data} ({metrics['test']['rows']:,} rows):"
    )
    factored = json.loads(_mlet("evaluate", "--input", str(run), "--json").stdout)
    collapsed = json.loads(_mlet("evaluate", "--input", str(tmp_path / "collapsed"), "--json").stdout)
    assert abs(factored["auc"] - metrics["test"]["auc"]) < 1e-6
    assert abs(factored["auc"] - collapsed["auc"]) < 1e-5 and abs(factored["logloss"] - collapsed["logloss"]) < 1e-5

    # refusing to overwrite, and a clear one-line error for a bad override
    again = _mlet("collapse", "--input", str(run), "--output", str(tmp_path / "collapsed"), check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr and len(again.stderr.splitlines()) == 1
    bad = _mlet("train", "--config", "configs/tiny.yaml", "embedding.k=2", check=False)
    assert bad.returncode == 2 and "embedding.k=2 is below embedding.d=4" in bad.stderr
    assert bad.stderr.startswith("mlet train: error: ") and len(bad.stderr.splitlines()) == 1


def test_demo_pieces_on_tiny_data(tiny_data, tmp_path):
    out = run_demo(
        tmp_path / "demo",
        tiny_data,
        nproc_per_node=2,
        overrides=[
            "model.bottom_mlp=[16]",
            "model.top_mlp=[16]",
            "embedding.k=16",
            "train.batch_size=64",
            "train.epochs=3",
            "train.progress=false",
        ],
    )
    results = out["results"]
    assert results["baseline"]["config"]["embedding"]["k"] is None and results["mlet"]["config"]["embedding"]["k"] == 16
    lrs = {name: r["config"]["sparse_optimizer"]["lr"] for name, r in results.items()}
    assert lrs["baseline lr x5"] == pytest.approx(5 * lrs["baseline"]) and lrs["mlet"] == lrs["baseline"]
    for name in results:
        assert 0.5 < results[name]["test"]["auc"] <= 1.0
    assert out["collapse"]["max_abs_diff"] <= 1e-5
    assert abs(out["collapse"]["collapsed_metrics"]["auc"] - results["mlet"]["test"]["auc"]) < 1e-5
    assert results["mlet"]["serving_table_bytes"] == results["baseline"]["serving_table_bytes"]
    assert results["mlet"]["training_table_bytes"] > 3 * results["baseline"]["training_table_bytes"]
    assert (tmp_path / "demo" / "demo_results.json").is_file()
