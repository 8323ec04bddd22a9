"""ParquetBatchReader: content, shapes, rank/worker splits, counts from footers, shuffle (validation:
test_reader_validation.py)."""

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

import data_pipes.reader as reader_mod
from data_pipes.reader import ParquetBatchReader, make_dataloader
from data_pipes.rows import join_batches
from data_pipes.schema import DatasetMeta, SparseFeature

Row = tuple[float, tuple[float, ...], tuple[tuple[int, ...], ...]]

# ---------------------------------------------------------------------------------------------- helpers


def batch_rows(batch: Batch, keys: Sequence[str]) -> list[Row]:
    """The rows of a Batch as (label, dense values, ids per feature) tuples."""
    n = batch.labels.shape[0]
    per_key = []
    for key in keys:
        jt = batch.sparse_features[key]
        vals = jt.values().tolist()
        offs = [0, *np.cumsum(jt.lengths().numpy()).tolist()]
        per_key.append([tuple(vals[offs[i] : offs[i + 1]]) for i in range(n)])
    labels = batch.labels.tolist()
    dense = batch.dense_features.tolist()
    return [(labels[i], tuple(dense[i]), tuple(k[i] for k in per_key)) for i in range(n)]


def table_rows(table: pa.Table, meta: DatasetMeta) -> list[Row]:
    labels = table.column(meta.label).to_pylist()
    dense = [table.column(d).to_pylist() for d in meta.dense]
    sparse = []
    for f in meta.sparse:
        col = table.column(f.name).to_pylist()
        sparse.append([tuple(v) for v in col] if f.multi_hot else [(v,) for v in col])
    return [(labels[i], tuple(d[i] for d in dense), tuple(s[i] for s in sparse)) for i in range(table.num_rows)]


def split_rows(root: Path, split: str) -> list[Row]:
    meta = DatasetMeta.load(root)
    return [r for p in meta.files(root, split) for r in table_rows(pq.read_table(p), meta)]


def all_rows(batches: Iterable[Batch], keys: Sequence[str]) -> list[Row]:
    return [r for b in batches for r in batch_rows(b, keys)]


def iterate_as_worker(reader: ParquetBatchReader, monkeypatch, worker: int, workers: int) -> list[Batch]:
    """What DataLoader worker ``worker`` of ``workers`` yields (without starting processes)."""
    real = reader_mod.get_worker_info
    monkeypatch.setattr(reader_mod, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))
    try:
        return list(reader)
    finally:
        monkeypatch.setattr(reader_mod, "get_worker_info", real)


CUSTOM_META = dict(
    dense=["d0", "d1"],
    sparse=[SparseFeature(name="A", cardinality=1000), SparseFeature(name="B", cardinality=50, multi_hot=True)],
)


def custom_table(start: int, n: int) -> pa.Table:
    """Rows ``start..start+n``: d0 is the row number, B has bags of 0..3 ids (empty bags included)."""
    r = np.arange(start, start + n)
    lengths = r % 4
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    bag_values = (np.repeat(r, lengths) + np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)) % 50
    return pa.table(
        {
            "label": pa.array((r % 3 == 0).astype(np.float32)),
            "d0": pa.array(r.astype(np.float32)),
            "d1": pa.array(np.sin(r).astype(np.float32)),
            "A": pa.array((r * 7) % 1000, pa.int64()),
            "B": pa.ListArray.from_arrays(pa.array(offsets), pa.array(bag_values.astype(np.int64))),
        }
    )


def write_custom(
    root: Path,
    files: Sequence[Sequence[int]],
    split: str = "train",
    tables: list[pa.Table] | None = None,
    meta_rows: int | None = None,
) -> Path:
    """A data set whose split has ``len(files)`` files with the given row-group sizes."""
    root.mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    rel, start = [], 0
    for i, sizes in enumerate(files):
        table = tables[i] if tables is not None else custom_table(start, sum(sizes))
        path = f"{split}/part-{i:05d}.parquet"
        with pq.ParquetWriter(root / path, table.schema, write_page_checksum=True) as w:
            off = 0
            for size in sizes:
                w.write_table(table.slice(off, size), row_group_size=max(size, 1))
                off += size
        rel.append(path)
        start += sum(sizes)
    rows = start if meta_rows is None else meta_rows
    DatasetMeta(**CUSTOM_META, splits={split: rel}, rows={split: rows}).save(root)
    return root


