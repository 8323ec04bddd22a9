"""ParquetBatchReader validation: bad values, schemas and files are one error naming file, row group, row
and column."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_reader import custom_table, write_custom

from data_pipes.errors import DataError
from data_pipes.reader import ParquetBatchReader


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
        lambda c: c.update(B=pa.array(_set(c["B"].to_pylist(), 13, [1, 50]), pa.list_(pa.int64()))),
        "B",
        "50",
    ),
    "nan dense": (
        lambda c: c.update(d1=pa.array(_set(c["d1"].to_pylist(), 13, float("nan")), pa.float32())),
        "d1",
        "not finite",
    ),
    "inf dense": (
        lambda c: c.update(d0=pa.array(_set(c["d0"].to_pylist(), 13, float("inf")), pa.float32())),
        "d0",
        "not finite",
    ),
    "label 2": (
        lambda c: c.update(label=pa.array(_set(c["label"].to_pylist(), 13, 2.0), pa.float32())),
        "label",
        "not 0 or 1",
    ),
    "label 0.5": (
        lambda c: c.update(label=pa.array(_set(c["label"].to_pylist(), 13, 0.5), pa.float32())),
        "label",
        "not 0 or 1",
    ),
    "null id": (lambda c: c.update(A=pa.array(_set(c["A"].to_pylist(), 13, None), pa.int64())), "A", "null"),
    "null in bag": (
        lambda c: c.update(B=pa.array(_set(c["B"].to_pylist(), 13, [1, None]), pa.list_(pa.int64()))),
        "B",
        "null",
    ),
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
