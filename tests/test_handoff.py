"""Worker hand-off (data_pipes/handoff.py): windows of batches through reused shared-memory slots give
the in-process batches, for any worker count, position and window size; the Batch builder joins parts."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import data_pipes.reader as reader_mod
from data_pipes.handoff import SLOTS
from data_pipes.reader import ParquetBatchReader, make_dataloader
from data_pipes.rows import Rows, to_batch
from data_pipes.schema import DatasetMeta, SparseFeature


def fingerprint(b) -> tuple:
    kjt = b.sparse_features
    return (
        tuple(b.labels.tolist()),
        tuple(b.dense_features.flatten().tolist()),
        tuple(kjt.values().tolist()),
        tuple(kjt.lengths().tolist()),
        tuple(kjt.length_per_key()),
    )


@pytest.mark.slow
@pytest.mark.parametrize("multi_hot", [0, 2])
def test_workers_reuse_slots_across_many_windows(synth_dataset, monkeypatch, multi_hot):
    root = synth_dataset(multi_hot_features=multi_hot, row_group_size=70)
    monkeypatch.setattr(reader_mod, "WINDOW_ROWS", 45)  # 3 batches a window; forked workers inherit it
    reader = ParquetBatchReader(root, "train", 15, rank=1, world_size=2, shuffle=True, seed=3, virtual_shards=12)
    reader.set_position(1, 2)
    expected = [fingerprint(b) for b in reader]
    assert reader.window_steps == 3 and len(expected) > 3 * (SLOTS + 1)  # every slot is reused
    for workers in (1, 3):
        assert [fingerprint(b) for b in make_dataloader(reader, workers)] == expected


@pytest.mark.slow
def test_last_batch_may_be_short_or_empty_with_workers(synth_dataset, monkeypatch):
    root = synth_dataset()
    monkeypatch.setattr(reader_mod, "WINDOW_ROWS", 64)
    reader = ParquetBatchReader(root, "train", 7, rank=2, world_size=3, drop_last=False, virtual_shards=12)
    expected = [fingerprint(b) for b in reader]
    assert len(expected[-1][0]) < 7  # the point of the test: a short last batch
    assert [fingerprint(b) for b in make_dataloader(reader, 2)] == expected


def test_to_batch_joins_parts_key_major():
    ids = np.arange(12).reshape(4, 3)  # rows 0..3, three id columns
    fixed = np.arange(8, dtype=np.float32).reshape(4, 2)  # label, one dense value
    bag = (np.array([100, 101, 102]), np.array([0, 1, 1, 3, 3]))  # rows: [100], [], [101, 102], []
    rows = Rows(fixed, ids, [bag])
    keys, multi_hot = ["a", "m", "b", "c"], [False, True, False, False]
    whole = to_batch([rows], keys, multi_hot)
    joined = to_batch([rows.slice(0, 1), rows.slice(1, 1), rows.slice(1, 4)], keys, multi_hot)
    assert fingerprint(joined) == fingerprint(whole)
    kjt = whole.sparse_features
    assert kjt["a"].values().tolist() == [0, 3, 6, 9]
    assert kjt["m"].values().tolist() == [100, 101, 102] and kjt["m"].lengths().tolist() == [1, 0, 2, 0]
    assert kjt["c"].values().tolist() == [2, 5, 8, 11]
    assert whole.labels.tolist() == [0, 2, 4, 6] and whole.dense_features.flatten().tolist() == [1, 3, 5, 7]
    assert whole.labels.untyped_storage().data_ptr() == kjt.values().untyped_storage().data_ptr()  # one buffer
    assert torch.equal(whole.sparse_features.lengths().view(4, 4)[0], torch.ones(4, dtype=torch.int64))


@pytest.mark.slow
def test_batches_held_by_training_outlive_the_slots_they_came_through(synth_dataset, monkeypatch):
    root = synth_dataset(row_group_size=70)
    monkeypatch.setattr(reader_mod, "WINDOW_ROWS", 30)  # 2 batches a window: slots are reused every 8 batches
    reader = ParquetBatchReader(root, "train", 15, virtual_shards=12)
    expected = [fingerprint(b) for b in reader]
    held = list(make_dataloader(reader, 1))  # every batch kept while the worker rewrites its slots
    assert len(held) > 2 * SLOTS * reader.window_steps
    assert [fingerprint(b) for b in held] == expected


def _wide_id_dataset(root: Path) -> Path:
    """Ids of feature "W" at and beyond 2**31 (cardinality 2**40); "N" narrow."""
    rows = np.arange(40)
    table = pa.table(
        {
            "label": pa.array((rows % 2).astype(np.float32)),
            "d": pa.array(rows.astype(np.float32)),
            "W": pa.array(2**31 - 20 + rows * 3, pa.int64()),
            "N": pa.array(rows % 7, pa.int64()),
        }
    )
    (root / "train").mkdir(parents=True)
    pq.write_table(table, root / "train/part-00000.parquet", row_group_size=16)
    sparse = [SparseFeature(name="W", cardinality=2**40), SparseFeature(name="N", cardinality=7)]
    DatasetMeta(dense=["d"], sparse=sparse, splits={"train": ["train/part-00000.parquet"]}, rows={"train": 40}).save(
        root
    )
    return root


@pytest.mark.slow
def test_ids_beyond_int32_keep_int64_through_workers(tmp_path, synth_dataset):
    assert ParquetBatchReader(synth_dataset(), "train", 8).id_dtype == np.int32  # the common case: half the bytes
    reader = ParquetBatchReader(_wide_id_dataset(tmp_path / "wide"), "train", 8, virtual_shards=4)
    assert reader.id_dtype == np.int64
    ids = sorted(v for b in reader for v in b.sparse_features["W"].values().tolist())
    assert ids == [2**31 - 20 + 3 * r for r in range(40)]
    assert [fingerprint(b) for b in make_dataloader(reader, 2)] == [fingerprint(b) for b in reader]
