"""A hostile or careless user, end to end through the ``mlet`` command (real processes and files).

Names read from files that would become paths outside their directory, checkpoint and collapse
directories crafted to run code or to lie about their tensors: each is refused in one line, exit 2,
with nothing written outside the output and no code run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from test_bad_inputs import MLET, mlet, one_error_line

from data_pipes.schema import DatasetMeta
from mlet_torchrec.names import UnsafeName
from mlet_torchrec.serving.artifact import ManifestError, read_manifest
from mlet_torchrec.training.checkpoint import CheckpointError, latest_checkpoint, resolve_checkpoint
from mlet_torchrec.training.safe_dcp import UnsafeCheckpoint, read_metadata

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_dataset) -> dict[str, Path]:
    """A real tiny run (one checkpoint) and its collapse output, made by the ``mlet`` command."""
    work = tmp_path_factory.mktemp("trust")
    data = synth_dataset()
    p = mlet("train", "--config", "tiny", "--input", str(data), "--output", "run", cwd=work)
    assert p.returncode == 0, p.stderr[-3000:]
    p = mlet("collapse", "--input", "run", "--output", "col", "--check-split", "none", cwd=work)
    assert p.returncode == 0, p.stderr[-3000:]
    return {"work": work, "data": data, "run": work / "run", "col": work / "col"}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


class _RunsCode:
    """Pickles as ``os.system(cmd)``: what a crafted ``.metadata`` hides."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _plant(directory: Path, marker: Path, info_file: str | None) -> None:
    """Make ``directory/.metadata`` valid DCP metadata that also calls os.system (touching ``marker``), and
    record its hash where mlet records it, so only the allow-list stands between it and the shell."""
    md = read_metadata(directory)
    md.planner_data = {"x": _RunsCode(f"touch {marker}")}
    (directory / ".metadata").write_bytes(pickle.dumps(md))
    from mlet_torchrec.files import sha256_file

    if info_file is not None:
        info = json.loads((directory / info_file).read_text())
        info["dcp_metadata_sha256"] = sha256_file(directory / ".metadata")
        (directory / info_file).write_text(json.dumps(info))


def test_manifest_table_name_cannot_leave_the_output(trained, tmp_path):
    col = _copy(trained["col"], tmp_path / "col")
    man = json.loads((col / "manifest.json").read_text())
    name = next(iter(man["tables"]))
    man["tables"]["../../victim"] = man["tables"].pop(name)
    (col / "manifest.json").write_text(json.dumps(man))
    victim = tmp_path / "victim.npy"
    victim.write_text("user data")
    p = mlet("export", "--input", "col", "--output", "out/exp", "--format", "npy", cwd=tmp_path)
    one_error_line(p, "manifest.json", "../../victim", "not a plain file name")
    assert victim.read_text() == "user data"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit, fragments",
    [
        (lambda text: text[: len(text) // 2], ["manifest.json", "unreadable"]),
        (lambda text: text.replace('"rows": ', '"rows": 1'), ["manifest.json", "says", "holds"]),
        (lambda text: text.replace('"rows": ', '"rows": -'), ["manifest.json", "rows", "greater than 0"]),
        (lambda text: text.replace('"d": 4', '"d": 4000000000000'), ["manifest.json", "says", "holds"]),
        (lambda text: text.replace('"dcp_metadata_sha256": "', '"dcp_metadata_sha256": "0'), ["SHA-256"]),
    ],
    ids=["truncated", "wrong-rows", "negative-rows", "huge-d", "hash"],
)
def test_lying_manifest_is_refused(trained, tmp_path, edit, fragments):
    col = _copy(trained["col"], tmp_path / "col")
    (col / "manifest.json").write_text(edit((col / "manifest.json").read_text()))
    with pytest.raises(ManifestError) as e:
        read_manifest(col)
    assert all(f in str(e.value) for f in fragments) and "\n" not in str(e.value), str(e.value)


def test_lying_manifest_through_the_command(trained, tmp_path):
    col = _copy(trained["col"], tmp_path / "col")
    (col / "manifest.json").write_text((col / "manifest.json").read_text().replace('"rows": ', '"rows": 1'))
    p = mlet("export", "--input", "col", "--output", "exp", "--format", "npy", cwd=tmp_path)
    one_error_line(p, "manifest.json", "says", "holds")
    assert not (tmp_path / "exp").exists()


def test_dataset_files_stay_inside_the_dataset(trained, tmp_path):
    data = _copy(trained["data"], tmp_path / "data")
    meta = json.loads((data / "metadata.json").read_text())
    meta["splits"]["test"] = ["../../../../../etc/passwd"]
    (data / "metadata.json").write_text(json.dumps(meta))
    p = mlet("train", "--config", "tiny", "--input", "data", "--output", "run", cwd=tmp_path)
    one_error_line(p, "metadata.json", "../../../../../etc/passwd")
    assert not (tmp_path / "run").exists()
    # a symbolic link inside the data set that leads out of it
    meta["splits"]["test"] = ["test/outside.parquet"]
    (data / "metadata.json").write_text(json.dumps(meta))
    (data / "test" / "outside.parquet").symlink_to("/etc/passwd")
    with pytest.raises(UnsafeName, match="leads outside"):
        DatasetMeta.load(data).files(data, "test")


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_crafted_metadata_runs_no_code(trained, tmp_path, command):
    marker = tmp_path / "pwned"
    if command == "export":
        src = _copy(trained["col"], tmp_path / "src")
        _plant(src, marker, "manifest.json")
        args = ["export", "--input", "src", "--output", "out", "--format", "npy"]
    else:
        src = _copy(trained["run"], tmp_path / "src")
        _plant(_checkpoint(src), marker, "checkpoint.json")
        args = {
            "evaluate": ["evaluate", "--input", "src"],
        }[command]
    p = mlet(*args, cwd=tmp_path)
    one_error_line(p, ".metadata", "system, which DCP metadata never holds")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_crafted_checkpoint_is_refused_before_resume(trained, tmp_path):
    """Resume, collapse and evaluate all find the checkpoint through the one check."""
    marker = tmp_path / "pwned"
    run = _copy(trained["run"], tmp_path / "run")
    _plant(_checkpoint(run), marker, "checkpoint.json")
    for find in (latest_checkpoint, resolve_checkpoint):
        with pytest.raises(CheckpointError, match="system, which DCP metadata never holds"):
            find(run)
    assert not marker.exists()


def test_recorded_hash_is_checked(trained, tmp_path):
    run = _copy(trained["run"], tmp_path / "run")
    ckpt = _checkpoint(run)
    md = read_metadata(ckpt)
    md.storage_meta.save_id = "another save"  # still valid, still allowed: only the hash tells
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="does not match the SHA-256 recorded in checkpoint.json"):
        resolve_checkpoint(run)


