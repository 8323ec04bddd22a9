"""Parquet output of a conversion: one appender per split (per shard of the inputs), and the progress bar.

>>> import tempfile, pathlib, pyarrow as pa
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> schema = pa.schema([("label", pa.float32())])
>>> w = SplitWriter(root, "train", schema, rows_per_file=4, row_group_rows=2)
>>> w.write(pa.table({"label": pa.array([0.0, 1.0, 1.0, 0.0, 1.0], pa.float32())}))
>>> w.close(); w.files, w.rows
(['train/part-00000.parquet', 'train/part-00001.parquet'], 5)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pyarrow as pa
import pyarrow.parquet as pq

from data_pipes.convert.options import DEFAULT_ROW_GROUP_ROWS, DEFAULT_ROWS_PER_FILE

if TYPE_CHECKING:
    from tqdm import tqdm


class SplitWriter:
    """Appends tables of one split to ``SPLIT/STEM-NNNNN.parquet`` files of at most ``rows_per_file``
    rows, in row groups of ``row_group_rows`` rows (buffering at most one row group)."""

    def __init__(
        self,
        root: Path,
        split: str,
        schema: pa.Schema,
        *,
        rows_per_file: int = DEFAULT_ROWS_PER_FILE,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
        compression: str = "snappy",
        stem: str = "part",
    ) -> None:
        self.root, self.split, self.schema, self.stem = root, split, schema, stem
        self.row_group_rows = row_group_rows
        self.rows_per_file = max(rows_per_file, row_group_rows)
        self.compression = compression
        self.files: list[str] = []
        self.rows = 0
        self._buf: list[pa.Table] = []
        self._buffered = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if table.schema != self.schema:
            raise AssertionError(f"table schema {table.schema} differs from the data set schema {self.schema}")
        self._buf.append(table)
        self._buffered += table.num_rows
        if self._buffered >= self.row_group_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._buf:
            return
        t = pa.concat_tables(self._buf)
        self._buf, self._buffered = [], 0
        start = 0
        while t.num_rows - start >= self.row_group_rows or (final and start < t.num_rows):
            n = min(self.row_group_rows, t.num_rows - start, self.rows_per_file - self._file_rows)
            self._write_group(t.slice(start, n))
            start += n
        if start < t.num_rows:
            rest = t.slice(start)
            self._buf, self._buffered = [rest], rest.num_rows

    def _write_group(self, t: pa.Table) -> None:
        if self._writer is None:
            rel = f"{self.split}/{self.stem}-{len(self.files):05d}.parquet"
            (self.root / self.split).mkdir(parents=True, exist_ok=True)
            # use_compliant_nested_type=False: bags read back as list<item: int64>, exactly arrow_schema();
            # page checksums let the reader name a corrupt page instead of decoding garbage
            self._writer = pq.ParquetWriter(
                self.root / rel,
                self.schema,
                compression=self.compression,
                use_compliant_nested_type=False,
                write_page_checksum=True,
            )
            self.files.append(rel)
            self._file_rows = 0
        self._writer.write_table(t, row_group_size=t.num_rows)
        self._file_rows += t.num_rows
        self.rows += t.num_rows
        if self._file_rows >= self.rows_per_file:
            self._writer.close()
            self._writer = None
            self._file_rows = 0

    def close(self) -> None:
        self._flush(final=True)
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def progress_bar(total: int | None, desc: str, enabled: bool | None) -> tqdm[NoReturn]:
    """A tqdm bar counting rows (shows rows/s); ``enabled=None``: only when stderr is a terminal."""
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=" rows",
        unit_scale=True,
        disable=not enabled,
        file=sys.stderr,
        mininterval=0.5,
        dynamic_ncols=True,
        leave=True,
    )


__all__ = ["SplitWriter", "progress_bar"]
