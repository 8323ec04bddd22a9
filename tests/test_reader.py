"""ParquetBatchReader: content, shapes, rank/worker splits, counts from footers, shuffle, validation."""

from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, List, Optional, Sequence, Tuple

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
from data_pipes.errors import DataError
from data_pipes.reader import ParquetBatchReader, make_dataloader
from data_pipes.schema import DatasetMeta, SparseFeature

Row = Tuple[float, Tuple[float, ...], Tuple[Tuple[int, ...], ...]]

# ---------------------------------------------------------------------------------------------- helpers


def batch_rows(batch: Batch, keys: Sequence[str]) -> List[Row]:
    """The rows of a Batch as (label, dense values, ids per feature) tuples."""
    n = batch.labels.shape[0]
    per_key = []
    for key in keys:
        jt = batch.sparse_features[key]
        vals = jt.values().tolist()
        offs = [0, *np.cumsum(jt.lengths().numpy()).tolist()]
        per_key.append([tuple(vals[offs[i]:offs[i + 1]]) for i in range(n)])
    labels = batch.labels.tolist()
    dense = batch.dense_features.tolist()
    return [(labels[i], tuple(dense[i]), tuple(k[i] for k in per_key)) for i in range(n)]


def table_rows(table: pa.Table, meta: DatasetMeta) -> List[Row]:
    labels = table.column(meta.label).to_pylist()
    dense = [table.column(d).to_pylist() for d in meta.dense]
    sparse = []
    for f in meta.sparse:
        col = table.column(f.name).to_pylist()
        sparse.append([tuple(v) for v in col] if f.multi_hot else [(v,) for v in col])
    return [(labels[i], tuple(d[i] for d in dense), tuple(s[i] for s in sparse)) for i in range(table.num_rows)]


def split_rows(root: Path, split: str) -> List[Row]:
    meta = DatasetMeta.load(root)
    return [r for p in meta.files(root, split) for r in table_rows(pq.read_table(p), meta)]


def all_rows(batches: Iterable[Batch], keys: Sequence[str]) -> List[Row]:
    return [r for b in batches for r in batch_rows(b, keys)]


def iterate_as_worker(reader: ParquetBatchReader, monkeypatch, worker: int, workers: int) -> List[Batch]:
    """What DataLoader worker ``worker`` of ``workers`` yields (without starting processes)."""
    monkeypatch.setattr(reader_mod, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=workers))
    try:
        return list(reader)
    finally:
        monkeypatch.setattr(reader_mod, "get_worker_info", lambda: None)


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
    return pa.table({
        "label": pa.array((r % 3 == 0).astype(np.float32)),
        "d0": pa.array(r.astype(np.float32)),
        "d1": pa.array(np.sin(r).astype(np.float32)),
        "A": pa.array((r * 7) % 1000, pa.int64()),
        "B": pa.ListArray.from_arrays(pa.array(offsets), pa.array(bag_values.astype(np.int64))),
    })


def write_custom(root: Path, files: Sequence[Sequence[int]], split: str = "train",
                 tables: Optional[List[pa.Table]] = None, meta_rows: Optional[int] = None) -> Path:
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


def d0s(batches: Iterable[Batch]) -> List[int]:
    return [int(v) for b in batches for v in b.dense_features[:, 0].tolist()]