def test_metadata_cannot_name_files_outside(trained, tmp_path):
    run = _copy(trained["run"], tmp_path / "run")
    ckpt = _checkpoint(run)
    md = read_metadata(ckpt)
    for info in md.storage_data.values():
        info.relative_path = "../../../../etc/passwd"
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(UnsafeCheckpoint, match="not a plain file name"):
        read_metadata(ckpt)


def test_byte_entries_load_without_code(tmp_path):
    """DCP's default planner torch.load(weights_only=False)-s non-tensor entries; ours does not."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from mlet_torchrec.training import safe_dcp

    marker = tmp_path / "pwned"
    dcp.save(
        {"w": torch.ones(2), "extra": _RunsCode(f"touch {marker}")}, checkpoint_id=str(tmp_path / "c"), no_dist=True
    )
    state = {"w": torch.zeros(2), "extra": None}
    with pytest.raises(CheckpointException, match="Weights only load failed"):
        safe_dcp.load(state, tmp_path / "c", no_dist=True)
    assert not marker.exists()
    state = {"w": torch.zeros(2), "extra": None}
    dcp.save({"w": torch.ones(2), "extra": 0.5}, checkpoint_id=str(tmp_path / "d"), no_dist=True)
    safe_dcp.load(state, tmp_path / "d", no_dist=True)
    assert state["extra"] == 0.5 and state["w"].sum() == 2


# ---------------------------------------------------------------------------------- live jobs


def _start(args: list[str], cwd: Path, err: Path) -> subprocess.Popen:
    """``mlet ARGS`` in a session of its own, as a terminal runs it (Ctrl-C reaches its whole group)."""
    return subprocess.Popen(
        [*MLET, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=open(err, "w"), start_new_session=True
    )


def _wait_for(what, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, f"the job ended early with status {proc.returncode}"
        assert time.monotonic() < deadline, "timed out waiting for the job"
        time.sleep(0.2)


def _ctrl_c(proc: subprocess.Popen, err: Path) -> str:
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130, err.read_text()[-3000:]
    text = err.read_text()
    assert "Traceback" not in text, text[-3000:]
    errors = [ln for ln in text.splitlines() if "error:" in ln]
    assert len(errors) == 1, text[-3000:]
    return errors[0]


def test_live_run_is_locked_readable_and_interruptible(trained, tmp_path):
    """A run being trained: a second writer is refused naming the first; a collapse of it (rotation at every
    checkpoint) succeeds; Ctrl-C ends it in one line with exit 130, and the same command resumes it."""
    train = ["train", "--config", "tiny", "--input", str(trained["data"]), "--output", "run"]
    train += ["train.epochs=1000", "train.checkpoint_every=3", "train.keep_checkpoints=1"]
    first = _start(train, tmp_path, tmp_path / "first.err")
    try:
        _wait_for(lambda: any((tmp_path / "run" / "checkpoints").glob("step_*")), first)
        p = mlet(*train, cwd=tmp_path)
        one_error_line(p, "run is in use by another job", f"pid {first.pid} on host")
        p = mlet("collapse", "--input", "run", "--output", "col", "--check-split", "none", cwd=tmp_path)
        assert p.returncode == 0, p.stderr[-3000:]
        line = _ctrl_c(first, tmp_path / "first.err")
        assert "interrupted at step" in line and "resume with the same command" in line, line
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    again = _start(train, tmp_path, tmp_path / "again.err")
    try:
        _wait_for(lambda: "resuming from" in (tmp_path / "again.err").read_text(), again)
        _ctrl_c(again, tmp_path / "again.err")
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)


def test_ctrl_c_on_local_ranks_is_one_line(synth_dataset, tmp_path):
    """--nproc-per-node 2: Ctrl-C reaches the launcher and both ranks; one line, exit 130, and the
    checkpoint it names is complete (the same command resumes from it). A checkpoint every step: the
    Ctrl-C often lands inside a write, which must still end as the interrupt, not as a failed write."""
    train = ["train", "--config", "tiny", "--input", str(synth_dataset()), "--output", "run", "--nproc-per-node", "2"]
    proc = _start([*train, "train.epochs=1000", "train.checkpoint_every=1"], tmp_path, tmp_path / "err")
    try:
        _wait_for(lambda: any((tmp_path / "run" / "checkpoints").glob("step_*")), proc)
        line = _ctrl_c(proc, tmp_path / "err")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "interrupted at step" in line and "resume with the same command" in line, (tmp_path / "err").read_text()
    assert latest_checkpoint(tmp_path / "run") is not None


class _RaisesInDel:
    def __del__(self) -> None:  # where a Ctrl-C can land: Python cannot raise it there
        raise KeyboardInterrupt


def test_ctrl_c_inside_a_finalizer_is_not_lost_nor_printed(tmp_path, capfd):
    """A SIGINT handled inside a ``__del__`` or weakref callback is "unraisable": Python would print
    "Exception ignored in" with a traceback and go on training. It is kept and raised at the step's end."""
    from types import SimpleNamespace

    from mlet_torchrec.errors import Interrupted
    from mlet_torchrec.training.run_dir import interruptible

    with pytest.raises(Interrupted, match="interrupted at step 3, before the first checkpoint"):
        with interruptible(tmp_path) as last:
            last(SimpleNamespace(step=2))
            _RaisesInDel()  # collected at once: the KeyboardInterrupt is unraisable
            last(SimpleNamespace(step=3))
            pytest.fail("the interrupt was lost")
    assert "Exception ignored" not in capfd.readouterr().err


