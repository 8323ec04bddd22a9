"""Reliability, end to end on real processes (gloo): exact resume, a SIGKILLed rank under torchrun
restarts, a checkpoint killed mid-write, resharding on load (2 -> 1 rank, 1 -> 2 ranks with table-wise
-> row-wise), NaN guard, disk full while saving, tables that do not fit, hostile data in a 2-rank job.

Every run trains DLRM with row-wise Adagrad (fused, W1) and Adam (dense): both optimizers carry state,
so a resume that lost either would not reproduce the uninterrupted run. Row groups are one local batch
long, which makes a 2-rank global batch hold the same rows as a 1-process batch (see
test_distributed.py), so resharded resumes are compared with the same uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import reliability_entry
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from data_pipes.synth import SynthConfig, generate
from mlet_torchrec.config import ExperimentConfig, load_config
from mlet_torchrec.io import MARKER, claim_directory
from mlet_torchrec.training.checkpoint import CheckpointError, complete_checkpoints, read_checkpoint_info
from mlet_torchrec.training.guardrails import TablesDoNotFit, TrainingDiverged
from mlet_torchrec.training.launcher import run_local

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LOCAL_BATCH = 32
STEPS_PER_EPOCH = 12  # 800 train rows = 25 row groups of 32: 12 global batches of 64 per epoch
TOTAL = 2 * STEPS_PER_EPOCH


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel") / "data"
    generate(
        SynthConfig(
            rows=1000,
            num_dense=3,
            num_sparse=4,
            min_cardinality=10,
            max_cardinality=400,
            multi_hot_features=1,
            row_group_size=LOCAL_BATCH,
            seed=7,
        ),
        out,
        progress=False,
    )
    return out


def _config(dataset: Path, run_dir: Path, *extra: str) -> ExperimentConfig:
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={dataset}",
            f"run.dir={run_dir}",
            "embedding.sharding=table_wise",
            "sparse_optimizer.name=rowwise_adagrad",
            "sparse_optimizer.lr=0.05",
            "dense_optimizer.name=adam",
            "dense_optimizer.lr=0.01",
            f"train.batch_size={2 * LOCAL_BATCH}",
            "train.epochs=2",
            "train.checkpoint_every=4",
            "train.keep_checkpoints=2",
            "train.log_every=2",
            "train.seed=11",
            *extra,
        ],
    )


def _launch(cfg: ExperimentConfig, nproc: int, out: Path, **spec: Any) -> dict[str, Any]:
    return run_local(nproc, partial(reliability_entry.run, cfg.model_dump(mode="json"), {"out": str(out), **spec}))


def _results(out: Path) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(out.glob("result.*.json"))}


def _trace(out: Path, rank: int) -> dict[int, dict[str, Any]]:
    """step -> (epoch, batches, labels, ids) of this rank's batch, over all attempts (later ones win)."""
    steps: dict[int, dict[str, Any]] = {}
    for path in sorted(out.glob(f"trace.rank{rank}.attempt*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            steps[rec["step"]] = {k: rec[k] for k in ("epoch", "batches", "labels", "ids")}
    return steps


def _full_state(checkpoint: Path, tmp: Path) -> dict[str, Any]:
    """Every tensor of a DCP checkpoint, unsharded, flattened to 'model/...' and 'optimizer/...' keys."""
    target = tmp / f"full-{uuid.uuid4().hex[:6]}.pt"
    dcp_to_torch_save(str(checkpoint), str(target))
    state = torch.load(target, weights_only=False)
    target.unlink()
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}/{k}" if prefix else str(k))
        else:
            flat[prefix] = node

    walk(state, "")
    return flat


def _trained_state(checkpoint: Path, tmp: Path) -> dict[str, Any]:
    """What training computed: weights, optimizer state, step and data position (not the per-rank RNG
    entries, which follow the world size, nor the seconds spent)."""
    state = _full_state(checkpoint, tmp)
    return {k: v for k, v in state.items() if not k.startswith("rng_rank_") and k != "train_state/train_seconds"}


def _assert_same_state(got: Path, ref: Path, tmp: Path, atol: float = 0.0) -> None:
    a, b = _trained_state(got, tmp), _trained_state(ref, tmp)
    assert set(a) == set(b)
    assert {"train_state/step", "data_position/epoch", "data_position/batches_in_epoch"} <= set(a)
    tensors = [k for k in a if isinstance(a[k], torch.Tensor)]
    assert any("momentum1" in k for k in tensors) and any("exp_avg" in k for k in tensors)
    for key in tensors:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), f"{key}: max diff {(a[key] - b[key]).abs().max()}"
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=lambda m, key=key: f"{key}: {m}")


