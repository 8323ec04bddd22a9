"""mlet convert on the ranks of a job (data_pipes/convert/ranks.py, launch/components.py:convert).

- the TorchX component on the local scheduler, 1 node x 2 ranks, over the Criteo 1TB layout (day_0 ..
  day_23, .gz and plain files cut in byte ranges, vocabulary mode): the data set equals --jobs 1's;
- a rank killed in pass 1 and again in pass 2 under torchrun --max-restarts 2: the restarted job does not
  count or encode again the shards that were complete, and its data set equals --jobs 1's;
- a rank that waits on a dead one stops in one line; --jobs with several ranks is refused.

The 2-node Slurm run is in tests/test_slurm.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_convert_parallel import criteo_days, layout

from data_pipes.convert.options import ConvertOptions
from data_pipes.convert.ranks import Peers, RankStopped
from data_pipes.errors import OptionError
from mlet_torchrec.cli.main import main as mlet

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
# small blocks, files and row groups: the plain days are cut in byte ranges, the output has several files
FLAGS = ["--min-count", "2", "--block-size-mb", "0.004", "--shard-size-mb", "0.004"]
FLAGS += ["--rows-per-file", "500", "--row-group-rows", "128"]


def _env(**extra: str) -> dict:
    return {
        **os.environ,
        "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "LOGLEVEL": "WARNING",
        "TORCHXCONFIG": str(REPO / ".torchxconfig"),
        **extra,
    }


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> Path:
    return criteo_days(tmp_path_factory.mktemp("ranks") / "days")


@pytest.fixture(scope="module")
def jobs_1(days) -> tuple:
    """The layout of `mlet convert criteo --jobs 1` of the days."""
    out = days.parent / "jobs1"
    assert mlet(["convert", "criteo", "--input", str(days), "--output", str(out), *FLAGS]) == 0
    return layout(out)


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")]  # no work or temporary directory


@pytest.mark.slow
def test_torchx_local_two_ranks_equal_jobs_1_on_the_criteo_1tb_layout(days, jobs_1, tmp_path):
    out = tmp_path / "data"
    cmd = [os.path.join(VENV_BIN, "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}"]
    cmd += ["launch/components.py:convert", "-j", "1x2", "criteo", "--input", str(days), "--output", str(out), *FLAGS]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    logs = proc.stdout + proc.stderr
    assert "rank 1 of 2: encoded " in logs and "criteo: 1,440 rows -> " in logs, logs[-3000:]
    assert layout(out) == jobs_1
    _no_leftovers(tmp_path)


@pytest.mark.slow
def test_a_killed_rank_is_restarted_and_complete_shards_are_not_done_again(days, jobs_1, tmp_path):
    out, log = tmp_path / "data", tmp_path / "done.log"
    cmd = [os.path.join(VENV_BIN, "torchrun"), "--nproc-per-node", "2", "--max-restarts", "2"]
    cmd += [str(REPO / "tests" / "convert_entry.py"), "convert", "criteo", "--input", str(days), "--output", str(out)]
    env = _env(CONVERT_TEST_LOG=str(log), CONVERT_TEST_DIE_AT="5", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + FLAGS, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [tuple(line.split()) for line in log.read_text().splitlines()]  # (attempt, step, shard, rank)
    counted = {a: [(s, r) for at, step, s, r in done if step == "count" and at == a] for a in "012"}
    encoded = {a: {int(s) for at, step, s, _ in done if step == "encode" and at == a} for a in "012"}
    # attempt 0: rank 1 counted one shard and died at its second; no later attempt counted that one again
    (first,) = [s for s, r in counted["0"] if r == "1"]
    assert first not in [s for s, _ in counted["1"]] and not counted["2"] and not encoded["0"], done
    # attempt 1 finished pass 1; rank 1 encoded shards 1 and 3 and died at 5; attempt 2 encoded 5, not 1 or 3
    assert {1, 3} <= encoded["1"] and 5 not in encoded["1"], done
    assert 5 in encoded["2"] and not {1, 3} & encoded["2"], done
    assert not encoded["1"] & encoded["2"] and encoded["1"] | encoded["2"] == set(range(48))  # each once (48 shards)
    assert layout(out) == jobs_1
    _no_leftovers(tmp_path)


def test_a_rank_waiting_on_a_dead_one_stops_in_one_line(tmp_path):
    (tmp_path / "alive").mkdir()
    (tmp_path / "alive" / "1").write_text("4242 7\n")  # a heartbeat that no longer changes
    peers = Peers(tmp_path, rank=0, world=2, stale_s=0.3)
    with pytest.raises(RankStopped) as e:
        peers.need(tmp_path / "done" / "3.json", 1, "shard 3")
    message = str(e.value)
    assert message.startswith("rank 1 of 2 stopped before it wrote shard 3 (no heartbeat for 0 s)")
    assert "\n" not in message and str(tmp_path) in message
    (tmp_path / "done").touch()
    assert peers.wait(tmp_path / "done", 1, "x")  # a file that is there: no wait


def test_jobs_and_ranks_exclude_each_other():
    with pytest.raises(OptionError, match="--jobs 2 in a job of 4 processes: each rank is one process"):
        ConvertOptions(jobs=2, rank=1, world_size=4)
    with pytest.raises(OptionError, match="rank 4 is not in a job of 4 processes"):
        ConvertOptions(rank=4, world_size=4)
