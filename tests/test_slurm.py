"""The TorchX Slurm path for real: a throwaway two-node Slurm cluster on this machine
(launch/slurm/local_cluster.py: munged, MariaDB, slurmdbd, slurmctld, two slurmd), jobs submitted with
`torchx run -s slurm launch/components.py:...` exactly as on a cluster.

- train -j 2x1 across the two nodes, collapse, evaluate: the metrics equal a local 2-process run's (1e-6);
- `torchx status`, `torchx log`, `torchx list` report the job;
- one node's worker killed after the first checkpoint: with --max_retries 1 Slurm requeues the job, it
  resumes from the checkpoint and ends with the uninterrupted run's metrics;
- a bad config: FAILED, and the log holds the one-line error;
- `convert -j 2x1` over the Criteo 1TB layout, one rank per node: the data set equals `mlet convert --jobs 1`'s.

Needs root and `apt-get install -y slurmctld slurmd slurmdbd slurm-client munge mariadb-server`
(`make slurm-test` installs them); skipped with that reason otherwise. Every daemon is stopped by its
pid when the module ends, also when a test fails.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = str(Path(sys.executable).parent)
sys.path.insert(0, str(REPO))
from launch.slurm.local_cluster import LocalSlurmCluster, unavailable_reason  # noqa: E402

REASON = unavailable_reason()
NEEDS_SLURM = pytest.mark.skipif(REASON is not None, reason=REASON or "")

COMPONENTS = str(REPO / "launch" / "components.py")
CONFIG = str(REPO / "configs" / "tiny.yaml")
# batch 32 and a checkpoint every 25 steps: 200 steps, several checkpoints before the end (the fault test
# kills a worker after the first); the same overrides for every run so all of them are comparable.
OVERRIDES = ["train.batch_size=32", "train.checkpoint_every=25"]
# one CPU per node: --cpu must not exceed it or the job never starts; 1 thread per rank like the local run
NODE_RES = ["--cpu", "1", "--memMB", "1024"]
METRIC_KEYS = ("auc", "logloss", "pr_auc")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
FIGURES = {}  # what the tests measured, printed on the terminal when the module ends


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(request):
    # not under pytest's tmp_path: its base directory is private to root and mariadbd runs as mysql
    root = tempfile.mkdtemp(prefix="mlet-slurm-")
    c = LocalSlurmCluster(root)
    try:
        with c:
            FIGURES["cluster setup (s)"] = round(c.timings["setup_s"], 1)
            yield c
        assert not any(map(_alive, c.recorded_pids().values()))
    finally:
        c.stop()  # no-op when the with block stopped it; covers a failure inside the fixture
        if os.environ.get("MLET_SLURM_KEEP"):
            print(f"\nkept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
        if FIGURES:  # on the terminal also without -s
            capture = request.config.pluginmanager.getplugin("capturemanager")
            with capture.global_and_fixture_disabled():
                print("\nSlurm test figures: " + json.dumps(FIGURES), flush=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm")


@pytest.fixture(scope="module")
def data(work):
    out = work / "data"
    _mlet("synth", "--output", str(out), "rows=8000", "num_sparse=4", "max_cardinality=200", "row_group_size=512")
    return out


def _env(cluster=None) -> dict:
    env = {
        **os.environ,
        "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""),
        "LOGLEVEL": "WARNING",
        "TORCHXCONFIG": str(REPO / ".torchxconfig"),
    }
    if cluster is not None:
        env.update(cluster.env)
    return env


def _mlet(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [os.path.join(VENV_BIN, "mlet"), *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"mlet {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


def _torchx(cluster, cwd: Path, *args: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [os.path.join(VENV_BIN, "torchx"), *args],
        cwd=cwd,
        env=_env(cluster),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, f"torchx {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc


def _submit(cluster, cwd: Path, component: str, *args: str) -> str:
    """`torchx run -s slurm COMPONENT ARGS` from `cwd` (where Slurm writes the logs); the Slurm job id."""
    out = _torchx(cluster, cwd, "run", "-s", "slurm", f"{COMPONENTS}:{component}", *args).stdout
    m = re.search(r"^slurm://[^/]*/(\d+)\s*$", out, re.M)
    assert m, out
    return m.group(1)


def _sacct_states(cluster, job: str) -> list:
    proc = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "State", "-j", job],
        env=_env(cluster),
        capture_output=True,
        text=True,
        timeout=60,
    )
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _wait(cluster, job: str, timeout: float = 600, on_poll=None) -> dict:
    """Poll sacct until every het component of the job is terminal; times of first RUNNING and the end."""
    t0 = time.monotonic()
    seen = {}
    while time.monotonic() - t0 < timeout:
        states = _sacct_states(cluster, job)
        if states and "RUNNING" in states:
            seen.setdefault("running_after_s", time.monotonic() - t0)
        if on_poll is not None:
            on_poll(states)
        if states and all(s in TERMINAL for s in states):
            seen["state"] = states[0] if len(set(states)) == 1 else ",".join(states)
            seen["total_s"] = time.monotonic() - t0
            return seen
        time.sleep(0.25)
    subprocess.run(["scancel", job], env=_env(cluster))
    pytest.fail(f"job {job} not finished after {timeout} s: {_sacct_states(cluster, job)}; logs in {cluster.log}")


def _nodes(cluster, job: str, timeout: float = 60) -> list:
    """The node of each het component of a finished job, from sacct. A component's accounting record can show up
    after the job's first one is already terminal (a CI run saw ['vm'] for a COMPLETED 2-node job): wait until
    there is one per node, then return what sacct says (the caller asserts on it)."""
    t0 = time.monotonic()
    while True:
        nodes = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "NodeList", "-j", job], env=_env(cluster), capture_output=True, text=True
        ).stdout.split()
        if len(nodes) >= len(cluster.nodes) or time.monotonic() - t0 > timeout:
            return nodes
        time.sleep(0.5)


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _assert_same_metrics(a: dict, b: dict, tol: float = 1e-6) -> dict:
    diffs = {}
    for split in ("valid", "test"):
        for k in METRIC_KEYS:
            diffs[f"{split}.{k}"] = abs(a[split][k] - b[split][k])
    assert max(diffs.values()) <= tol, diffs
    return diffs


def _json_in(text: str) -> dict:
    """The JSON object in a log: plain, or with torchrun's `[RANK]:` or torchx's `ROLE/REPLICA [RANK]:` prefixes."""
    text = "\n".join(re.sub(r"^(\S+/\d+ )?\[\d+\]:", "", line) for line in text.splitlines())
    return json.loads(text[text.index("{") : text.rindex("}") + 1])


# ---------------------------------------------------------------- without the packages


def test_refuses_in_one_line_without_the_packages(monkeypatch, tmp_path, capsys):
    from launch.slurm import local_cluster

    monkeypatch.setattr(local_cluster, "_which", lambda name: None if name == "slurmd" else "/usr/bin/" + name)
    reason = local_cluster.unavailable_reason()
    assert reason == (
        "Slurm test cluster: missing slurmd; install with: apt-get install -y slurmctld slurmd slurmdbd "
        "slurm-client munge mariadb-server"
    )
    with pytest.raises(local_cluster.SlurmUnavailable, match="missing slurmd"):
        LocalSlurmCluster(tmp_path / "c").start()
    assert not (tmp_path / "c").exists()  # refused before creating anything
    assert local_cluster.main(["up", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


# ---------------------------------------------------------------- the local reference


@pytest.fixture(scope="module")
def local_run(work, data):
    """`mlet train --nproc-per-node 2` of the same config: the uninterrupted local run."""
    run = work / "local"
    t0 = time.monotonic()
    _mlet("train", "--config", CONFIG, "--nproc-per-node", "2", f"data.path={data}", f"run.dir={run}", *OVERRIDES)
    FIGURES["local 2-process train (s)"] = round(time.monotonic() - t0, 1)
    return {"dir": run, "metrics": _metrics(run)}


@pytest.fixture(scope="module")
def local_evaluated(local_run):
    """`mlet collapse` and `mlet evaluate` of the local run: the metrics of its collapsed model."""
    collapsed = local_run["dir"] / "collapsed"
    _mlet("collapse", "--input", str(local_run["dir"]), "--output", str(collapsed))
    return _json_in(_mlet("evaluate", "--input", str(collapsed), "--json").stdout)


# ---------------------------------------------------------------- train, collapse, evaluate on two nodes

JOBS = {}  # job ids the later tests read


def _train_args(data: Path, run: Path, *extra: str) -> list:
    return [
        "--config",
        CONFIG,
        "-j",
        "2x1",
        *NODE_RES,
        "--rdzv_port",
        str(_free_port()),
        "--env",
        "OMP_NUM_THREADS=1",
        *extra,
        f"data.path={data}",
        f"run.dir={run}",
        *OVERRIDES,
    ]


@pytest.mark.slow
@NEEDS_SLURM
def test_two_node_train_collapse_evaluate_match_local(cluster, work, data, local_run, local_evaluated):
    run = work / "slurm_run"
    job = _submit(cluster, work, "train", *_train_args(data, run))
    waited = _wait(cluster, job)
    JOBS["train"] = job
    FIGURES["train job: submit -> RUNNING (s)"] = round(waited["running_after_s"], 1)
    FIGURES["train job: submit -> COMPLETED (s)"] = round(waited["total_s"], 1)
    assert waited["state"] == "COMPLETED", (waited, (work / f"slurm-{job}-train-0.err").read_text()[-3000:])

    slurm, local = _metrics(run), local_run["metrics"]
    assert slurm["world_size"] == 2 and slurm["steps"] == local["steps"] == 200
    diffs = _assert_same_metrics(slurm, local)
    FIGURES["train: max |slurm - local| metric"] = max(diffs.values())
    FIGURES["train: test auc slurm / local"] = [slurm["test"]["auc"], local["test"]["auc"]]
    # the two replicas ran on the two nodes
    nodes = _nodes(cluster, job)
    assert sorted(nodes) == sorted(cluster.nodes), nodes

    collapsed = run / "collapsed"
    job = _submit(cluster, work, "collapse", "--input", str(run), "--output", str(collapsed), *NODE_RES)
    assert _wait(cluster, job)["state"] == "COMPLETED", (work / f"slurm-{job}-collapse-0.err").read_text()[-3000:]
    assert (collapsed / "manifest.json").is_file()

    job = _submit(cluster, work, "evaluate", "--input", str(collapsed), "--json", "True", *NODE_RES)
    assert _wait(cluster, job)["state"] == "COMPLETED", (work / f"slurm-{job}-evaluate-0.err").read_text()[-3000:]
    evaluated = _json_in((work / f"slurm-{job}-evaluate-0.out").read_text())
    for k in METRIC_KEYS:
        assert abs(evaluated[k] - local_evaluated[k]) <= 1e-6, (k, evaluated, local_evaluated)
        assert abs(evaluated[k] - slurm["test"][k]) <= 1e-5, (k, evaluated, slurm["test"])


@pytest.mark.slow
@NEEDS_SLURM
def test_torchx_status_log_list(cluster, work):
    job = JOBS.get("train")
    if job is None:
        pytest.skip("the two-node training job did not run")
    handle = f"slurm://torchx/{job}"
    status = _torchx(cluster, work, "status", handle).stdout
    assert re.search(r"State:\s*SUCCEEDED", status), status
    assert "train" in status, status

    # stderr (torchx's default stream) of each node; torchrun's rendezvous, not the node order, picks which
    # node's worker is rank 0, and only rank 0 logs at INFO and prints the summary: the other node is silent
    err = {r: _torchx(cluster, work, "log", f"{handle}/train/{r}").stdout for r in (0, 1)}
    for r, text in err.items():
        assert all(line.startswith(f"train/{r} ") for line in text.splitlines()), text[-2000:]
    (rank0,) = [r for r, text in err.items() if " rank0 INFO mlet.train: " in text]
    assert "WARNING" not in err[1 - rank0] and " rank0 " not in err[1 - rank0], err[1 - rank0][-2000:]
    out = _torchx(cluster, work, "log", "--streams", "stdout", f"{handle}/train/{rank0}").stdout
    assert "trained 200 steps" in out and "test: " in out, out[-2000:]

    listed = _torchx(cluster, work, "list", "-s", "slurm").stdout
    assert re.search(rf"^\s*{job}\s+SUCCEEDED\b", listed, re.M) or re.search(rf"\b{job}\b.*SUCCEEDED", listed), listed


# ---------------------------------------------------------------- fault: a worker dies, Slurm requeues


def _worker_pids(cluster, node: str) -> list:
    """The `mlet train` worker processes (not torchrun) that Slurm started on `node` of this cluster."""
    found = []
    for pid in cluster.job_pids():
        try:
            env = dict(
                kv.split("=", 1)
                for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
                if "=" in kv
            )
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if (
            env.get("SLURMD_NODENAME") == node
            and "LOCAL_RANK" in env
            and "mlet_torchrec.cli" in cmd
            and not any("torchrun" in c for c in cmd)
        ):
            found.append(pid)
    return found


@pytest.mark.slow
@NEEDS_SLURM
def test_killed_worker_requeues_and_resumes(cluster, work, data, local_run):
    run = work / "slurm_requeue"
    job = _submit(cluster, work, "train", *_train_args(data, run, "--max_retries", "1"))
    latest = run / "checkpoints" / "LATEST"
    killed = {}

    def kill_after_first_checkpoint(states):
        if killed:  # the requeue's timeline: job back in the queue, running again
            now = time.monotonic() - killed["t"]
            if any(s in ("REQUEUED", "PENDING") for s in states):
                killed.setdefault("requeued_after_s", now)
            if "requeued_after_s" in killed and "RUNNING" in states:
                killed.setdefault("running_again_after_s", now)
            return
        if not latest.is_file():
            return
        pids = _worker_pids(cluster, cluster.nodes[1])
        if pids:
            killed["checkpoint"] = latest.read_text().strip()
            killed["t"] = time.monotonic()
            for pid in pids:
                os.kill(pid, 9)
            killed["pids"] = pids

    t0 = time.monotonic()
    waited = _wait(cluster, job, on_poll=kill_after_first_checkpoint)
    assert killed, "the first checkpoint appeared only after the workers had finished"
    err = (work / f"slurm-{job}-train-1.err").read_text()
    assert waited["state"] == "COMPLETED", (waited, err[-3000:])
    FIGURES["requeue: killed worker -> requeued / running again / COMPLETED (s)"] = [
        round(killed.get("requeued_after_s", -1), 1),
        round(killed.get("running_again_after_s", -1), 1),
        round(t0 + waited["total_s"] - killed["t"], 1),
    ]
    assert "running_again_after_s" in killed, killed  # the job went back to the queue and ran again

    show = subprocess.run(["scontrol", "show", "job", job], env=_env(cluster), capture_output=True, text=True).stdout
    assert re.search(r"Restarts=1\b", show), show
    metrics = _metrics(run)
    assert metrics["resumed_from"], metrics  # the second attempt started from a checkpoint, not from scratch
    assert 0 < metrics["start_step"] < metrics["steps"] == 200, metrics
    FIGURES["requeue: killed at checkpoint / resumed at step"] = [killed["checkpoint"], metrics["start_step"]]
    diffs = _assert_same_metrics(metrics, local_run["metrics"])
    FIGURES["requeue: max |resumed - uninterrupted| metric"] = max(diffs.values())
    status = _torchx(cluster, work, "status", f"slurm://torchx/{job}").stdout
    assert re.search(r"State:\s*SUCCEEDED", status), status


# ---------------------------------------------------------------- a bad config


@pytest.mark.slow
@NEEDS_SLURM
def test_bad_config_fails_with_one_line_error(cluster, work, data):
    job = _submit(
        cluster,
        work,
        "train",
        "--config",
        CONFIG,
        "-j",
        "1x1",
        *NODE_RES,
        f"data.path={data}",
        f"run.dir={work / 'slurm_bad'}",
        "model.name=no_such_model",
    )
    assert _wait(cluster, job)["state"] == "FAILED"
    status = _torchx(cluster, work, "status", f"slurm://torchx/{job}").stdout
    assert re.search(r"State:\s*FAILED", status), status
    log = _torchx(cluster, work, "log", f"slurm://torchx/{job}/train/0").stdout
    errors = [line for line in log.splitlines() if "mlet train: error:" in line]
    assert errors and "no_such_model" in errors[0], log[-3000:]


# ---------------------------------------------------------------- convert on two nodes


@pytest.mark.slow
@NEEDS_SLURM
def test_two_node_convert_equals_jobs_1(cluster, work):
    from test_convert_parallel import criteo_days, layout
    from test_convert_ranks import FLAGS

    days = criteo_days(work / "criteo_days")
    _mlet("convert", "criteo", "--input", str(days), "--output", str(work / "convert_jobs1"), *FLAGS)
    out = work / "convert_slurm"
    rdzv = ["--rdzv_port", str(_free_port()), "--env", "OMP_NUM_THREADS=1"]
    job = _submit(
        cluster,
        work,
        "convert",
        "-j",
        "2x1",
        *NODE_RES,
        *rdzv,
        "criteo",
        "--input",
        str(days),
        "--output",
        str(out),
        *FLAGS,
    )
    waited = _wait(cluster, job)
    FIGURES["convert job: submit -> COMPLETED (s)"] = round(waited["total_s"], 1)
    assert waited["state"] == "COMPLETED", (waited, (work / f"slurm-{job}-convert-0.err").read_text()[-3000:])
    nodes = _nodes(cluster, job)
    assert sorted(nodes) == sorted(cluster.nodes), nodes  # one rank on each node
    logs = "".join((work / f"slurm-{job}-convert-{r}.err").read_text() for r in (0, 1))
    assert "rank 1 of 2: encoded " in logs, logs[-3000:]
    assert layout(out) == layout(work / "convert_jobs1")
    assert not list(work.glob(".convert_slurm*"))  # no work or temporary directory left