def _temporaries(run_dir: Path) -> list:
    """Leftovers of checkpoint writes: io's hidden temporaries (and the old ``.tmp``/``.old`` names)."""
    return [
        p.name
        for p in (run_dir / "checkpoints").iterdir()
        if ".mlet-tmp-" in p.name or ".mlet-old-" in p.name or p.name.endswith((".tmp", ".old"))
    ]


def _final(run_dir: Path) -> Path:
    found = complete_checkpoints(run_dir / "checkpoints")
    assert found, f"no complete checkpoint in {run_dir}"
    return found[-1]


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """The uninterrupted 2-rank run: run dir, trace dir, summary."""
    base = tmp_path_factory.mktemp("reference")
    summary = _launch(_config(dataset, base / "run"), 2, base / "out")
    assert summary["steps"] == TOTAL and summary["resumed_from"] is None
    return base / "run", base / "out", summary


@pytest.fixture(scope="module")
def stopped_two_ranks(dataset, tmp_path_factory):
    """A 2-rank run stopped at step 14 (epoch 1, 2 batches in); returns a pristine copy's maker."""
    base = tmp_path_factory.mktemp("stopped2")
    summary = _launch(_config(dataset, base / "run", "train.max_steps=14"), 2, base / "out")
    assert summary["steps"] == 14

    def copy(dest: Path) -> Path:
        shutil.copytree(base / "run", dest)
        return dest

    return copy


# --------------------------------------------------------------------------------- 1, 2: exact resume


def test_checkpoints_are_complete_rotated_and_hold_the_position(reference, tmp_path):
    run_dir, _, _ = reference
    found = complete_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in found] == ["step_00000020", f"step_{TOTAL:08d}"]  # keep_checkpoints=2
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == f"step_{TOTAL:08d}"
    assert not _temporaries(run_dir)
    assert all((p / MARKER).is_file() for p in found)  # each checkpoint carries the io marker
    assert (run_dir / MARKER).is_file()  # and so does the run directory mlet created
    info = read_checkpoint_info(found[0])
    assert info["step"] == 20 and info["world_size"] == 2
    assert info["plan"] and info["data_shape"]["rows"]["train"] == 800
    for name in ("config.yaml", "checkpoint.json", ".metadata"):
        assert (found[0] / name).is_file(), name
    # step, data position and each rank's RNG states are saved through DCP with the weights, as tensors
    state = _full_state(found[0], tmp_path)
    assert int(state["train_state/step"]) == 20
    position = {k.split("/")[1]: int(v) for k, v in state.items() if k.startswith("data_position/")}
    assert position == {"epoch": 1, "batches_in_epoch": 8, "virtual_shards": 96}
    for rank in (0, 1):
        assert {"torch", "numpy_keys", "python_words"} <= {
            k.split("/")[1] for k in state if k.startswith(f"rng_rank_{rank:05d}/")
        }
    assert not any(k.startswith("rng_rank_00002/") for k in state)


