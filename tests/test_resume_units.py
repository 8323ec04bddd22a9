"""The resume machinery in one process: starting an epoch at a position, checkpoint directories (atomic
commit, rotation, interrupted writes, disk full), run compatibility, optimizer-state templates, RNG,
memory guardrails. The multi-process behaviour is in test_reliability.py."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torchrec.distributed.planner.types import PlannerError, PlannerErrorType

import mlet_torchrec.training.state as ts
from data_pipes.reader import ParquetBatchReader
from data_pipes.schema import DatasetMeta
from mlet_torchrec.config import ConfigError, load_config
from mlet_torchrec.training.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    latest_checkpoint,
    read_checkpoint_info,
    remove_incomplete,
    resolve_checkpoint,
    save_checkpoint,
    saved_entries,
)
from mlet_torchrec.training.checkpointer import CheckpointManager
from mlet_torchrec.training.guardrails import (
    host_memory_available,
    memory_capacity,
    nonfinite_weights,
    table_memory,
    tables_do_not_fit,
)

# ------------------------------------------------------------------------------ skipping consumed batches


def _fingerprint(batches) -> list[tuple]:
    return [
        (
            tuple(b.labels.tolist()),
            tuple(b.sparse_features.values().tolist()),
            tuple(b.sparse_features.lengths().tolist()),
            tuple(b.dense_features.flatten().tolist()),
        )
        for b in batches
    ]


@pytest.fixture(scope="module")
def uneven_data(synth_dataset):
    # row groups of 37 rows (never a multiple of a batch), several files, a multi-hot feature
    return synth_dataset(rows=900, row_group_size=37, row_groups_per_file=4, multi_hot_features=1)


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    batch=st.integers(5, 80),
    world=st.integers(1, 3),
    rank_pick=st.integers(0, 2),
    shuffle=st.booleans(),
    epoch=st.integers(0, 3),
    skip_frac=st.floats(0, 1.2),
    virtual_shards=st.sampled_from([1, 6, 96]),
)
def test_a_position_yields_the_tail_of_a_full_epoch(
    uneven_data, batch, world, rank_pick, shuffle, epoch, skip_frac, virtual_shards
):
    kw = dict(rank=rank_pick % world, world_size=world, shuffle=shuffle, seed=3, virtual_shards=virtual_shards)
    full = ParquetBatchReader(uneven_data, "train", batch, **kw)
    full.set_epoch(epoch)
    expected = _fingerprint(full)
    skip = int(round(skip_frac * len(expected)))
    resumed = ParquetBatchReader(uneven_data, "train", batch, **kw)
    resumed.set_position(epoch, skip)
    assert _fingerprint(resumed) == expected[skip:]
    resumed.set_epoch(epoch + 1)  # the next epoch starts at its beginning
    full.set_epoch(epoch + 1)
    assert _fingerprint(resumed) == _fingerprint(full)


def test_a_position_with_real_dataloader_workers(uneven_data):
    kw = dict(rank=0, world_size=1, shuffle=True, seed=5)
    full = ParquetBatchReader(uneven_data, "train", 48, **kw)
    full.set_epoch(1)
    expected = _fingerprint(ts.dataloader(full, 0, seed=0, epoch=1))
    resumed = ParquetBatchReader(uneven_data, "train", 48, **kw)
    resumed.set_position(1, 5)
    assert _fingerprint(ts.dataloader(resumed, 2, seed=0, epoch=1)) == expected[5:]


def test_skipped_row_groups_are_not_decoded(uneven_data, monkeypatch):
    reader = ParquetBatchReader(uneven_data, "train", 40, shuffle=False, virtual_shards=1)
    reads = []
    orig = ParquetBatchReader._read
    monkeypatch.setattr(
        ParquetBatchReader, "_read", lambda self, pf, f, g: reads.append((f, g)) or orig(self, pf, f, g)
    )
    reader.set_position(0, 10)  # 400 rows = 10 whole row groups of 37 + 30 rows of the 11th
    next(iter(reader))
    assert reads[0] == (2, 2)  # file 2, row group 2: the 11th row group, the first one decoded


def test_dataloader_leaves_the_global_rng_alone(uneven_data):
    reader = ParquetBatchReader(uneven_data, "train", 64)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for _ in ts.dataloader(reader, 0, seed=1, epoch=0):
        pass
    assert torch.equal(before, torch.get_rng_state())


def test_a_loaded_position_is_checked_against_the_reader(uneven_data):
    reader = ParquetBatchReader(uneven_data, "train", 64)
    saved = ts.DataPosition(epoch=0, batches_in_epoch=3, virtual_shards=96).state_dict()
    position = ts.DataPosition(virtual_shards=reader.virtual_shards, epoch_steps=(12, 12))
    position.load_state_dict(saved)
    assert (position.epoch, position.batches_in_epoch) == (0, 3)
    position.check_reader("ckpt", reader)
    position.load_state_dict(ts.DataPosition(virtual_shards=12).state_dict())
    with pytest.raises(ConfigError, match="12 virtual shards, this reader uses 96"):
        position.check_reader("ckpt", reader)


def test_a_position_at_the_end_of_an_epoch_is_saved_and_loaded_as_the_next_epochs_start():
    position = ts.DataPosition(epoch=0, batches_in_epoch=12, virtual_shards=96, epoch_steps=(12, 12))
    saved = position.state_dict()
    assert (int(saved["epoch"]), int(saved["batches_in_epoch"])) == (1, 0)
    assert (position.epoch, position.batches_in_epoch) == (0, 12)  # the live position is the loop's
    shorter = ts.DataPosition(epoch_steps=(10, 10))  # e.g. fewer batches per epoch after a change
    shorter.load_state_dict(ts.DataPosition(epoch=0, batches_in_epoch=11, epoch_steps=(12, 12)).state_dict())
    assert (shorter.epoch, shorter.batches_in_epoch) == (1, 0)


def test_normalize_position():
    assert ts.normalize_position(0, 12, [12, 12]) == (1, 0)
    assert ts.normalize_position(0, 5, [12, 12]) == (0, 5)
    assert ts.normalize_position(0, 14, [12, 10]) == (1, 0)  # a shorter epoch at another world size
    assert ts.normalize_position(1, 10, [12, 10]) == (2, 0)


# --------------------------------------------------------------------------------------- RNG, optimizer


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # numpy caches the second Gaussian: that is state too
    rng = ts.RngState(rank=0, device=torch.device("cpu"))
    torch.save(rng.state_dict(), tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    rng.load_state_dict(torch.load(tmp_path / "r.pt", weights_only=True))
    got = (torch.rand(3), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


def test_the_manager_saves_step_position_and_rng_with_the_model_and_reports_a_missing_rank(tmp_path):
    import random

    cpu = torch.device("cpu")
    state, position = ts.TrainState(step=8, train_seconds=2.5), ts.DataPosition(epoch=1, batches_in_epoch=3)
    entries = {"model": _Tiny(), "train_state": state, "data_position": position, "rng_rank_00000": ts.RngState(0, cpu)}
    cfg = load_config(None, [f"run.dir={tmp_path}", "train.checkpoint_every=4"])
    manager = CheckpointManager(tmp_path, cfg, entries)
    assert [s for s in range(1, 13) if manager.due(s, 12)] == [4, 8]  # step 12 is the final checkpoint's
    random.seed(4)
    checkpoint = manager.save(8, {})
    after_save = random.random()
    assert manager.last == checkpoint and read_checkpoint_info(checkpoint)["step"] == 8
    assert saved_entries(checkpoint) == {"model", "train_state", "data_position", "rng_rank_00000"}

    # a job with a second rank: rank 1's RNG states are not in the checkpoint, and that is allowed
    loaded_state, loaded_position = ts.TrainState(), ts.DataPosition()
    rngs = {ts.RngState.name(r): ts.RngState(r, cpu) for r in (0, 1)}
    restored = CheckpointManager(
        tmp_path, cfg, {"train_state": loaded_state, "data_position": loaded_position, **rngs}, optional=rngs
    )
    random.seed(5)
    assert restored.load(checkpoint) == {"rng_rank_00001"}
    assert loaded_state == state and (loaded_position.epoch, loaded_position.batches_in_epoch) == (1, 3)
    assert random.random() == after_save  # rank 0's states were applied
    # a warm start loads only what it names
    assert restored.load(checkpoint, names=["train_state"]) == set()
    # an entry that is not optional must be there
    strict = CheckpointManager(tmp_path, cfg, {"rng_rank_00001": ts.RngState(1, cpu)})
    with pytest.raises(CheckpointError, match="could not load checkpoint"):
        strict.load(checkpoint)


def test_init_optimizer_state_creates_state_without_moving_parameters():
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

    model = nn.Linear(4, 3)
    params = dict(model.named_parameters())
    dense = KeyedOptimizerWrapper(params, lambda ps: torch.optim.Adam(list(ps), lr=0.1, weight_decay=0.5))
    opt = CombinedOptimizer([("dense", dense)])
    before = {k: v.detach().clone() for k, v in params.items()}
    ts.init_optimizer_state(opt)
    assert all(torch.equal(before[k], v) for k, v in params.items())
    assert all(p.grad is None for p in params.values())
    assert set(opt.state_dict()["state"]) == {"dense.weight", "dense.bias"}
    assert dense.param_groups[0]["lr"] == 0.1


# ------------------------------------------------------------------------------------ checkpoint dirs


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)


def _save(run_dir: Path, step: int, model: nn.Module, keep=None):
    cfg = load_config(None, [f"run.dir={run_dir}"])
    return save_checkpoint(run_dir, step, {"model": model}, cfg, {}, keep=keep)


def test_checkpoints_commit_atomically_and_keep_the_newest(tmp_path):
    model = _Tiny()
    for step in (2, 4, 6, 8):
        _save(tmp_path, step, model, keep=2)
    root = tmp_path / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000006", "step_00000008"]
    assert (root / "LATEST").read_text().strip() == "step_00000008"
    info = read_checkpoint_info(root / "step_00000008")
    assert info["step"] == 8 and info["world_size"] == 1
    # re-saving a step replaces it in place
    _save(tmp_path, 8, model, keep=2)
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000006", "step_00000008"]


def test_interrupted_writes_are_ignored_and_cleaned(tmp_path):
    model = _Tiny()
    _save(tmp_path, 4, model)
    root = tmp_path / "checkpoints"
    # a write killed before its commit leaves io's hidden temporary with data but no checkpoint.json
    killed = root / ".step_00000008.mlet-tmp-999999999-abcdef12"
    killed.mkdir()
    (killed / "__0_0.distcp").write_bytes(b"partial")
    # and a crash between commit and LATEST, or a LATEST naming a deleted checkpoint
    (root / "LATEST").write_text("step_00000012\n")
    assert latest_checkpoint(tmp_path).name == "step_00000004"
    assert resolve_checkpoint(tmp_path).name == "step_00000004"
    assert remove_incomplete(tmp_path) == [killed]
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step_00000004"]


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    model = _Tiny()
    _save(tmp_path, 4, model)

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(FileSystemWriter, "write_data", full)
    with pytest.raises(CheckpointError) as err:
        _save(tmp_path, 8, model)
    msg = str(err.value)
    assert "could not write checkpoint" in msg and "step_00000008" in msg and "No space left on device" in msg
    assert "step_00000004 is intact" in msg
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step_00000004"]
    assert (root / "LATEST").read_text().strip() == "step_00000004"


# ------------------------------------------------------------------------------------- compatibility


def test_check_resumable_lists_what_differs(synth_dataset):
    data = synth_dataset()
    meta = DatasetMeta.load(data)
    saved = load_config(None, [f"data.path={data}", "embedding.k=16", "train.batch_size=64"])
    info = {"data_shape": ts.data_shape(meta)}
    # how it runs may change: sharding, world size (not in the config), lr, epochs, intervals, data path
    same = load_config(
        None,
        [
            f"data.path={data}",
            "embedding.k=16",
            "train.batch_size=64",
            "embedding.sharding=row_wise",
            "sparse_optimizer.lr=0.01",
            "train.epochs=3",
            "train.checkpoint_every=7",
            "run.dir=elsewhere",
        ],
    )
    ts.check_resumable("ckpt", saved, same, info, meta)
    changed = load_config(
        None, [f"data.path={data}", "embedding.k=32", "train.batch_size=128", "sparse_optimizer.name=adagrad"]
    )
    with pytest.raises(ConfigError) as err:
        ts.check_resumable("ckpt", saved, changed, info, meta)
    msg = str(err.value)
    assert "\n" not in msg  # one line, its items apart (the CLI once joined the lines into "32 now sparse_...")
    assert "embedding.k: 16 in the checkpoint, 32 now; " in msg
    assert "train.batch_size: 64 in the checkpoint, 128 now" in msg
    assert "sparse_optimizer.name: 'sgd' in the checkpoint, 'adagrad' now" in msg and "run.resume=false" in msg
    other = dict(info, data_shape={**info["data_shape"], "rows": {"train": 1}})
    with pytest.raises(ConfigError, match="cardinalities or row counts differ"):
        ts.check_resumable("ckpt", saved, saved, other, meta)


# ---------------------------------------------------------------------------------------- guardrails


def test_memory_capacity_is_this_machines():
    mem = host_memory_available()
    assert 0 < mem["available"] <= mem["meminfo"]
    caps = memory_capacity(torch.device("cpu"))
    assert set(caps) == {"ddr_cap"} and 0 < caps["ddr_cap"] <= mem["available"]


def test_tables_do_not_fit_message_has_the_numbers(synth_dataset):
    meta = DatasetMeta.load(synth_dataset())
    meta = meta.model_copy(
        update={
            "sparse": [f.model_copy(update={"cardinality": 10**10}) if i == 0 else f for i, f in enumerate(meta.sparse)]
        }
    )
    cfg = load_config(None, ["embedding.d=8", "embedding.k=32", "sparse_optimizer.name=adagrad"])
    need = table_memory(meta, cfg)
    assert (
        need["weights"] == sum(f.cardinality * 32 * 4 for f in meta.sparse)
        and need["optimizer_state"] == need["weights"]
    )
    half = table_memory(
        meta, cfg.model_copy(update={"embedding": cfg.embedding.model_copy(update={"w1_dtype": "fp16"})})
    )
    assert half["weights"] == need["weights"] // 2 and half["optimizer_state"] == need["optimizer_state"]  # fp32 state
    err = tables_do_not_fit(
        PlannerError("...\nShard of size X does not fit on any rank.", PlannerErrorType.INSUFFICIENT_STORAGE),
        meta,
        cfg,
        4,
        {"ddr_cap": 8 * 2**30},
        torch.device("cpu"),
    )
    msg = str(err)
    assert isinstance(err, ConfigError)
    assert "needs 2.33 TiB (W1 1.16 TiB + adagrad state 1.16 TiB" in msg
    assert "the 4 rank(s) have 8.00 GiB of host memory each" in msg and "27.20 GiB in all" in msg
    assert f"largest table t_{meta.sparse[0].name}" in msg and "does not fit on any rank" in msg


def test_uvm_cached_tables_are_checked_against_host_memory_and_their_cache_against_the_gpu(synth_dataset, monkeypatch):
    """With embedding.uvm_caching the tables live in host memory behind a GPU cache: tables larger than the GPU
    but within host memory pass; the same tables without UVM caching, or a cache larger than the GPU, are refused."""
    from mlet_torchrec.training import guardrails

    meta = DatasetMeta.load(synth_dataset())
    big = [f.model_copy(update={"cardinality": 10**6}) if i == 0 else f for i, f in enumerate(meta.sparse)]
    meta = meta.model_copy(update={"sparse": big})
    cfg = load_config(None, ["embedding.d=8", "embedding.k=32", "train.batch_size=64", "train.eval_batch_size=64"])
    need = table_memory(meta, cfg)["total"]  # 10**6 rows x 32 fp32 and more: > 128 MiB
    caps = {"ddr_cap": 16 * need, "hbm_cap": need // 2}
    monkeypatch.setattr(guardrails, "memory_capacity", lambda device: dict(caps))
    gpu = torch.device("cuda")
    with pytest.raises(ConfigError, match="have .* of GPU memory each"):
        guardrails.checked_capacity(meta, cfg, 1, gpu)
    uvm = load_config(
        None,
        [
            "embedding.d=8",
            "embedding.k=32",
            "train.batch_size=64",
            "train.eval_batch_size=64",
            "embedding.uvm_caching=true",
            "embedding.uvm_cache_load_factor=0.2",
        ],
    )
    assert guardrails.checked_capacity(meta, uvm, 1, gpu) == caps
    greedy = uvm.model_copy(update={"embedding": uvm.embedding.model_copy(update={"uvm_cache_load_factor": 1.0})})
    with pytest.raises(ConfigError, match="GPU cache of the UVM-cached tables.*uvm_cache_load_factor"):
        guardrails.checked_capacity(meta, greedy, 1, gpu)
    caps["ddr_cap"] = need // 2  # host memory too small for the tables themselves
    with pytest.raises(ConfigError, match=r"host memory \(UVM caching\) each"):
        guardrails.checked_capacity(meta, uvm, 1, gpu)


def test_nonfinite_weights_names_them():
    model = _Tiny()
    assert nonfinite_weights(model) == []
    with torch.no_grad():
        model.lin.bias[1] = float("inf")
    assert nonfinite_weights(model, chunk_rows=1) == ["lin.bias"]


def test_config_keys_for_resume():
    cfg = load_config(None, [])
    assert cfg.run.resume is True and cfg.train.keep_checkpoints == 3
    with pytest.raises(ConfigError, match="train.keep_checkpoints"):
        load_config(None, ["train.keep_checkpoints=0"])
    assert json.loads(json.dumps(cfg.model_dump(mode="json")))["run"]["resume"] is True


def test_restarts_get_an_isolated_process_group_store(monkeypatch):
    """torchrun's agent keeps one TCPStore across restarts; a restarted worker on one node prefixes its
    process-group keys with the attempt, and the TorchX component opts multi-node jobs out of sharing."""
    from launch import components
    from mlet_torchrec.training.distributed import _restarted_attempt_store

    for key in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    assert _restarted_attempt_store(None) is None  # not under torchrun
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert _restarted_attempt_store(None) is None  # first attempt: nothing stale
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _restarted_attempt_store(None) is None  # several nodes: restart counts may differ per node
    assert components.train("c.yaml", max_restarts=2).roles[0].env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in components.train("c.yaml").roles[0].env


def test_rowwise_adagrad_state_cannot_change_its_column_split():
    tw = {"m.t_a": {"sharding_type": "table_wise", "shards": [{"offsets": [0, 0], "sizes": [10, 16]}]}}
    rw = {
        "m.t_a": {
            "sharding_type": "row_wise",
            "shards": [{"offsets": [0, 0], "sizes": [5, 16]}, {"offsets": [5, 0], "sizes": [5, 16]}],
        }
    }
    cw = {
        "m.t_a": {
            "sharding_type": "column_wise",
            "shards": [{"offsets": [0, 0], "sizes": [10, 8]}, {"offsets": [0, 8], "sizes": [10, 8]}],
        }
    }
    ts.check_optimizer_layout("ckpt", tw, rw, "rowwise_adagrad")  # row-wise <-> table-wise reshard freely
    ts.check_optimizer_layout("ckpt", tw, cw, "adagrad")  # full Adagrad state has the weights' shape
    with pytest.raises(ConfigError, match="t_a: table_wise with 1 column shard\\(s\\) -> column_wise with 2"):
        ts.check_optimizer_layout("ckpt", tw, cw, "rowwise_adagrad")
