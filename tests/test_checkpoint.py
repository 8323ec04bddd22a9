"""Checkpoints through mlet_torchrec.io, the run directory's claim, and damaged checkpoints.

Fast, single-process: atomic commit with the io marker, rotation and ``run.resume=false`` deleting only
what mlet marked, the run-directory refusals, a full disk (a real tmpfs where mounting is allowed, and
RLIMIT_FSIZE in a child process everywhere), and damaged checkpoints (truncated or garbled DCP files,
missing metadata, wrong shapes, another model's files) as one-line ``CheckpointError``s. The ``slow``
ones take a real trained run through ``mlet train`` (resume), ``mlet collapse`` and ``mlet evaluate``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mlet_torchrec.config import load_config
from mlet_torchrec.errors import UserError
from mlet_torchrec.io import MARKER, OutputError, atomic_output, claim_directory
from mlet_torchrec.training.checkpoint import (
    TRAIN_COMMAND,
    CheckpointError,
    check_checkpoint,
    complete_checkpoints,
    latest_checkpoint,
    load_model_state,
    remove_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from mlet_torchrec.training.distributed import process_group
from mlet_torchrec.training.locks import LOCK_FILE, RunDirLock
from mlet_torchrec.training.run_dir import prepare_run_dir

REPO = Path(__file__).resolve().parents[1]


class _Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(width, 2)


def _save(run_dir: Path, step: int, model: nn.Module, keep=None) -> Path:
    cfg = load_config(None, [f"run.dir={run_dir}"])
    return save_checkpoint(run_dir, step, {"model": model}, cfg, {}, keep=keep)


def _names(root: Path) -> list:
    return sorted(p.name for p in root.iterdir())


def _distcp(checkpoint: Path) -> Path:
    return next(p for p in checkpoint.iterdir() if p.suffix == ".distcp")


# --------------------------------------------------------------------------------- writing


def test_checkpoints_are_marked_rotated_and_resaved_in_place(tmp_path):
    model = _Net()
    for step in (2, 4, 6):
        _save(tmp_path, step, model, keep=2)
    root = tmp_path / "checkpoints"
    assert _names(root) == ["LATEST", "step_00000004", "step_00000006"]  # no temporaries left
    assert all(json.loads((p / MARKER).read_text())["command"] == TRAIN_COMMAND for p in complete_checkpoints(root))
    with torch.no_grad():
        model.lin.weight.fill_(3.0)
    _save(tmp_path, 6, model, keep=2)  # the same step again: swapped in whole
    assert _names(root) == ["LATEST", "step_00000004", "step_00000006"]
    fresh = _Net()
    load_model_state(root / "step_00000006", fresh)
    assert torch.equal(fresh.lin.weight, torch.full_like(fresh.lin.weight, 3.0))


def test_rotation_and_start_over_delete_only_marked_checkpoints(tmp_path):
    model = _Net()
    _save(tmp_path, 2, model)
    root = tmp_path / "checkpoints"
    (root / "step_00000002" / MARKER).unlink()  # e.g. written by an older mlet, or copied in by hand
    for step in (4, 6):
        _save(tmp_path, step, model, keep=1)
    assert _names(root) == ["LATEST", "step_00000002", "step_00000006"]  # the unmarked one is kept
    with pytest.raises(CheckpointError, match="step_00000002, which lacks mlet's marker"):
        remove_checkpoints(tmp_path)
    assert _names(root) == ["LATEST", "step_00000002", "step_00000006"]  # nothing deleted
    shutil.rmtree(root / "step_00000002")
    assert [p.name for p in remove_checkpoints(tmp_path)] == ["step_00000006"]
    assert _names(root) == []


def _full_disk_child(run_dir: Path, limit: int) -> dict:
    """Save step 4, then, with every file limited to ``limit`` bytes (RLIMIT_FSIZE, SIGXFSZ ignored so
    that write() fails with EFBIG), step 8: a real failing write, in a child process."""
    script = f"""