def test_a_process_that_ignores_ctrl_c_keeps_ignoring_it_while_training(tmp_path):
    """`mlet results run`'s pool workers ignore SIGINT (the pool's owner stops them on a Ctrl-C): training must
    not take it back, or the Ctrl-C would also fail the cell a worker was training."""
    from types import SimpleNamespace

    from mlet_torchrec.training.run_dir import interruptible

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interruptible(tmp_path) as last:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            last(SimpleNamespace(step=1))  # nothing raised: the SIGINT was ignored
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_second_sigint_while_the_first_is_handled_does_not_lose_its_line(tmp_path, monkeypatch):
    """A rank of a local job gets each Ctrl-C twice (the terminal's and the launcher's forward). The second
    one landing while the first becomes the one line must not replace it with a bare KeyboardInterrupt,
    nor once training's handler is gone: a rank installs one handler for its whole life."""
    from types import SimpleNamespace

    from mlet_torchrec.errors import Interrupted
    from mlet_torchrec.training import run_dir
    from mlet_torchrec.training.run_dir import CtrlC, interruptible

    root = run_dir.checkpoint_root

    def second_sigint(path):  # interrupted() looks for checkpoints: the forwarded SIGINT lands here
        os.kill(os.getpid(), signal.SIGINT)
        return root(path)

    monkeypatch.setattr(run_dir, "checkpoint_root", second_sigint)
    rank = CtrlC(lambda info: None)
    previous = signal.signal(signal.SIGINT, rank)  # as launcher._worker does for a rank's whole life
    try:
        with pytest.raises(Interrupted, match="interrupted at step 2"):
            with interruptible(tmp_path) as last:
                assert signal.getsignal(signal.SIGINT) is rank  # joined, not replaced
                last(SimpleNamespace(step=2))
                os.kill(os.getpid(), signal.SIGINT)
                pytest.fail("the interrupt was lost")
        os.kill(os.getpid(), signal.SIGINT)  # a third, after training's block: still ignored
        assert rank.seen
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------- launch environment