# ---------------------------------------------------------------------------------------------- content


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
    # every row, in file order, exactly as stored
    assert all_rows(batches, meta.sparse_names()) == split_rows(root, "train")

    dropped = list(ParquetBatchReader(root, "train", 64))
    assert len(dropped) == total // 64
    assert all_rows(dropped, meta.sparse_names()) == split_rows(root, "train")[: 64 * (total // 64)]


def test_no_dense_features_and_empty_bags(tmp_path):
    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    table = pa.table({
        "label": pa.array([0, 1, 1, 0, 1], pa.float32()),
        "B": pa.array([[], [3], [], [1, 2, 4], []], pa.list_(pa.int64())),
    })
    pq.write_table(table, root / "train/part-00000.parquet", row_group_size=2)
    DatasetMeta(sparse=[SparseFeature(name="B", cardinality=5, multi_hot=True)],
                splits={"train": ["train/part-00000.parquet"]}, rows={"train": 5}).save(root)
    (b,) = list(ParquetBatchReader(root, "train", 8, drop_last=False))
    assert b.dense_features.shape == (5, 0) and b.dense_features.dtype == torch.float32
    assert b.sparse_features.lengths().tolist() == [0, 1, 0, 3, 0]
    assert b.sparse_features.values().tolist() == [3, 1, 2, 4]
    assert b.labels.tolist() == [0, 1, 1, 0, 1]


def test_batches_span_row_groups_and_files(tmp_path):
    root = write_custom(tmp_path / "d", [[5, 0, 7], [3, 20]])
    reader = ParquetBatchReader(root, "train", 6, drop_last=False)
    batches = list(reader)
    assert [b.labels.shape[0] for b in batches] == [6, 6, 6, 6, 6, 5]
    assert d0s(batches) == list(range(35))
    meta = DatasetMeta.load(root)
    assert all_rows(batches, ["A", "B"]) == split_rows(root, "train")
    assert meta.files(root, "train")[0].name == "part-00000.parquet"


def test_reads_row_groups_never_whole_files(tmp_path, monkeypatch):
    root = write_custom(tmp_path / "d", [[10, 10, 10]])

    def forbidden(*args, **kwargs):
        raise AssertionError("whole-file read")

    monkeypatch.setattr(pq.ParquetFile, "read", forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)
    reader = ParquetBatchReader(root, "train", 4)
    assert d0s(reader) == list(range(28))
    # and the batch count comes from footers alone
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", forbidden)
    assert reader.num_batches() == 7 and reader.num_batches(3) == 6 and reader.num_rows() == 30


# ---------------------------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_are_disjoint_and_cover_all_rows(synth_dataset, shuffle):
    root = synth_dataset(multi_hot_features=1, row_group_size=70)
    keys = DatasetMeta.load(root).sparse_names()
    ranks = [ParquetBatchReader(root, "train", 32, rank=r, world_size=2, drop_last=False, shuffle=shuffle, seed=3)
             for r in range(2)]
    rows = [all_rows(r, keys) for r in ranks]
    assert rows[0] and rows[1]
    assert Counter(rows[0]) + Counter(rows[1]) == Counter(split_rows(root, "train"))
    assert not set(rows[0]) & set(rows[1])


def test_dataloader_workers_yield_the_same_rows(synth_dataset):
    root = synth_dataset(multi_hot_features=1, row_group_size=70)
    keys = DatasetMeta.load(root).sparse_names()
    reader = ParquetBatchReader(root, "train", 50, drop_last=False, shuffle=True, seed=1)
    reader.set_epoch(2)
    single = list(make_dataloader(reader, 0))
    multi = list(make_dataloader(reader, 2))
    assert all(isinstance(b, Batch) and isinstance(b.sparse_features, KeyedJaggedTensor) for b in multi)
    assert len(multi) == reader.num_batches(2) and len(single) == reader.num_batches(0)
    assert Counter(all_rows(multi, keys)) == Counter(all_rows(single, keys)) == Counter(split_rows(root, "train"))
    # drop_last with real workers: the count is still the footer count
    dropping = ParquetBatchReader(root, "train", 50, rank=1, world_size=2, shuffle=True, seed=1)
    assert len(list(make_dataloader(dropping, 2))) == dropping.num_batches(2)


@pytest.mark.parametrize("shuffle", [False, True])
def test_num_batches_equals_iteration(tmp_path, monkeypatch, shuffle):
    root = write_custom(tmp_path / "d", [[50, 7, 64, 13], [100, 1, 33], [0, 45]])
    for world_size in (1, 2, 3):
        for workers in (0, 1, 2, 3):
            for drop_last in (True, False):
                for rank in range(world_size):
                    reader = ParquetBatchReader(root, "train", 16, rank=rank, world_size=world_size,
                                                drop_last=drop_last, shuffle=shuffle, seed=5)
                    reader.set_epoch(1)
                    if workers == 0:
                        got = len(list(reader))
                    else:
                        got = sum(len(iterate_as_worker(reader, monkeypatch, w, workers)) for w in range(workers))
                    assert reader.num_batches(workers) == got, (world_size, rank, workers, drop_last)


def test_shuffle_is_deterministic_per_seed_and_epoch(tmp_path):
    root = write_custom(tmp_path / "d", [[10] * 12, [10] * 8])

    def order(seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> List[int]:
        r = ParquetBatchReader(root, "train", 10, rank=rank, world_size=world_size, shuffle=True, seed=seed)
        r.set_epoch(epoch)
        return d0s(r)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == list(range(200))
    assert order(0, 1) != list(range(200))
    # ranks cut the same permutation: together they cover every row each epoch
    for epoch in (0, 1):
        parts = [order(4, epoch, r, 2) for r in range(2)]
        assert sorted(parts[0] + parts[1]) == list(range(200))
        whole = order(4, epoch)
        units = [whole[i:i + 10] for i in range(0, 200, 10)]
        assert parts[0] == [v for u in units[0::2] for v in u]
    unshuffled = ParquetBatchReader(root, "train", 10)
    unshuffled.set_epoch(3)
    assert d0s(unshuffled) == list(range(200))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    files=st.lists(st.lists(st.integers(0, 30), min_size=1, max_size=5), min_size=1, max_size=3),
    batch_size=st.integers(1, 40),
    world_size=st.integers(1, 3),
    workers=st.integers(0, 3),
    drop_last=st.booleans(),
    shuffle=st.booleans(),
)
def test_property_counts_and_content(tmp_path_factory, monkeypatch, files, batch_size, world_size, workers,
                                     drop_last, shuffle):
    root = write_custom(tmp_path_factory.mktemp("prop"), files)
    total = sum(map(sum, files))
    seen: List[int] = []
    for rank in range(world_size):
        reader = ParquetBatchReader(root, "train", batch_size, rank=rank, world_size=world_size,
                                    drop_last=drop_last, shuffle=shuffle, seed=7)
        parts = ([list(reader)] if workers == 0 else
                 [iterate_as_worker(reader, monkeypatch, w, workers) for w in range(workers)])
        assert reader.num_batches(workers) == sum(map(len, parts))
        for batches in parts:
            sizes = [b.labels.shape[0] for b in batches]
            assert all(s == batch_size for s in sizes[:-1])
            if sizes:
                assert sizes[-1] == batch_size or (not drop_last and 0 < sizes[-1] < batch_size)
            seen += d0s(batches)
            for b in batches:  # each row's content is the stored one
                for row in batch_rows(b, ["A", "B"]):
                    i = int(row[1][0])
                    assert row == table_rows(custom_table(i, 1), DatasetMeta(**CUSTOM_META, splits={}))[0]
    assert len(seen) == len(set(seen))
    if not drop_last:
        assert sorted(seen) == list(range(total))


# ---------------------------------------------------------------------------------------------- validation


def bad_dataset(tmp_path: Path, mutate) -> Path:
    """One file, three row groups of 10 rows; ``mutate(columns dict)`` edits the 30-row table."""
    table = custom_table(0, 30)
    cols = {name: table.column(name) for name in table.column_names}
    mutate(cols)
    return write_custom(tmp_path / "bad", [[10, 10, 10]], tables=[pa.table(cols)])


def _set(values: list, i: int, v):
    values = list(values)
    values[i] = v
    return values


def read_all(root: Path, **kw) -> None:
    for _ in ParquetBatchReader(root, "train", 7, drop_last=False, **kw):
        pass


VALUE_ERRORS = {
    "negative id": (lambda c: c.update(A=pa.array(_set(c["A"].to_pylist(), 13, -1), pa.int64())), "A", "outside"),
    "id too large": (lambda c: c.update(A=pa.array(_set(c["A"].to_pylist(), 13, 1000), pa.int64())), "A", "outside"),
    "bag id too large": (
        lambda c: c.update(B=pa.array(_set(c["B"].to_pylist(), 13, [1, 50]), pa.list_(pa.int64()))), "B", "50"),
    "nan dense": (lambda c: c.update(d1=pa.array(_set(c["d1"].to_pylist(), 13, float("nan")), pa.float32())),
                  "d1", "not finite"),
    "inf dense": (lambda c: c.update(d0=pa.array(_set(c["d0"].to_pylist(), 13, float("inf")), pa.float32())),
                  "d0", "not finite"),
    "label 2": (lambda c: c.update(label=pa.array(_set(c["label"].to_pylist(), 13, 2.0), pa.float32())),
                "label", "not 0 or 1"),
    "label 0.5": (lambda c: c.update(label=pa.array(_set(c["label"].to_pylist(), 13, 0.5), pa.float32())),
                  "label", "not 0 or 1"),
    "null id": (lambda c: c.update(A=pa.array(_set(c["A"].to_pylist(), 13, None), pa.int64())), "A", "null"),
    "null in bag": (
        lambda c: c.update(B=pa.array(_set(c["B"].to_pylist(), 13, [1, None]), pa.list_(pa.int64()))), "B", "null"),
}


@pytest.mark.parametrize("case", sorted(VALUE_ERRORS))
def test_value_errors_name_file_row_group_row_and_column(tmp_path, case):
    mutate, column, what = VALUE_ERRORS[case]
    root = bad_dataset(tmp_path, mutate)
    with pytest.raises(DataError) as err:
        read_all(root)
    msg = str(err.value)
    assert "part-00000.parquet" in msg and "row group 1" in msg and "row 13" in msg, msg
    assert f"'{column}'" in msg and what in msg, msg


def test_out_of_range_ids_pass_only_without_validation(tmp_path):
    root = bad_dataset(tmp_path, VALUE_ERRORS["id too large"][0])
    read_all(root, validate=False)  # the caller opted out


@pytest.mark.parametrize(
    "mutate, column, what",
    [
        (lambda c: c.pop("d1"), "d1", "missing"),
        (lambda c: c.update(zzz=pa.array(np.zeros(30, np.float32))), "zzz", "unexpected"),
        (lambda c: c.update(A=c["A"].cast(pa.int32())), "A", "expected type int64, found int32"),
        (lambda c: c.update(label=c["label"].cast(pa.float64())), "label", "expected type float, found double"),
        (lambda c: c.update(B=c["B"].cast(pa.list_(pa.int32()))), "B", "expected type list<int64>, found list<int32>"),
        (lambda c: c.update(B=c["B"].combine_chunks().flatten()[:30]), "B", "expected type list<int64>, found int64"),
    ],
)
def test_schema_errors_name_file_and_column(tmp_path, mutate, column, what):
    root = bad_dataset(tmp_path, mutate)
    with pytest.raises(DataError) as err:
        ParquetBatchReader(root, "train", 8)
    msg = str(err.value)
    assert "part-00000.parquet" in msg and f"'{column}'" in msg and what in msg, msg


def test_truncated_file(tmp_path):
    root = write_custom(tmp_path / "d", [[10, 10]])
    path = root / "train/part-00000.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="part-00000.parquet.*truncated or corrupt"):
        ParquetBatchReader(root, "train", 8)
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="part-00000.parquet"):
        ParquetBatchReader(root, "train", 8)


def test_corrupt_page_names_row_group_and_column(tmp_path):
    root = write_custom(tmp_path / "d", [[10, 10, 10]])
    path = root / "train/part-00000.parquet"
    col = pq.ParquetFile(path).metadata.row_group(1).column(3)  # column A
    assert col.path_in_schema == "A"
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    end = start + col.total_compressed_size
    data = bytearray(path.read_bytes())
    data[end - 3] ^= 0xFF
    path.write_bytes(bytes(data))
    reader = ParquetBatchReader(root, "train", 7, drop_last=False)  # the footer is intact
    with pytest.raises(DataError) as err:
        list(reader)
    msg = str(err.value)
    assert "part-00000.parquet" in msg and "row group 1" in msg and "'A'" in msg, msg


def test_metadata_row_count_mismatch(tmp_path):
    root = write_custom(tmp_path / "d", [[10, 10]], meta_rows=25)
    with pytest.raises(DataError, match="should have 25 rows but its files hold 20"):
        ParquetBatchReader(root, "train", 8)
    ParquetBatchReader(root, "train", 8, validate=False)


def test_missing_file_and_bad_arguments(tmp_path):
    root = write_custom(tmp_path / "d", [[10]])
    with pytest.raises(ValueError, match="batch_size"):
        ParquetBatchReader(root, "train", 0)
    with pytest.raises(ValueError, match="rank"):
        ParquetBatchReader(root, "train", 4, rank=2, world_size=2)
    with pytest.raises(KeyError, match="no split 'valid'"):
        ParquetBatchReader(root, "valid", 4)
    (root / "train/part-00000.parquet").unlink()
    with pytest.raises(DataError, match="part-00000.parquet.*does not exist"):
        ParquetBatchReader(root, "train", 4)