import json, resource, signal, sys
sys.path.insert(0, {str(REPO / "tests")!r})
from test_checkpoint import _Net, _save
from mlet_torchrec.training.checkpoint import CheckpointError
model = _Net(256)
_save({str(run_dir)!r}, 4, model)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
try:
    _save({str(run_dir)!r}, 8, model)
    print(json.dumps({{"error": None}}))
except CheckpointError as e:
    print(json.dumps({{"error": str(e)}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_previous_intact(run_dir: Path, message: str) -> None:
    assert "could not write checkpoint" in message and "step_00000008" in message
    assert "step_00000004 is intact" in message and "\n" not in message
    root = run_dir / "checkpoints"
    assert _names(root) == ["LATEST", "step_00000004"]  # the partial one removed, no temporaries
    assert (root / "LATEST").read_text().strip() == "step_00000004"
    assert check_checkpoint(root / "step_00000004")["step"] == 4
    load_model_state(root / "step_00000004", _Net(256))


def test_file_size_limit_while_saving_keeps_the_previous_checkpoint(tmp_path):
    result = _full_disk_child(tmp_path / "run", limit=1024)  # the 256x2 layer alone is 2 KiB
    assert result["error"] is not None and "File too large" in result["error"], result
    _assert_previous_intact(tmp_path / "run", result["error"])


def test_full_tmpfs_while_saving_keeps_the_previous_checkpoint(tmp_path):
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    model = _Net(16384)  # 128 KiB of weights per checkpoint
    one = _save(tmp_path / "sizing", 4, model)
    pages = sum(-(-f.stat().st_size // 4096) * 4096 for f in one.iterdir()) + 4096  # and LATEST
    size = pages * 3 // 2 // 4096 * 4096  # room for one checkpoint, not two
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        _save(tmp_path / "run", 4, model)
        with pytest.raises(CheckpointError) as err:
            _save(tmp_path / "run", 8, model)
        # ENOSPC from DCP's writer, or torch.save's "unexpected pos" explained
        assert "No space left on device" in str(err.value) or "is full" in str(err.value), str(err.value)
        assert "could not write checkpoint" in str(err.value) and "step_00000004 is intact" in str(err.value)
        root = tmp_path / "run" / "checkpoints"
        assert _names(root) == ["LATEST", "step_00000004"]
        load_model_state(root / "step_00000004", _Net(16384))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ---------------------------------------------------------------------------- damaged checkpoints


@pytest.fixture
def two_checkpoints(tmp_path) -> Path:
    model = _Net()
    _save(tmp_path, 2, model)
    _save(tmp_path, 4, model)
    return tmp_path


def _truncate(ckpt: Path) -> None:
    f = _distcp(ckpt)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _garble(ckpt: Path) -> None:
    f = _distcp(ckpt)
    f.write_bytes(os.urandom(f.stat().st_size))


DAMAGE = {
    "truncated data file": (_truncate, "is truncated"),
    "missing metadata": (lambda c: (c / ".metadata").unlink(), ".metadata is missing"),
    "garbled metadata": (lambda c: (c / ".metadata").write_bytes(b"\x80\x04garbage"), ".metadata is unreadable"),
    "garbled checkpoint.json": (
        lambda c: (c / "checkpoint.json").write_text('{"step": 4,'),
        "checkpoint.json is unreadable",
    ),
    "missing data file": (lambda c: _distcp(c).unlink(), "is missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_named_in_one_line(two_checkpoints, damage):
    corrupt, expected = DAMAGE[damage]
    newest = two_checkpoints / "checkpoints" / "step_00000004"
    corrupt(newest)
    for find in (latest_checkpoint, resolve_checkpoint):  # resume, and collapse/evaluate's lookup
        with pytest.raises(CheckpointError) as err:
            find(two_checkpoints)
        msg = str(err.value)
        assert isinstance(err.value, UserError) and "\n" not in msg
        assert f"checkpoint {newest} is damaged" in msg and expected in msg
        assert "delete it to use the one before (step_00000002)" in msg


def test_garbled_tensor_bytes_and_wrong_shapes_fail_on_load_in_one_line(two_checkpoints):
    newest = two_checkpoints / "checkpoints" / "step_00000004"
    with pytest.raises(CheckpointError) as err:  # another model's shapes
        load_model_state(newest, _Net(width=5))
    assert "could not load checkpoint" in str(err.value) and "\n" not in str(err.value)
    _garble(newest)  # same size, so only the load can tell
    assert check_checkpoint(newest)["step"] == 4
    with pytest.raises(CheckpointError) as err:
        load_model_state(newest, _Net())
    assert "could not load checkpoint" in str(err.value) and "\n" not in str(err.value)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_checkpoint(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        resolve_checkpoint(tmp_path)


# ------------------------------------------------------------------------------- the run directory


def _prepare(run_dir, data, *extra):
    cfg = load_config(None, [f"run.dir={run_dir}", f"data.path={data}", *extra])
    with process_group("cpu") as ctx, RunDirLock(cfg.run.dir) as lock:
        return prepare_run_dir(cfg, Path(cfg.run.dir), ctx, lock)


def test_run_dir_is_claimed_with_the_marker(tmp_path):
    assert _prepare(tmp_path / "runs" / "a", tmp_path / "data") is None
    assert json.loads((tmp_path / "runs" / "a" / MARKER).read_text())["command"] == TRAIN_COMMAND
    (tmp_path / "runs" / "a" / "metrics.jsonl").write_text("")
    assert _prepare(tmp_path / "runs" / "a", tmp_path / "data") is None  # ours: reused


def test_run_dir_refusals_are_one_line(tmp_path, monkeypatch):
    foreign = tmp_path / "thesis"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "precious.txt").write_text("keep")
    (foreign / "sub" / "thesis.tex").write_text("keep")
    data = tmp_path / "outer" / "data"
    data.mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    cases = {
        str(foreign): "holds files mlet did not write",
        str(data): "it is the input",
        str(tmp_path / "outer"): "contains the input",
        ".": "the working directory",
        "..": "a parent of the working directory",
        str(home): "the home directory",
        "/": "the file-system root",
    }
    for run_dir, expected in cases.items():
        with pytest.raises(OutputError) as err:
            _prepare(run_dir, data)
        assert expected in str(err.value) and "\n" not in str(err.value), run_dir
    assert (foreign / "precious.txt").read_text() == "keep" and (foreign / "sub" / "thesis.tex").is_file()
    assert sorted(p.name for p in foreign.iterdir()) == ["precious.txt", "sub"]


def test_other_outputs_are_neither_run_dirs_nor_checkpoints(tmp_path):
    """An export, a collapse output or a checkpoint handed to train as run.dir is refused (train once wrote its
    checkpoints into the export); a collapse output as run.init_from is named as such, not called damaged."""
    for name, command in [("export", "mlet export"), ("collapsed", "mlet collapse"), ("data", "convert criteo")]:
        with atomic_output(tmp_path / name, command=command) as tmp:
            (tmp / "manifest.json").write_text("{}")
            (tmp / ".metadata").write_bytes(b"x")
    _save(tmp_path / "run", 2, _Net())
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    for out, made_by in [("export", "mlet export"), ("data", "mlet convert criteo"), (step, "mlet train")]:
        before = sorted(p.name for p in (tmp_path / out).iterdir())
        with pytest.raises(OutputError, match=f"finished output of `{made_by}`"):
            _prepare(tmp_path / out, tmp_path / "elsewhere")
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == before
    with pytest.raises(CheckpointError, match=r"collapsed: an output of `mlet collapse`, not a training checkpoint"):
        resolve_checkpoint(tmp_path / "collapsed")
    assert resolve_checkpoint(tmp_path / "run") == step


def test_start_over_deletes_only_the_checkpoints(tmp_path):
    run = tmp_path / "run"
    claim_directory(run, command="train")
    _save(run, 2, _Net())
    (run / "metrics.jsonl").write_text("{}\n")
    assert _prepare(run, tmp_path / "data").name == "step_00000002"  # resume finds it
    assert _prepare(run, tmp_path / "data", "run.resume=false") is None
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, MARKER, "checkpoints", "metrics.jsonl"]
    assert _names(run / "checkpoints") == []


# ------------------------------------------------------------- end to end through the `mlet` CLI


@pytest.fixture(scope="module")
def runs(synth_dataset, tmp_path_factory):
    """A tiny DLRM run with checkpoints at steps 3 and 6, and one of another model (d=8, other MLP
    widths) whose checkpoint files are planted into copies of the first."""
    from mlet_torchrec.training.train import train

    data = synth_dataset()
    base = tmp_path_factory.mktemp("ckpt_cli")
    common = [
        f"data.path={data}",
        "train.max_steps=6",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=5",
        "train.progress=false",
    ]
    train(load_config(REPO / "configs" / "tiny.yaml", [f"run.dir={base / 'run'}", *common]))
    train(
        load_config(
            REPO / "configs" / "tiny.yaml", [f"run.dir={base / 'other'}", "embedding.d=8", "model.top_mlp=[8]", *common]
        )
    )
    return data, base / "run", base / "other"


def _mlet(*argv: str, capsys) -> tuple:
    from mlet_torchrec.cli.main import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


def _other_model(run: Path, other: Path) -> None:
    newest = run / "checkpoints" / "step_00000006"
    for f in newest.iterdir():
        if f.suffix == ".distcp" or f.name == ".metadata":
            f.unlink()
    for f in (other / "checkpoints" / "step_00000006").iterdir():
        if f.suffix == ".distcp" or f.name == ".metadata":
            shutil.copy(f, newest / f.name)


CLI_DAMAGE = {
    "truncated": lambda run, other: _truncate(run / "checkpoints" / "step_00000006"),
    "garbled tensors": lambda run, other: _garble(run / "checkpoints" / "step_00000006"),
    "missing metadata": lambda run, other: (run / "checkpoints" / "step_00000006" / ".metadata").unlink(),
    "another model": _other_model,
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(CLI_DAMAGE))
def test_damaged_checkpoint_through_the_cli_is_one_line_exit_2(runs, damage, tmp_path, capsys):
    data, trained, other = runs
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    CLI_DAMAGE[damage](run, other)
    newest = run / "checkpoints" / "step_00000006"
    commands = {
        "train": [
            "train",
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            f"data.path={data}",
            f"run.dir={run}",
            "train.max_steps=9",
            "train.checkpoint_every=3",
            "train.progress=false",
        ],
        "collapse": ["collapse", "--input", str(run), "--output", str(tmp_path / "collapsed")],
        "evaluate": ["evaluate", "--input", str(run)],
    }
    for name, argv in commands.items():
        code, err = _mlet(*argv, capsys=capsys)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (name, err[-2000:])
        errors = [line for line in lines if f"mlet {name}: error:" in line]
        assert len(errors) == 1 and "Traceback" not in err, (name, err[-2000:])
        assert str(newest) in errors[0] or "step_00000006" in errors[0], (name, errors[0])
    assert not (tmp_path / "collapsed").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["LATEST", "step_00000003", "step_00000006"]


@pytest.mark.slow
def test_resuming_with_other_shapes_is_one_line_exit_2(runs, tmp_path, capsys):
    data, trained, _ = runs
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    code, err = _mlet(
        "train",
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        f"data.path={data}",
        f"run.dir={run}",
        "embedding.d=8",
        "embedding.k=32",
        "train.progress=false",
        capsys=capsys,
    )
    errors = [line for line in err.splitlines() if "mlet train: error:" in line]
    assert code == 2 and len(errors) == 1, err[-2000:]
    assert "embedding.d: 4 in the checkpoint, 8 now" in errors[0] and "embedding.k" in errors[0]


@pytest.mark.slow
def test_damaged_checkpoint_in_a_fresh_process_exits_2(runs, tmp_path):
    _, trained, _ = runs
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    _truncate(run / "checkpoints" / "step_00000006")
    proc = subprocess.run(
        [sys.executable, "-m", "mlet_torchrec.cli", "evaluate", "--input", str(run)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "is truncated" in lines[0] and "Traceback" not in proc.stderr
