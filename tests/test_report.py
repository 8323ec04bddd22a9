"""``mlet sweep`` then ``mlet report`` end to end on a tiny data set: the Markdown and PNGs exist and the
table's numbers are the results lines' numbers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlet_torchrec.errors import UserError
from mlet_torchrec.experiments.delong import auc
from mlet_torchrec.experiments.predictions import decode_predictions
from mlet_torchrec.experiments.report import render_report
from mlet_torchrec.experiments.stats import fmt
from mlet_torchrec.experiments.store import load_results

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# one OpenMP thread: on a busy machine spinning OpenMP threads make these tiny runs ~30x slower
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_tiny_sweep_renders_a_report(synth_dataset, tmp_path):
    data = synth_dataset()
    results = tmp_path / "results.jsonl"
    args = [
        sys.executable,
        "-m",
        "mlet_torchrec.cli",
        "sweep",
        "--config",
        "configs/tiny.yaml",
        "--grid",
        "embedding.d=[4] embedding.k=[none,16] seed=[0,1]",
        "--tune-baseline",
        "sparse_optimizer.lr=[0.2]",
        "--output",
        str(results),
        "--nproc-per-node",
        "1",
        "--in-process",
        "--runs-dir",
        str(tmp_path / "runs"),
        f"data.path={data}",
        "train.batch_size=128",
        "train.eval_batch_size=256",
    ]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900, env=ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = load_results(results)
    assert len(lines) == 4 and {(r["k"], r["seed"]) for r in lines} == {(None, 0), (None, 1), (16, 0), (16, 1)}
    for r in lines:
        assert 0.0 <= r["test"]["auc"] <= 1.0
        assert {"top10", "bottom10"} <= set(r["freq"]) and r["freq"]["top10"]["rows"] > 0
        assert r["peak_rss_mb"] > 0 and r["seconds_per_iter"] > 0 and r["serving_table_bytes"] > 0
        assert all(0 < t["above_1pct"] <= 4 for t in r["spectrum"].values())
        logits, labels = decode_predictions(r["test_predictions"])  # a small test set: its predictions are kept
        assert abs(auc(logits, labels) - r["test"]["auc"]) < 2e-3
    assert not (tmp_path / "runs" / lines[0]["key"]).exists()  # run dirs are removed once recorded

    # a rerun skips every done cell
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=900, env=ENV)
    assert again.returncode == 0 and "0 to run" in again.stdout, again.stdout + again.stderr
    assert len(load_results(results)) == 4

    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "mlet_torchrec.cli", "report", "--input", str(results), "--output", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    md = (out / "report.md").read_text()
    pngs = sorted((out / "plots").glob("*.png"))
    assert len(pngs) >= 4 and all(p.stat().st_size > 1000 for p in pngs)
    for p in pngs:
        assert f"plots/{p.name}" in md
    for k, name in ((None, "baseline (paper lr 0.2)"), (16, "MLET k=16")):
        aucs = [r["test"]["auc"] for r in lines if r["k"] == k]
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |") and "±" in line)
        assert fmt(aucs) in row, (row, aucs)
    assert "not measured yet" in md or "compression" in md
    assert "Recommendation" in md and "Summary" in md


def test_report_rejects_an_empty_store(tmp_path):
    (tmp_path / "r.jsonl").write_text("")
    with pytest.raises(UserError, match="no finished runs"):
        render_report(tmp_path / "r.jsonl", tmp_path / "out")