def _stale_env(port: int) -> dict[str, str]:
    """What an earlier torchrun or a copied job script leaves in a shell."""
    return {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("nproc", ["2", "1"])
def test_stale_distributed_environment_is_one_line(synth_dataset, tmp_path, nproc):
    """--nproc-per-node 2 is refused at once; without it, waiting for the missing rank ends after the
    rendezvous timeout in one line naming the address and port."""
    env = {**_stale_env(_free_port()), "MLET_RENDEZVOUS_TIMEOUT_S": "2"}
    args = [*MLET, "train", "--config", "tiny", "--input", str(synth_dataset()), "--output", "run"]
    p = subprocess.run(
        [*args, "--nproc-per-node", nproc], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    if nproc == "2":
        one_error_line(p, "--nproc-per-node 2", "WORLD_SIZE=2", "unset")
    else:
        one_error_line(p, f"no rendezvous at 127.0.0.1:{env['MASTER_PORT']} within 2 s", "rank 0 of 2")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- absurd sizes


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("embedding.k=10000000", ["the embedding tables do not fit in memory", "embedding.k"]),
        ("train.eval_batch_size=1000000000", ["train.eval_batch_size=1000000000", "lower train.eval_batch_size"]),
    ],
    ids=["k", "eval-batch"],
)
def test_absurd_sizes_fail_before_planning(synth_dataset, tmp_path, override, fragments):
    p = mlet("train", "--config", "tiny", "--input", str(synth_dataset()), "--output", "run", override, cwd=tmp_path)
    one_error_line(p, *fragments)
    assert not (tmp_path / "run").exists()


def test_planner_sees_few_column_shards_whatever_k():
    """TorchRec's planner estimates every column-wise shard of MIN_CW_DIM columns: a k of millions would keep
    it busy for minutes, so wide tables get shards of at least k / MAX_COLUMN_SHARDS columns."""
    from mlet_torchrec.config import load_config
    from mlet_torchrec.training.distributed import MAX_COLUMN_SHARDS, sharding_constraints

    for k, sharding in ((10_000_000, "auto"), (10_000_000, "column_wise"), (64, "auto")):
        emb = load_config(None, [f"embedding.k={k}", f"embedding.sharding={sharding}"]).embedding
        got = sharding_constraints(emb, ["a"], {"a": "t_a"}, 2, "cpu")
        if k == 64:
            assert "t_a" not in got  # narrow tables keep TorchRec's defaults
        else:
            assert got["t_a"].min_partition >= k // MAX_COLUMN_SHARDS


def test_resume_with_other_epochs_keeps_or_refuses_the_schedule():
    """Without lr decay the learning rate is a function of the step alone, so a resume may train longer or
    shorter; with decay, the original schedule ends at the original last step: a change is refused."""
    from data_pipes.schema import SparseFeature
    from mlet_torchrec.config import ConfigError, load_config
    from mlet_torchrec.training.state import check_resumable, data_shape

    meta = DatasetMeta(sparse=[SparseFeature(name="a", cardinality=10)], splits={})
    info = {"data_shape": data_shape(meta)}
    for decay in ("none", "cosine"):
        saved = load_config(None, [f"train.lr_decay={decay}", "train.epochs=2"])
        for change in ("train.epochs=3", "train.max_steps=5"):
            current = load_config(None, [f"train.lr_decay={decay}", "train.epochs=2", change])
            if decay == "none":
                check_resumable("ckpt", saved, current, info, meta)
            else:
                with pytest.raises(ConfigError, match=f"{change.split('=')[0]}: .* now .train.lr_decay=cosine"):
                    check_resumable("ckpt", saved, current, info, meta)


