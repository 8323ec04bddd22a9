"""CI scale-out check through the CLI: train on 4 ranks, collapse on 4, evaluate on 2.

The collapsed model, scored by 2 processes, gives the test metrics the 4-rank training run reported
for its factored model. Tiny on purpose (a few hundred steps of work in all): it checks that every
stage runs sharded across processes, not speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _mlet(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "mlet_torchrec.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"mlet {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc


def test_train_on_4_ranks_collapse_on_4_evaluate_on_2(synth_dataset, tmp_path):
    data = synth_dataset(rows=2000)
    run, collapsed = tmp_path / "run", tmp_path / "collapsed"
    _mlet(
        "train",
        "--config",
        "tiny",
        "--nproc-per-node",
        "4",
        f"data.path={data}",
        f"run.dir={run}",
        "embedding.sharding=table_wise",
        "train.batch_size=64",
        "train.max_steps=12",
        "train.eval_batch_size=256",
        "train.checkpoint_every=6",
    )
    trained = json.loads((run / "metrics.json").read_text())
    assert trained["world_size"] == 4 and trained["steps"] == 12
    _mlet("collapse", "--input", str(run), "--output", str(collapsed), "--nproc-per-node", "4")
    metrics = json.loads(
        _mlet("evaluate", "--input", str(collapsed), "--split", "test", "--nproc-per-node", "2", "--json").stdout
    )
    assert metrics["auc"] == pytest.approx(trained["test"]["auc"], abs=1e-4)
    assert metrics["logloss"] == pytest.approx(trained["test"]["logloss"], abs=1e-4)