def test_resumed_run_equals_uninterrupted_run(dataset, stopped_two_ranks, reference, tmp_path):
    ref_dir, ref_out, ref_summary = reference
    run_dir = stopped_two_ranks(tmp_path / "run")
    out = tmp_path / "out"
    summary = _launch(_config(dataset, run_dir), 2, out)
    assert summary["start_step"] == 14 and summary["resumed_from"].endswith("step_00000014")
    assert summary["steps"] == TOTAL
    # same final weights and optimizer state, bit for bit, and the same metrics
    _assert_same_state(_final(run_dir), _final(ref_dir), tmp_path)
    assert summary["valid"] == ref_summary["valid"] and summary["test"] == ref_summary["test"]
    # the same batches in the same order on every rank after the resume (epoch 1 reshuffled)
    for rank in (0, 1):
        ref_trace, got = _trace(ref_out, rank), _trace(out, rank)
        assert sorted(got) == list(range(15, TOTAL + 1))
        assert all(got[s] == ref_trace[s] for s in got), f"rank {rank}: data order differs after the resume"
    # the same RNG states at the end
    got_state, ref_state = _full_state(_final(run_dir), tmp_path), _full_state(_final(ref_dir), tmp_path)
    rng_keys = [k for k in ref_state if k.startswith("rng_rank_")]
    assert {k.split("/")[0] for k in rng_keys} == {"rng_rank_00000", "rng_rank_00001"}
    assert all(torch.equal(got_state[k], ref_state[k]) for k in rng_keys)
    # metrics.jsonl records every logged step once
    steps = [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "train"
    ]
    assert steps == sorted(set(steps)) and steps[-1] == TOTAL


# ------------------------------------------------------------ 3: SIGKILL under torchrun restarts, mid-write