def test_bad_test_split_is_found_before_the_first_step(synth_dataset, tmp_path):
    data = _copy(synth_dataset(), tmp_path / "data")
    victim = sorted((data / "test").glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    p = mlet("train", "--config", "tiny", "--input", "data", "--output", "run", cwd=tmp_path)
    one_error_line(p, victim.name, "not a readable Parquet file")
    assert not (tmp_path / "run").exists()  # refused before the run directory, let alone a step


def test_overwrite_replaces_only_what_the_marker_lists(tmp_path):
    args = ["synth", "--output", "out", "rows=300", "num_sparse=2", "max_cardinality=20", "row_group_size=64"]
    assert mlet(*args, cwd=tmp_path).returncode == 0
    assert mlet(*args, "--overwrite", cwd=tmp_path).returncode == 0  # only mlet's files: replaced
    (tmp_path / "out" / "train" / "notes.txt").write_text("mine")
    one_error_line(mlet(*args, "--overwrite", cwd=tmp_path), "train/notes.txt", "not among the files")
    assert (tmp_path / "out" / "train" / "notes.txt").read_text() == "mine"


def test_two_jobs_on_one_output_the_later_commit_is_refused(tmp_path):
    """Two jobs start on one new output (both pass the existence check); the first commits, the second is
    refused at its commit instead of replacing the first's output, and leaves nothing of its own."""
    from mlet_torchrec.io import AtomicOutput, OutputError

    first, second = AtomicOutput(tmp_path / "out", "convert"), AtomicOutput(tmp_path / "out", "convert")
    (first.begin() / "a.txt").write_text("first")
    (second.begin() / "a.txt").write_text("second")
    first.commit()
    with pytest.raises(OutputError, match="written by another job while this one ran; --overwrite replaces it"):
        second.commit()
    second.abort()
    assert (tmp_path / "out" / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    again = AtomicOutput(tmp_path / "out", "convert", overwrite=True)  # --overwrite still replaces it
    (again.begin() / "a.txt").write_text("again")
    again.commit()
    assert (tmp_path / "out" / "a.txt").read_text() == "again"


def test_two_jobs_on_one_output_file_the_later_commit_is_refused(tmp_path):
    """The one-file twin (mlet predict): the second job's commit is refused instead of replacing the first's file,
    a user's file that appeared meanwhile is never replaced, and --overwrite still replaces a file mlet wrote."""
    from mlet_torchrec.io import AtomicFile, OutputError

    def ours(path: Path) -> bool:
        return path.read_text().startswith("mlet")

    first, second = AtomicFile(tmp_path / "s.csv", ours), AtomicFile(tmp_path / "s.csv", ours)
    first.begin(), second.begin()
    first.built.write_text("mlet first")
    second.built.write_text("mlet second")
    first.commit()
    with pytest.raises(OutputError, match="written by another job while this one ran; --overwrite replaces it"):
        second.commit()
    second.abort()
    assert (tmp_path / "s.csv").read_text() == "mlet first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv"]
    late = AtomicFile(tmp_path / "t.csv", ours, overwrite=True)
    late.begin().joinpath("t.csv").write_text("mlet late")
    (tmp_path / "t.csv").write_text("the user's")
    with pytest.raises(OutputError, match="appeared while this job ran and mlet did not write it"):
        late.commit()
    late.abort()
    assert (tmp_path / "t.csv").read_text() == "the user's"
    again = AtomicFile(tmp_path / "s.csv", ours, overwrite=True)
    again.begin()
    again.built.write_text("mlet again")
    again.commit()
    assert (tmp_path / "s.csv").read_text() == "mlet again"


def test_diverged_run_is_one_line_from_every_rank(synth_dataset, tmp_path):
    """A NaN loss on a 2-process job: the workers' TrainingDiverged reaches the command as itself (one line,
    exit 2), and the run directory it created without a checkpoint is gone."""
    args = ["train", "--config", "tiny", "--input", str(synth_dataset()), "--output", "run", "--nproc-per-node", "2"]
    p = mlet(*args, "sparse_optimizer.lr=1e30", "dense_optimizer.lr=1e30", "train.log_every=2", cwd=tmp_path)
    one_error_line(p, "training loss became nan at step", "Lower the learning rates")
    assert not (tmp_path / "run").exists()


def test_output_under_a_file_is_one_line_from_every_rank(trained, tmp_path):
    """An output whose parent path is a file (as unwritable as a parent gets for root): one line from the
    command, on 2 processes too, and the file is untouched."""
    (tmp_path / "afile").write_text("mine")
    p = mlet(
        "collapse",
        "--input",
        str(trained["run"]),
        "--output",
        "afile/col",
        "--nproc-per-node",
        "2",
        "--check-split",
        "none",
        cwd=tmp_path,
    )
    one_error_line(p, f"cannot write {tmp_path / 'afile' / 'col'}", "is not a directory")
    p = mlet("predict", "--input", str(trained["col"]), "--output", "afile/x.parquet", cwd=tmp_path)
    one_error_line(p, "is not a directory")
    assert (tmp_path / "afile").read_text() == "mine"