def d0s(batches: Iterable[Batch]) -> list[int]:
    return [int(v) for b in batches for v in b.dense_features[:, 0].tolist()]


# ---------------------------------------------------------------------------------------------- content


def stream_order(rows: int, virtual_shards: int) -> list[int]:
    """The unshuffled epoch order (data_pipes/order.py): stream row t is row t // V of shard t % V."""
    lengths = [rows // virtual_shards + (v < rows % virtual_shards) for v in range(virtual_shards)]
    starts = np.cumsum([0, *lengths])
    return [int(starts[t % virtual_shards]) + t // virtual_shards for t in range(rows)]


def test_batches_have_documented_shapes_and_exact_content(synth_dataset):
    root = synth_dataset(multi_hot_features=2, row_group_size=100)
    meta = DatasetMeta.load(root)
    reader = ParquetBatchReader(root, "train", 64, drop_last=False)
    batches = list(reader)
    total = meta.rows["train"]
    assert len(batches) == -(-total // 64) == reader.num_batches()
    for i, b in enumerate(batches):
        n = 64 if i < len(batches) - 1 else total - 64 * (len(batches) - 1)
        assert isinstance(b, Batch) and isinstance(b.sparse_features, KeyedJaggedTensor)
        assert b.dense_features.shape == (n, 3) and b.dense_features.dtype == torch.float32
        assert b.labels.shape == (n,) and b.labels.dtype == torch.float32
        kjt = b.sparse_features
        assert kjt.keys() == meta.sparse_names()
        assert kjt.values().dtype == torch.int64 and kjt.lengths().dtype == torch.int64
        assert kjt.stride() == n and kjt.lengths().shape == (len(meta.sparse) * n,)
        lengths = kjt.lengths().view(len(meta.sparse), n)
        assert (lengths[:2] == 1).all()  # single-id features
        assert kjt.length_per_key() == lengths.sum(1).tolist()
    # every row exactly as stored, in the interleaved order of the virtual shards (within a batch, by shard)
    stored = split_rows(root, "train")
    order = stream_order(total, 96)
    got = all_rows(batches, meta.sparse_names())
    for s in range(len(batches)):
        assert sorted(got[64 * s : 64 * (s + 1)]) == sorted(stored[i] for i in order[64 * s : 64 * (s + 1)])
    assert Counter(got) == Counter(stored)

    dropped = list(ParquetBatchReader(root, "train", 64))
    assert len(dropped) == total // 64 == reader.num_batches() - 1
    assert all_rows(dropped, meta.sparse_names()) == got[: 64 * (total // 64)]


def test_no_dense_features_and_empty_bags(tmp_path):
    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    table = pa.table(
        {
            "label": pa.array([0, 1, 1, 0, 1], pa.float32()),
            "B": pa.array([[], [3], [], [1, 2, 4], []], pa.list_(pa.int64())),
        }
    )
    pq.write_table(table, root / "train/part-00000.parquet", row_group_size=2)
    DatasetMeta(
        sparse=[SparseFeature(name="B", cardinality=5, multi_hot=True)],
        splits={"train": ["train/part-00000.parquet"]},
        rows={"train": 5},
    ).save(root)
    (b,) = list(ParquetBatchReader(root, "train", 8, drop_last=False))
    assert b.dense_features.shape == (5, 0) and b.dense_features.dtype == torch.float32
    assert b.sparse_features.lengths().tolist() == [0, 1, 0, 3, 0]
    assert b.sparse_features.values().tolist() == [3, 1, 2, 4]
    assert b.labels.tolist() == [0, 1, 1, 0, 1]


def test_one_virtual_shard_reads_in_file_order_across_row_groups_and_files(tmp_path):
    root = write_custom(tmp_path / "d", [[5, 0, 7], [3, 20]])
    reader = ParquetBatchReader(root, "train", 6, drop_last=False, virtual_shards=1)
    batches = list(reader)
    assert [b.labels.shape[0] for b in batches] == [6, 6, 6, 6, 6, 5]
    assert d0s(batches) == list(range(35))
    assert all_rows(batches, ["A", "B"]) == split_rows(root, "train")


def test_reads_row_groups_never_whole_files(tmp_path, monkeypatch):
    root = write_custom(tmp_path / "d", [[10, 10, 10]])

    def forbidden(*args, **kwargs):
        raise AssertionError("whole-file read")

    monkeypatch.setattr(pq.ParquetFile, "read", forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)
    reader = ParquetBatchReader(root, "train", 4, virtual_shards=3)
    assert sorted(d0s(reader)) == sorted(stream_order(30, 3)[:28])
    # and the batch count comes from footers alone
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", forbidden)
    assert reader.num_batches() == 7 and reader.num_batches(3) == 7 and reader.num_rows() == 30
    assert reader.rows_per_epoch() == 28


# ---------------------------------------------------------------------------------------------- splitting


def global_steps(root: Path, batch: int, world_size: int, epoch: int = 1, **kw) -> list[list[int]]:
    """Per global step, the sorted rows (d0) all ranks of ``world_size`` read; checks the local sizes."""
    per_rank = []
    for rank in range(world_size):
        reader = ParquetBatchReader(root, "train", batch // world_size, rank=rank, world_size=world_size, **kw)
        reader.set_epoch(epoch)
        per_rank.append([d0s([b]) for b in reader])
        assert len(per_rank[-1]) == reader.num_batches()
    steps = [sorted(r for ranks in per_rank for r in ranks[s]) for s in range(len(per_rank[0]))]
    if kw.get("drop_last", True):
        assert all(len(ranks[s]) == batch // world_size for ranks in per_rank for s in range(len(steps)))
    return steps


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("virtual_shards", [96, 12])
def test_global_batches_do_not_depend_on_world_size(tmp_path, shuffle, virtual_shards):
    root = write_custom(tmp_path / "d", [[50, 7, 64, 13], [100, 1, 33], [0, 45]])  # 313 rows
    for drop_last in (True, False):
        kw = dict(shuffle=shuffle, seed=5, virtual_shards=virtual_shards, drop_last=drop_last)
        reference = global_steps(root, 24, 1, **kw)
        for world_size in (2, 3, 4, 6, 8):  # 8 does not divide 12 shards: same batches, more reading
            assert global_steps(root, 24, world_size, **kw) == reference, (world_size, drop_last)
        seen = [r for step in reference for r in step]
        assert len(seen) == len(set(seen)) == (313 // 24 * 24 if drop_last else 313)


@pytest.mark.parametrize("world_size", [1, 3, 5])
def test_stream_rows_name_each_rows_stream_position(tmp_path, world_size):
    root = write_custom(tmp_path / "d", [[50, 7, 64], [100, 1, 33]])  # 255 rows
    order = stream_order(255, 12)
    for rank in range(world_size):
        reader = ParquetBatchReader(
            root, "train", 4, rank=rank, world_size=world_size, virtual_shards=12, drop_last=False
        )
        for step, batch in enumerate(reader):
            t = reader.stream_rows(step)
            assert d0s([batch]) == [order[i] for i in t]
            assert all(i % world_size == rank and step * 4 * world_size <= i < (step + 1) * 4 * world_size for i in t)


def test_a_rank_decodes_only_its_shards(tmp_path, monkeypatch):
    root = write_custom(tmp_path / "d", [[10] * 6, [10] * 6])  # 12 row groups = 12 shards of 10 rows
    decoded: list[tuple[int, int]] = []
    orig = ParquetBatchReader._read
    monkeypatch.setattr(
        ParquetBatchReader, "_read", lambda self, pf, f, g: decoded.append((f, g)) or orig(self, pf, f, g)
    )
    for world_size in (1, 2, 3, 4, 6, 12, 5):
        for rank in range(world_size):
            for shuffle in (False, True):
                decoded.clear()
                reader = ParquetBatchReader(
                    root,
                    "train",
                    2,
                    rank=rank,
                    world_size=world_size,
                    shuffle=shuffle,
                    virtual_shards=12,
                    drop_last=False,
                )
                list(reader)
                groups = {6 * f + g for f, g in decoded}
                if 12 % world_size:  # gcd(12, 5) = 1: every rank decodes all of it
                    assert len(groups) == 12
                elif shuffle:  # shard v is some row group, decoded once
                    assert len(groups) == len(decoded) == 12 // world_size
                else:  # shard v is row group v
                    assert sorted(groups) == sorted(decoded_ids(decoded)) == list(range(rank, 12, world_size))


def decoded_ids(decoded: list[tuple[int, int]]) -> list[int]:
    return [6 * f + g for f, g in decoded]


def test_positions_and_workers_give_the_same_batches(synth_dataset, monkeypatch):
    root = synth_dataset(multi_hot_features=1, row_group_size=70)
    reader = ParquetBatchReader(root, "train", 50, rank=1, world_size=3, shuffle=True, seed=1)
    reader.set_epoch(2)
    full = [fingerprint(b) for b in reader]
    for workers in (1, 2, 3):  # worker parts, joined as make_dataloader joins real workers' parts
        parts = [iterate_as_worker(reader, monkeypatch, w, workers) for w in range(workers)]
        assert [fingerprint(join_batches(list(p), reader.keys)) for p in zip(*parts, strict=True)] == full
    assert [fingerprint(b) for b in make_dataloader(reader, 2)] == full  # real worker processes
    reader.set_position(2, 7)
    assert [fingerprint(b) for b in reader] == full[7:]
    assert [fingerprint(b) for b in make_dataloader(reader, 2)] == full[7:]


def fingerprint(b: Batch) -> tuple:
    kjt = b.sparse_features
    return (
        tuple(b.labels.tolist()),
        tuple(b.dense_features.flatten().tolist()),
        tuple(kjt.values().tolist()),
        tuple(kjt.lengths().tolist()),
    )


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path):
    root = write_custom(tmp_path / "d", [[10] * 12, [10] * 8])

    def order(seed: int, epoch: int, shuffle: bool = True) -> list[int]:
        r = ParquetBatchReader(root, "train", 10, shuffle=shuffle, seed=seed, virtual_shards=4)
        r.set_epoch(epoch)
        return d0s(r)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == list(range(200))
    assert order(0, 3, shuffle=False) == order(1, 0, shuffle=False)
    plain, stream = order(0, 0, shuffle=False), stream_order(200, 4)
    assert all(sorted(plain[i : i + 10]) == sorted(stream[i : i + 10]) for i in range(0, 200, 10))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    files=st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=5), min_size=1, max_size=3),
    local_batch=st.integers(1, 12),
    world_size=st.integers(1, 5),
    virtual_shards=st.sampled_from([1, 2, 6, 96]),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
)
def test_property_counts_and_content(
    tmp_path_factory, files, local_batch, world_size, virtual_shards, drop_last, shuffle
):
    root = write_custom(tmp_path_factory.mktemp("prop"), files)
    total = sum(map(sum, files))
    kw = dict(drop_last=drop_last, shuffle=shuffle, seed=7, virtual_shards=virtual_shards)
    steps = global_steps(root, local_batch * world_size, world_size, **kw)
    assert steps == global_steps(root, local_batch * world_size, 1, **kw)
    seen = [r for s in steps for r in s]
    assert (
        len(seen)
        == len(set(seen))
        == (total if not drop_last else total // (local_batch * world_size) * local_batch * world_size)
    )
    reader = ParquetBatchReader(root, "train", local_batch, rank=world_size - 1, world_size=world_size, **kw)
    meta = DatasetMeta(**CUSTOM_META, splits={})
    for b in reader:  # each row's content is the stored one
        for row in batch_rows(b, ["A", "B"]):
            assert row == table_rows(custom_table(int(row[1][0]), 1), meta)[0]