def test_sigkilled_ranks_restart_from_the_last_checkpoint(dataset, reference, tmp_path):
    """torchrun --max-restarts 2: rank 1 is SIGKILLed after step 10 (checkpoint 8 exists); the restart
    resumes from 8; then rank 0 is SIGKILLed while writing checkpoint 16 (its shard files on disk,
    nothing committed); the second restart resumes from 12, discards step 16's hidden temporary
    directory and finishes with the
    uninterrupted run's weights and optimizer state, bit for bit."""
    ref_dir, _, ref_summary = reference
    run_dir, out = tmp_path / "run", tmp_path / "out"
    cfg_file, spec_file = tmp_path / "config.json", tmp_path / "spec.json"
    cfg_file.write_text(json.dumps(_config(dataset, run_dir).model_dump(mode="json")))
    spec_file.write_text(
        json.dumps(
            {
                "out": str(out),
                "kill": {"step": 10, "rank": 1, "attempt": 0},
                "kill_in_write": {"step": 16, "rank": 0, "attempt": 1},
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            "--nproc-per-node=2",
            "--max-restarts=2",
            "--monitor-interval=0.2",
            str(Path(reliability_entry.__file__)),
            "--config",
            str(cfg_file),
            "--spec",
            str(spec_file),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    starts = {a: json.loads((out / f"start.attempt{a}.json").read_text()) for a in (0, 1, 2)}
    assert starts[0]["latest"] is None
    assert starts[1]["latest"] == "step_00000008"
    assert starts[2]["latest"] == "step_00000012"
    assert [d for d in starts[2]["dirs"] if d.startswith(".step_00000016.mlet-tmp-")]
    # the SIGKILLed ranks left no result; their peers failed in a collective and were restarted
    assert not (out / "result.rank1.attempt0.json").exists() and not (out / "result.rank0.attempt1.json").exists()
    final = json.loads((out / "result.rank0.attempt2.json").read_text())
    assert final["resumed_from"].endswith("step_00000012") and final["steps"] == TOTAL
    _assert_same_state(_final(run_dir), _final(ref_dir), tmp_path)
    assert final["test"] == ref_summary["test"]
    assert not _temporaries(run_dir)


# ----------------------------------------------------------------------------------- 4: resharding


@pytest.fixture(scope="module")
def resumed_on_one_rank(dataset, stopped_two_ranks, tmp_path_factory):
    """The 2-rank run stopped at step 14, resumed and finished on 1 process."""
    base = tmp_path_factory.mktemp("two_to_one")
    run_dir = stopped_two_ranks(base / "run")
    summary = _launch(_config(dataset, run_dir), 1, base / "out")
    return run_dir, summary


def test_two_rank_checkpoint_resumes_on_one_rank(resumed_on_one_rank, reference, tmp_path):
    ref_dir, _, ref_summary = reference
    run_dir, summary = resumed_on_one_rank
    assert summary["start_step"] == 14 and summary["steps"] == TOTAL
    assert read_checkpoint_info(_final(run_dir))["world_size"] == 1
    # 1 process reproduces 2 ranks up to float summation order (test_distributed.py's tolerance)
    _assert_same_state(_final(run_dir), _final(ref_dir), tmp_path, atol=1e-6)
    assert abs(summary["test"]["auc"] - ref_summary["test"]["auc"]) < 1e-4


def test_one_rank_checkpoint_resumes_on_two_ranks_row_wise(dataset, resumed_on_one_rank, reference, tmp_path):
    """The 1-process (table-wise) checkpoint of step 20 resumed on 2 ranks with every table row-wise:
    W1 and its row-wise Adagrad momentum are split over both ranks on load."""
    ref_dir, ref_out, ref_summary = reference
    run_dir = tmp_path / "run"
    shutil.copytree(resumed_on_one_rank[0], run_dir)
    shutil.rmtree(_final(run_dir))  # leave step 20 (1 process, table-wise) as the newest
    assert read_checkpoint_info(_final(run_dir))["world_size"] == 1
    out = tmp_path / "out"
    summary = _launch(_config(dataset, run_dir, "embedding.sharding=row_wise"), 2, out)
    assert summary["start_step"] == 20 and summary["steps"] == TOTAL
    plan = json.loads((run_dir / "plan.json").read_text())
    assert {p["sharding_type"] for p in plan.values()} == {"row_wise"}
    assert all(len(p["shards"]) == 2 for p in plan.values())  # every table (and its momentum) split
    _assert_same_state(_final(run_dir), _final(ref_dir), tmp_path, atol=1e-6)
    assert abs(summary["test"]["auc"] - ref_summary["test"]["auc"]) < 1e-4
    for rank in (0, 1):  # the resumed 2-rank job reads what the 2-rank reference read
        ref_trace, got = _trace(ref_out, rank), _trace(out, rank)
        assert sorted(got) == list(range(21, TOTAL + 1)) and all(got[s] == ref_trace[s] for s in got)


# ------------------------------------------------------------------------------------ 5: guardrails


def test_nan_loss_stops_every_rank_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out"
    with pytest.raises(TrainingDiverged):  # rank 1's weights become NaN after step 9
        _launch(_config(dataset, run_dir), 2, out, nan={"step": 9, "rank": 1})
    results = _results(out)
    assert set(results) == {"result.rank0.attempt0.json", "result.rank1.attempt0.json"}
    for r in results.values():  # both ranks stop at the same step with the same diagnosis
        assert r["error"] == "TrainingDiverged"
        assert "training loss became nan at step 10" in r["message"]
        assert "step_00000008, is intact" in r["message"] and "Lower the learning rates" in r["message"]
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["step_00000004", "step_00000008"]
    assert not _temporaries(run_dir)
    # the surviving checkpoint is whole and finite, and the run resumes from it
    state = _full_state(_final(run_dir), tmp_path)
    assert all(torch.isfinite(v).all() for v in state.values() if isinstance(v, torch.Tensor))


def _try_mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


def test_disk_full_while_saving_keeps_the_previous_checkpoint(dataset, reference, tmp_path):
    """A real full disk (a tmpfs that holds one checkpoint) where mounting is allowed, else ENOSPC
    injected into the DCP writer of rank 1."""
    run_dir, out = tmp_path / "run", tmp_path / "out"
    one = sum(f.stat().st_size for f in _final(reference[0]).iterdir())
    claim_directory(run_dir, command="train")  # as mlet would; then the mount point in it is ours too
    mounted = _try_mount_tmpfs(run_dir / "checkpoints", int(one * 1.6) // 4096 * 4096)
    spec = {} if mounted else {"enospc": {"step": 8, "rank": 1}}
    try:
        with pytest.raises(CheckpointError, match="could not write checkpoint"):
            _launch(_config(dataset, run_dir), 2, out, **spec)
        results = _results(out)
        assert len(results) == 2, results  # both ranks got as far as the checkpoint and report it
        for r in results.values():
            assert r["error"] == "CheckpointError", r
            assert "could not write checkpoint" in r["message"] and "step_00000008" in r["message"]
            assert "No space left on device" in r["message"]
            assert "the previous checkpoint" in r["message"] and "step_00000004 is intact" in r["message"]
        root = run_dir / "checkpoints"
        assert [p.name for p in complete_checkpoints(root)] == ["step_00000004"]
        assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step_00000004"]  # the partial one removed
        assert (root / "LATEST").read_text().strip() == "step_00000004"
        state = _full_state(root / "step_00000004", tmp_path)
        assert any("momentum1" in k for k in state)
    finally:
        if mounted:
            subprocess.run(["umount", str(run_dir / "checkpoints")], check=False)


def test_tables_that_do_not_fit_are_refused_with_the_numbers(dataset, tmp_path):
    huge = tmp_path / "huge"
    shutil.copytree(dataset, huge)
    meta = json.loads((huge / "metadata.json").read_text())
    meta["sparse"][0]["cardinality"] = 20_000_000_000  # ids stay valid; W1 alone would be ~1.2 TiB
    (huge / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(TablesDoNotFit):
        _launch(_config(huge, tmp_path / "run"), 2, tmp_path / "out")
    results = _results(tmp_path / "out")
    assert len(results) == 2  # rank 1 is told too, instead of waiting for rank 0's plan
    for r in results.values():
        assert r["error"] == "TablesDoNotFit"
        msg = r["message"]
        assert "the embedding tables do not fit in memory" in msg and "TiB" in msg
        assert f"t_{meta['sparse'][0]['name']}" in msg and "the 2 rank(s) have" in msg
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------------- 6: hostile data


def test_bad_row_group_mid_training_is_one_clear_error_under_torchrun(dataset, tmp_path):
    """Out-of-range ids in two row groups deep in the train split, 2 ranks under torchrun running the
    ``mlet`` CLI: the rank that reads one exits with the reader's one-line error (file, row group, row,
    column), the other rank is torn down (no hang), and no bad id reaches FBGEMM."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "bad"
    shutil.copytree(dataset, bad)
    meta = json.loads((bad / "metadata.json").read_text())
    feature = next(f for f in meta["sparse"] if not f["multi_hot"])
    path = bad / meta["splits"]["train"][0]
    pf = pq.ParquetFile(path)
    groups = [pf.read_row_group(g) for g in range(pf.metadata.num_row_groups)]
    for g in (20, 21):
        col = groups[g].column(feature["name"]).to_pylist()
        col[5] = feature["cardinality"] + 5
        groups[g] = groups[g].set_column(
            groups[g].schema.get_field_index(feature["name"]), feature["name"], pa.array(col, type=pa.int64())
        )
    with pq.ParquetWriter(path, groups[0].schema) as writer:
        for t in groups:
            writer.write_table(t)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            "--nproc-per-node=2",
            "--monitor-interval=0.2",
            "-m",
            "mlet_torchrec.cli",
            "train",
            "--config",
            str(REPO / "configs/tiny.yaml"),
            f"data.path={bad}",
            f"run.dir={tmp_path / 'run'}",
            "train.epochs=2",
            "train.batch_size=64",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "mlet train: error:" in line]
    assert errors, proc.stderr[-3000:]
    assert (
        f"column '{feature['name']}': id {feature['cardinality'] + 5} outside [0, {feature['cardinality']})"
        in errors[0]
    )
    assert str(path) in errors[0] and ("row group 20" in errors[0] or "row group 21" in errors[0])
    assert "fbgemm_gpu/" not in proc.stderr  # no traceback from inside FBGEMM
