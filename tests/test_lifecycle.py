"""The process-group lifecycle: ``train`` leaves no process group, thread or worker behind, on success
and on error, and a group the caller set up is left to the caller.

The multi-rank side (a finished 2-rank job exits 0, never SIGABRT at interpreter exit, even after ranks
were SIGKILLed and restarted) is tests/test_reliability.py's kill-a-rank test; tests/stress/
kill_rank_stress.sh runs it 20 times in a row beside two CPU hogs.
"""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mlet_torchrec.config import load_config
from mlet_torchrec.training.checkpoint import CheckpointError
from mlet_torchrec.training.distributed import process_group
from mlet_torchrec.training.train import train

REPO = Path(__file__).resolve().parents[1]


def _threads() -> set:
    return {t.ident for t in threading.enumerate() if t.is_alive()}


def _config(data: Path, run_dir: Path, *extra: str):
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={data}",
            f"run.dir={run_dir}",
            "train.max_steps=4",
            "train.checkpoint_every=2",
            "train.progress=true",
            "data.num_workers=1",
            *extra,
        ],
    )


def test_train_shuts_everything_down_on_success_and_on_error(synth_dataset, tmp_path):
    data = synth_dataset()
    before = _threads()
    result = train(_config(data, tmp_path / "run"))  # tqdm bar, TensorBoard writer, a DataLoader worker
    assert result.steps == 4
    assert not dist.is_initialized()
    assert _threads() == before, [t.name for t in threading.enumerate()]
    assert not multiprocessing.active_children()

    newest = result.checkpoint
    (newest / ".metadata").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):  # raised inside the group, after it was set up
        train(_config(data, tmp_path / "run", "train.max_steps=6"))
    assert not dist.is_initialized()
    assert _threads() == before
    assert not multiprocessing.active_children()


def test_a_group_the_caller_owns_is_left_alone(synth_dataset, tmp_path):
    with process_group("cpu") as ctx:
        assert ctx.world_size == 1
        train(_config(synth_dataset(), tmp_path / "run", "train.progress=false", "data.num_workers=0"))
        assert dist.is_initialized()  # still the caller's
        t = torch.ones(1)
        dist.all_reduce(t)
    assert not dist.is_initialized()


def test_process_group_shuts_down_on_error():
    with pytest.raises(ValueError, match="boom"):
        with process_group("cpu"):
            raise ValueError("boom")
    assert not dist.is_initialized()


def test_a_user_error_on_one_rank_stops_the_others_quietly(tmp_path):
    # under load a slower rank is still running when the first one fails with a UserError; stopping it
    # ("Terminating process ... via signal SIGTERM") is housekeeping, not a second message for the user
    import subprocess
    import sys
    import time
    from pathlib import Path

    entry = Path(__file__).with_name("launch_entry.py")
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(entry)], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["error: data/x.parquet: column label, row 7: 3 is not 0 or 1"]
    assert time.time() - t0 < 100  # rank 1 (sleeping 120 s) was stopped, not waited for


def test_a_local_launch_puts_back_the_callers_signal_handlers():
    """Elastic installs its own SIGINT/SIGTERM handlers in the launching process and leaves them; after run_local
    a Ctrl-C in a caller that goes on (a sweep, a notebook) must be the caller's, not elastic's SignalException."""
    import signal

    import launch_entry  # tests/ is on sys.path (pytest's prepend import mode), as for reliability_entry

    from mlet_torchrec.training.launcher import run_local

    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not called")

    before = {number: signal.signal(number, mine) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert run_local(2, launch_entry.rank, log_level="WARNING") == 0
        assert signal.getsignal(signal.SIGINT) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def test_ctrl_c_during_a_local_launch_is_a_keyboard_interrupt_and_the_handler_is_the_callers_again():
    import os
    import signal
    import time

    import launch_entry

    from mlet_torchrec.training.launcher import run_local

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, as in a script
    timer = threading.Timer(5.0, os.kill, (os.getpid(), signal.SIGINT))  # what the terminal sends
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_local(2, launch_entry.busy, log_level="WARNING")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - t0 < 100  # the ranks (busy for 120 s) were stopped, not waited for


def test_the_ctrl_c_log_filter_drops_only_the_forwarded_sigint_records():
    """Elastic's two Ctrl-C records go; a crash record that holds a 2 (exit code, local rank) stays."""
    import logging
    import signal

    from mlet_torchrec.training.launcher import _OnCtrlC

    def kept(msg: str, *args: object) -> bool:
        return _OnCtrlC().filter(logging.LogRecord("elastic", logging.ERROR, "", 0, msg, args, None))

    assert not kept("Received %s death signal, shutting down workers", signal.SIGINT)
    assert not kept("Closing process %s via signal %s", 4242, "SIGINT")
    assert kept("Received %s death signal, shutting down workers", signal.SIGTERM)
    assert kept("Closing process %s via signal %s", 4242, "SIGTERM")
    assert kept("failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", 2, 2, 4242, "python")
    assert kept("local_rank %s exited", signal.SIGINT.value)
