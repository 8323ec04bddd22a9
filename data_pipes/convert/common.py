"""What every converter shares: streamed text blocks, value checks, the two-pass engine, Parquet output.

A conversion is a :class:`ConvertJob`: input files (each with a fixed split or a seeded random split),
a per-format ``parse`` function turning a block of text columns into labels, dense values and raw
categorical values, and the feature list. :func:`run_job` then

1. streams the train inputs once to count categorical values (:class:`~data_pipes.convert.vocab.VocabCounter`;
   skipped when every feature is hashed),
2. streams every input again, encodes ids and appends rows to per-split Parquet writers,
3. writes ``metadata.json`` and moves the finished directory into place.

Memory does not depend on the input size: text is read in chunks of ``block_size`` bytes cut at line
ends, each parsed by ``pyarrow.csv.read_csv`` (explicit column names, every column a string, no
inference, no quoting; see :func:`iter_blocks`), all per-row work is vectorised (Arrow compute and
NumPy), and each split writer buffers at most one row group. Only the vocabularies grow, with the
number of distinct values (see :mod:`data_pipes.convert.vocab`); hashed features need no memory at all.
Measured (``benchmarks/convert_memory.py``, synthetic Criteo text): peak RSS ~235 MiB for 1M rows and
the same for 4M and 10M rows with hashing; ~240-270 MiB with vocabularies.

Output is written to a temporary sibling directory (``.NAME.tmp-*``) and renamed into place only when
complete; on any error (or Ctrl-C) the temporary directory is removed and nothing is left behind.

Rows are named by their 1-based line in the file (a header is line 1), e.g.
``criteo train.tsv: row 1234, column I5: 'abc' is not a number``.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from data_pipes.errors import DataError
from data_pipes.schema import METADATA_FILE, SPLITS, DatasetMeta, SparseFeature
from data_pipes.convert.vocab import OOV_ID, Encoder, HashEncoder, VocabCounter

DEFAULT_BLOCK_SIZE = 4 << 20  # text per block (~16K Criteo rows); memory is a few times this
# The trainer's reader shuffles and shards by row group, so groups are small (as data_pipes.synth's).
DEFAULT_ROW_GROUP_ROWS = 8192
DEFAULT_ROWS_PER_FILE = 64 * DEFAULT_ROW_GROUP_ROWS
DENSE_TRANSFORM = "log(1 + max(x, 0)); missing -> 0"

SplitFractions = Tuple[float, float, float]


# --------------------------------------------------------------------------------------------- options


@dataclass
class ConvertOptions:
    """Options shared by every converter (the CLI flags of the same names).

    ``hash_buckets``: an int hashes every categorical feature into that many rows; a mapping
    ``{feature: buckets}`` hashes only those features (key ``"*"`` for all others); features not hashed
    get a vocabulary of the values seen at least ``min_count`` times in the train split.
    """

    min_count: int = 1
    hash_buckets: Union[None, int, Mapping[str, int]] = None
    seed: int = 0
    lenient: bool = False
    overwrite: bool = False
    progress: Optional[bool] = None  # None: show a progress bar when stderr is a terminal
    block_size: int = DEFAULT_BLOCK_SIZE
    rows_per_file: int = DEFAULT_ROWS_PER_FILE
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS
    compression: str = "snappy"

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        if self.block_size < 4096:
            raise ValueError(f"block_size must be >= 4096 bytes, got {self.block_size}")
        if self.row_group_rows < 1 or self.rows_per_file < 1:
            raise ValueError("rows_per_file and row_group_rows must be >= 1")
        buckets = self.hash_buckets
        if buckets is not None and not isinstance(buckets, Mapping):
            buckets = {"*": buckets}
        for name, n in (buckets or {}).items():
            if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 2:
                raise ValueError(f"hash buckets for {name!r} must be an integer >= 2 (row 0 is the OOV id), got {n!r}")
        self.hash_buckets = dict(buckets) if buckets else None

    def as_dict(self) -> dict:
        return {"min_count": self.min_count, "hash_buckets": self.hash_buckets, "seed": self.seed,
                "lenient": self.lenient, "block_size": self.block_size, "rows_per_file": self.rows_per_file,
                "row_group_rows": self.row_group_rows, "compression": self.compression}


def check_fractions(split: Sequence[float]) -> SplitFractions:
    """``(train, valid, test)`` fractions: three numbers >= 0 summing to 1, train > 0."""
    fr = tuple(float(x) for x in split)
    if len(fr) != 3 or any(not np.isfinite(x) or x < 0 for x in fr) or abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0:
        raise ValueError(f"split fractions must be three numbers >= 0 (train, valid, test) summing to 1 "
                         f"with train > 0, got {list(split)}")
    return fr  # type: ignore[return-value]


def row_uniforms(seed: int, stream: int, start: int, n: int) -> np.ndarray:
    """Uniform [0, 1) numbers for rows ``start..start+n-1`` of one input: a counter-based generator
    (splitmix64 of the row index), so the split of a row does not depend on block boundaries."""
    base = (int(seed) * 0x9E3779B97F4A7C15 + (int(stream) + 1) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = np.arange(start, start + n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(base)
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def assign_splits(fractions: SplitFractions, seed: int, stream: int, start: int, n: int) -> np.ndarray:
    """Split codes (0 train, 1 valid, 2 test) of ``n`` rows drawn with ``fractions``."""
    u = row_uniforms(seed, stream, start, n)
    return (u >= fractions[0]).astype(np.int8) + (u >= fractions[0] + fractions[1]).astype(np.int8)


# --------------------------------------------------------------------------------------------- issues


class IssueCounter:
    """Lenient-mode counts: values replaced (by 0 / the OOV id) and rows dropped, per column and kind."""

    def __init__(self) -> None:
        self.values_replaced: Dict[str, Dict[str, int]] = {}
        self.rows_dropped: Dict[str, Dict[str, int]] = {}

    def add(self, column: str, kind: str, n: int, drop: bool) -> None:
        table = self.rows_dropped if drop else self.values_replaced
        per = table.setdefault(column, {})
        per[kind] = per.get(kind, 0) + int(n)

    @property
    def total_values_replaced(self) -> int:
        return sum(sum(v.values()) for v in self.values_replaced.values())

    @property
    def total_rows_dropped(self) -> int:
        return sum(sum(v.values()) for v in self.rows_dropped.values())

    def as_dict(self) -> dict:
        return {"values_replaced": self.values_replaced, "rows_dropped": self.rows_dropped,
                "total_values_replaced": self.total_values_replaced,
                "total_rows_dropped": self.total_rows_dropped}


def show_value(v: object, limit: int = 40) -> str:
    if v is None or v == "" or v == b"":
        return "empty value"
    if isinstance(v, bytes):
        v = v.decode("utf-8", "backslashreplace")
    s = str(v)
    return repr(s if len(s) <= limit else s[:limit] + "...")


class BlockChecker:
    """Collects the bad values of one block. Strict: the first bad (row, column) of the block raises a
    :class:`DataError` at :meth:`finish`. Lenient: counts them; ``drop`` marks rows to leave out."""

    def __init__(self, prefix: str, first_line: int, n: int, lenient: bool, issues: IssueCounter) -> None:
        self.prefix, self.first_line, self.lenient, self.issues = prefix, first_line, lenient, issues
        self.drop = np.zeros(n, dtype=bool)
        self._first: Optional[Tuple[int, int, str]] = None
        self._order = 0

    def bad(self, column: str, mask: np.ndarray, values: Union[pa.Array, Sequence], kind: str,
            drop: bool = False) -> bool:
        """Report ``mask`` rows of ``column`` as bad: message ``<value> <kind>``, e.g. ``'x' is not a number``."""
        self._order += 1
        if not mask.any():
            return False
        if self.lenient:
            self.issues.add(column, kind.removeprefix("is "), int(mask.sum()), drop)
            if drop:
                self.drop |= mask
            return True
        i = int(np.argmax(mask))
        if self._first is None or i < self._first[0]:
            v = values[i]
            v = v.as_py() if isinstance(v, pa.Scalar) else v
            msg = f"{self.prefix}: row {self.first_line + i}, column {column}: {show_value(v)} {kind}"
            self._first = (i, self._order, msg)
        return True

    def finish(self) -> None:
        if self._first is not None:
            raise DataError(self._first[2])


# --------------------------------------------------------------------------------------------- parsers

_NUMBER_RE = (r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
              r"|^[+-]?([nN][aA][nN]|[iI][nN][fF]([iI][nN][iI][tT][yY])?)$")


def _to_float64(arr: pa.Array) -> Tuple[pa.Array, np.ndarray]:
    """Cast strings to float64; unparsable values become null and are flagged in the returned mask."""
    n = len(arr)
    try:
        return pc.cast(arr, pa.float64()), np.zeros(n, dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    if not pa.types.is_string(arr.type):
        arr = arr.cast(pa.string())
    ok = pc.match_substring_regex(arr, _NUMBER_RE)
    bad = pc.invert(ok).fill_null(False).to_numpy(zero_copy_only=False)
    masked = pc.if_else(ok, arr, pa.scalar(None, arr.type))
    try:
        return pc.cast(masked, pa.float64()), bad
    except pa.ArrowInvalid:  # the regex let through something Arrow rejects: element by element (rare)
        out = []
        for j, v in enumerate(masked.to_pylist()):
            try:
                out.append(None if v is None else pc.cast(pa.scalar(v), pa.float64()).as_py())
            except pa.ArrowInvalid:
                out.append(None)
                bad[j] = True
        return pa.array(out, pa.float64()), bad


def parse_numbers(arr: pa.Array, column: str, check: BlockChecker, drop: bool = False
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Numbers of a string column: ``(values, ok)``; missing, non-numeric and non-finite values are
    not ``ok`` (reported to ``check`` unless missing; lenient: the row is dropped if ``drop``)."""
    missing = arr.is_null().to_numpy(zero_copy_only=False)
    floats, bad = _to_float64(arr)
    values = floats.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    nonfinite = ~np.isfinite(values) & ~missing & ~bad
    check.bad(column, bad, arr, "is not a number", drop=drop)
    check.bad(column, nonfinite, arr, "is not finite", drop=drop)
    ok = ~(missing | bad | nonfinite)
    return values, ok


def dense_feature(arr: pa.Array, column: str, check: BlockChecker) -> np.ndarray:
    """``log(1 + max(x, 0))`` as float32; missing (and, in lenient mode, bad) values -> 0."""
    values, ok = parse_numbers(arr, column, check)
    x = np.where(ok, values, 0.0)
    np.maximum(x, 0.0, out=x)
    return np.log1p(x).astype(np.float32)


def label01(arr: pa.Array, column: str, check: BlockChecker) -> np.ndarray:
    """A 0/1 label column as float32; anything else is an error (lenient: the row is dropped)."""
    one = pc.equal(arr, "1").fill_null(False).to_numpy(zero_copy_only=False)
    zero = pc.equal(arr, "0").fill_null(False).to_numpy(zero_copy_only=False)
    check.bad(column, ~(one | zero), arr, "is not 0 or 1", drop=True)
    return one.astype(np.float32)


# --------------------------------------------------------------------------------------------- text input


@dataclass
class TextSource:
    """One delimited text file (plain, or compressed with a .gz/.bz2/.zst/.lz4 name)."""

    path: Path
    dataset: str  # "criteo", ... (the first word of every message)
    delimiter: str
    column_names: List[str]  # every column of the file, in order
    column_types: Dict[str, pa.DataType]  # type of each included column (strings or binary)
    include: Optional[List[str]] = None  # columns to read; None: all
    header: bool = False

    @property
    def prefix(self) -> str:
        return f"{self.dataset} {self.path}"

    def fail(self, message: str) -> DataError:
        return DataError(f"{self.prefix}: {message}")


def open_input(path: Path) -> pa.NativeFile:
    return pa.input_stream(str(path), compression="detect")


def iter_lines(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The raw lines of a (possibly compressed) file, without line endings; only for error paths."""
    with open_input(path) as f:
        rest = b""
        while True:
            buf = f.read(chunk)
            if not buf:
                break
            parts = (rest + buf).split(b"\n")
            rest = parts.pop()
            for line in parts:
                yield line.rstrip(b"\r")
        if rest:
            yield rest.rstrip(b"\r")


def read_header(path: Path, dataset: str) -> str:
    """The first line of a file, decoded."""
    for line in iter_lines(path, chunk=1 << 16):
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{dataset} {path}: row 1: the header is not UTF-8 text") from None
    raise DataError(f"{dataset} {path}: file is empty")


def check_input_file(path: Path, dataset: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{dataset} {path}: no such file")
    if not path.is_file():
        raise DataError(f"{dataset} {path}: not a file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{dataset} {path}: not readable")
    if path.stat().st_size == 0:
        raise DataError(f"{dataset} {path}: file is empty")
    return path


@dataclass
class RawBlock:
    batch: pa.RecordBatch  # the included columns, as read (strings/binary, nulls for empty fields)
    first_line: int  # 1-based line number of the first row (lenient: rows skipped before it in
    #                  the same chunk are not accounted for)
    start_row: int  # 0-based index of the first row among the rows read from this file

    def __len__(self) -> int:
        return self.batch.num_rows


_WIDTH_RE = re.compile(r"Expected (\d+) columns, got (\d+)")


def _split_lines(chunk: bytes) -> List[bytes]:
    lines = chunk.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [ln.rstrip(b"\r") for ln in lines]


def _width_error(src: TextSource, chunk: bytes, first_line: int, skip: int, expected: int) -> DataError:
    delim = src.delimiter.encode()
    what = {"\t": "tab-separated", ",": "comma-separated"}.get(src.delimiter, f"{src.delimiter!r}-separated")
    for i, line in enumerate(_split_lines(chunk)[skip:]):
        got = line.count(delim) + 1
        if got != expected:
            hint = ""
            if not line:
                hint = " (an empty line)"
            elif src.dataset == "criteo" and got == expected - 1:
                hint = " (no label column? Criteo's unlabelled test.txt cannot be converted)"
            return src.fail(f"row {first_line + i}: expected {expected} {what} columns, got {got}{hint}")
    return src.fail(f"near row {first_line}: expected {expected} {what} columns")


def _utf8_error(src: TextSource, chunk: bytes, first_line: int, skip: int) -> DataError:
    for i, line in enumerate(_split_lines(chunk)[skip:]):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            return src.fail(f"row {first_line + i}: text is not valid UTF-8 (byte {e.start + 1} of the line)")
    return src.fail(f"near row {first_line}: text is not valid UTF-8")


def _iter_chunks(f: pa.NativeFile, block_size: int) -> Iterator[bytes]:
    """Chunks of about ``block_size`` bytes ending at a line end (the last one possibly without);
    one copy per chunk (the partial line carried over + the new bytes up to the last line end)."""
    carry = b""
    while True:
        buf = f.read(block_size)
        if not buf:
            if carry:
                yield carry
            return
        cut = buf.rfind(b"\n") + 1
        if cut == 0:  # no line end in this read: a line longer than the block, read on
            carry += buf
            continue
        view = memoryview(buf)
        chunk = carry + view[:cut]
        carry = bytes(view[cut:])
        del view, buf
        yield chunk


def iter_blocks(src: TextSource, *, lenient: bool, issues: IssueCounter,
                block_size: int = DEFAULT_BLOCK_SIZE) -> Iterator[RawBlock]:
    """Stream a delimited file as blocks of string columns (empty fields are null).

    The file is read in chunks of about ``block_size`` bytes cut at line ends, each parsed by
    ``pyarrow.csv.read_csv`` (multi-threaded, explicit column names and types, no quoting), so memory
    is a few times ``block_size`` whatever the file size, and line numbers are exact. (``open_csv``'s
    background reader keeps up to 32 blocks in flight, which is why it is not used.)

    Rows with the wrong number of columns raise a :class:`DataError` naming their line (lenient: they are
    skipped and counted under ``rows_dropped["row"]``). A file without data rows is an error.
    """
    check_input_file(src.path, src.dataset)
    expected = len(src.column_names)

    def on_invalid(row: "pcsv.InvalidRow") -> str:
        issues.add("row", f"wrong number of columns (expected {row.expected_columns})", 1, drop=True)
        return "skip"

    parse_opts = pcsv.ParseOptions(delimiter=src.delimiter, quote_char=False, double_quote=False,
                                   escape_char=False, newlines_in_values=False, ignore_empty_lines=False,
                                   invalid_row_handler=on_invalid if lenient else None)
    conv_opts = pcsv.ConvertOptions(column_types=src.column_types, include_columns=src.include,
                                    null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=True,
                                    check_utf8=True)
    sub_block = max(1 << 16, min(4 << 20, block_size // 2))
    line = 1  # number of the first line of the next chunk
    delivered = 0
    try:
        f = open_input(src.path)
    except OSError as e:
        raise src.fail(f"cannot read: {e}") from None
    with f:
        chunks = _iter_chunks(f, block_size)
        while True:
            try:
                chunk = next(chunks)
            except StopIteration:
                break
            except OSError as e:  # e.g. a truncated .gz
                raise src.fail(f"cannot read after row {line - 1}: {e}") from None
            nlines = chunk.count(b"\n") + (0 if chunk.endswith(b"\n") else 1)
            skip = 1 if (line == 1 and src.header) else 0
            first_line = line + skip
            line += nlines
            if nlines - skip <= 0:
                continue
            read_opts = pcsv.ReadOptions(column_names=src.column_names, skip_rows=skip, block_size=sub_block,
                                         use_threads=True)
            try:
                table = pcsv.read_csv(pa.BufferReader(chunk), read_options=read_opts, parse_options=parse_opts,
                                      convert_options=conv_opts)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                text = str(e)
                if _WIDTH_RE.search(text):
                    raise _width_error(src, chunk, first_line, skip, expected) from None
                if "UTF8" in text or "UTF-8" in text:
                    raise _utf8_error(src, chunk, first_line, skip) from None
                if "Empty CSV file" in text:
                    continue
                raise src.fail(f"rows {first_line}-{line - 1}: {text}") from None
            del chunk
            if table.num_rows == 0:
                continue
            batch = table.combine_chunks().to_batches()[0]
            del table
            yield RawBlock(batch, first_line, delivered)
            delivered += batch.num_rows
    if delivered == 0:
        if lenient and issues.rows_dropped.get("row"):
            raise src.fail("no row has the expected number of columns")
        raise src.fail("file has a header but no data rows" if src.header else "file is empty")


# --------------------------------------------------------------------------------------------- output


@contextmanager
def atomic_output_dir(output: Union[str, Path], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory of ``output``; on success rename it to ``output``.

    An existing ``output`` is an error unless ``overwrite``, and even then it is replaced only if it is
    empty or a converted data set (has ``metadata.json``), never an arbitrary directory. On any
    exception the temporary directory (and parent directories this call created) are removed.
    """
    output = Path(output).absolute()
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{output} already exists; pass --overwrite (overwrite=True) to replace it")
        if not output.is_dir() or (any(output.iterdir()) and not (output / METADATA_FILE).is_file()):
            raise FileExistsError(f"{output} exists and is not a converted data set; refusing to replace it")
    created: List[Path] = []
    p = output.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0o22)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the data set gets the usual permissions
    try:
        yield tmp
        if output.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.rename(output, old / "d")
            os.rename(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:
            try:
                d.rmdir()
            except OSError:
                break
        raise


class SplitWriter:
    """Appends tables of one split to ``SPLIT/part-NNNNN.parquet`` files of at most ``rows_per_file``
    rows, in row groups of ``row_group_rows`` rows (buffering at most one row group)."""

    def __init__(self, root: Path, split: str, schema: pa.Schema, *, rows_per_file: int = DEFAULT_ROWS_PER_FILE,
                 row_group_rows: int = DEFAULT_ROW_GROUP_ROWS, compression: str = "snappy") -> None:
        self.root, self.split, self.schema = root, split, schema
        self.row_group_rows = row_group_rows
        self.rows_per_file = max(rows_per_file, row_group_rows)
        self.compression = compression
        self.files: List[str] = []
        self.rows = 0
        self._buf: List[pa.Table] = []
        self._buffered = 0
        self._writer: Optional[pq.ParquetWriter] = None
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
            rel = f"{self.split}/part-{len(self.files):05d}.parquet"
            (self.root / self.split).mkdir(parents=True, exist_ok=True)
            # use_compliant_nested_type=False: bags read back as list<item: int64>, exactly arrow_schema();
            # page checksums let the reader name a corrupt page instead of decoding garbage
            self._writer = pq.ParquetWriter(self.root / rel, self.schema, compression=self.compression,
                                            use_compliant_nested_type=False, write_page_checksum=True)
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


def progress_bar(total: Optional[int], desc: str, enabled: Optional[bool]):
    """A tqdm bar counting rows (shows rows/s); ``enabled=None``: only when stderr is a terminal."""
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=" rows", unit_scale=True, disable=not enabled, file=sys.stderr,
                mininterval=0.5, dynamic_ncols=True, leave=True)


# --------------------------------------------------------------------------------------------- engine


@dataclass
class FeatureSpec:
    name: str
    multi_hot: bool = False


@dataclass
class ParsedBlock:
    """What a format's parser makes of one block (``n`` rows, before lenient drops)."""

    label: np.ndarray  # float32 (n,)
    dense: Dict[str, np.ndarray]  # float32 (n,) each, already transformed
    sparse: Dict[str, pa.Array]  # raw values: string/binary, or list<string> for multi-hot features
    oov: Dict[str, np.ndarray] = field(default_factory=dict)  # rows whose value is forced to the OOV id


Parser = Callable[[RawBlock, BlockChecker], ParsedBlock]


@dataclass
class InputPart:
    """One input file and where its rows go: a fixed split, or (``split=None``) the job's random split."""

    source: TextSource
    parse: Parser
    split: Optional[str] = None
    stream: int = 0  # distinguishes the random streams of several randomly split files


@dataclass
class ConvertJob:
    dataset: str
    parts: List[InputPart]
    dense: List[str]
    sparse: List[FeatureSpec]
    options: ConvertOptions
    fractions: Optional[SplitFractions] = None  # for parts with split=None
    split_rule: str = ""
    extra_source: dict = field(default_factory=dict)


@dataclass
class ConvertResult:
    output: Path
    meta: DatasetMeta
    seconds: float
    rows_read: int
    issues: Optional[IssueCounter]

    def summary(self) -> str:
        m = self.meta
        splits = " / ".join(f"{s} {m.rows.get(s, 0):,}" for s in SPLITS if s in m.splits)
        total_card = sum(m.cardinalities().values())
        rate = self.rows_read / self.seconds if self.seconds > 0 else float("inf")
        line = (f"{m.source.get('converter', 'convert')}: {self.rows_read:,} rows -> {self.output} ({splits}); "
                f"{len(m.dense)} dense, {len(m.sparse)} sparse features, total cardinality {total_card:,}; "
                f"{self.seconds:.1f} s ({rate:,.0f} rows/s)")
        if self.issues is not None:
            def per_column(table: Dict[str, Dict[str, int]]) -> str:
                totals = sorted(((sum(k.values()), c) for c, k in table.items()), key=lambda x: (-x[0], x[1]))
                parts = [f"{c}: {n:,}" for n, c in totals]
                return f" ({', '.join(parts)})" if parts else ""

            line += (f"; lenient: {self.issues.total_values_replaced:,} values replaced"
                     f"{per_column(self.issues.values_replaced)}, {self.issues.total_rows_dropped:,} rows dropped"
                     f"{per_column(self.issues.rows_dropped)} (details in metadata.json)")
        return line


def _encoders_plan(job: ConvertJob) -> Dict[str, Optional[int]]:
    """feature -> hash buckets, or None for a vocabulary."""
    names = [f.name for f in job.sparse]
    buckets = dict(job.options.hash_buckets or {})
    unknown = sorted(set(buckets) - set(names) - {"*"})
    if unknown:
        raise ValueError(f"--hash-buckets names unknown features {unknown}; {job.dataset} has {names}")
    default = buckets.get("*")
    return {n: buckets.get(n, default) for n in names}


def _part_has_train(job: ConvertJob, part: InputPart) -> bool:
    return part.split == "train" if part.split is not None else bool(job.fractions and job.fractions[0] > 0)


def _split_codes(job: ConvertJob, part: InputPart, block: RawBlock) -> np.ndarray:
    n = len(block)
    if part.split is not None:
        return np.full(n, SPLITS.index(part.split), dtype=np.int8)
    assert job.fractions is not None
    return assign_splits(job.fractions, job.options.seed, part.stream, block.start_row, n)


def _parse(part: InputPart, block: RawBlock, opts: ConvertOptions, issues: IssueCounter) -> Tuple[ParsedBlock, np.ndarray]:
    check = BlockChecker(part.source.prefix, block.first_line, len(block), opts.lenient, issues)
    parsed = part.parse(block, check)
    check.finish()
    return parsed, ~check.drop


def _sparse_column(values: pa.Array, enc: Encoder, oov: Optional[np.ndarray], multi_hot: bool) -> pa.Array:
    ids = enc.encode(values)
    if not multi_hot:
        if oov is not None:
            ids[oov] = OOV_ID
        return pa.array(ids, pa.int64())
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    offsets = np.asarray(values.offsets, dtype=np.int64)
    offsets = offsets - offsets[0]
    if oov is not None and oov.any():
        ids[np.repeat(oov, np.diff(offsets))] = OOV_ID
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids, pa.int64()))


def run_job(job: ConvertJob, output: Union[str, Path]) -> ConvertResult:
    """Run a conversion (see the module docstring); returns the written data set's metadata."""
    t0 = time.perf_counter()
    opts = job.options
    plan = _encoders_plan(job)
    vocab_features = [n for n, b in plan.items() if b is None]
    encoders: Dict[str, Encoder] = {n: HashEncoder(b) for n, b in plan.items() if b is not None}
    issues = IssueCounter()
    input_rows: Dict[int, int] = {}

    with atomic_output_dir(output, opts.overwrite) as tmp:
        # pass 1: vocabularies from the train rows
        if vocab_features:
            counters = {n: VocabCounter() for n in vocab_features}
            scratch = IssueCounter()  # lenient counts are taken in pass 2, which sees every row
            with progress_bar(None, f"{job.dataset}: counting values (pass 1/2)", opts.progress) as bar:
                for k, part in enumerate(job.parts):
                    if not _part_has_train(job, part):
                        continue
                    rows = 0
                    for block in iter_blocks(part.source, lenient=opts.lenient, issues=scratch,
                                             block_size=opts.block_size):
                        parsed, keep = _parse(part, block, opts, scratch)
                        train = keep & (_split_codes(job, part, block) == 0)
                        all_train = bool(train.all())
                        mask_arr = None if all_train else pa.array(train)
                        for n in vocab_features:
                            values = parsed.sparse[n]
                            oov = parsed.oov.get(n)
                            if oov is not None and oov.any():
                                m = pa.array(train & ~oov)
                            else:
                                m = mask_arr
                            counters[n].add(values if m is None else values.filter(m))
                        rows += len(block)
                        bar.update(len(block))
                    input_rows[k] = rows
            for n in vocab_features:
                encoders[n] = counters.pop(n).finalize(opts.min_count)

        sparse_meta = [SparseFeature(name=f.name, cardinality=encoders[f.name].cardinality, multi_hot=f.multi_hot)
                       for f in job.sparse]
        draft = DatasetMeta(dense=list(job.dense), sparse=sparse_meta, splits={})
        schema = draft.arrow_schema()
        writers = {s: SplitWriter(tmp, s, schema, rows_per_file=opts.rows_per_file,
                                  row_group_rows=opts.row_group_rows, compression=opts.compression)
                   for s in SPLITS}

        # pass 2: encode and write
        total = sum(input_rows.values()) if len(input_rows) == len(job.parts) else None
        rows_read = 0
        with progress_bar(total, f"{job.dataset}: writing Parquet (pass {2 if vocab_features else 1}/"
                                 f"{2 if vocab_features else 1})", opts.progress) as bar:
            for k, part in enumerate(job.parts):
                rows = 0
                for block in iter_blocks(part.source, lenient=opts.lenient, issues=issues,
                                         block_size=opts.block_size):
                    parsed, keep = _parse(part, block, opts, issues)
                    codes = _split_codes(job, part, block)
                    cols = [pa.array(parsed.label, pa.float32())]
                    cols += [pa.array(parsed.dense[n], pa.float32()) for n in job.dense]
                    cols += [_sparse_column(parsed.sparse[f.name], encoders[f.name], parsed.oov.get(f.name),
                                            f.multi_hot) for f in job.sparse]
                    table = pa.Table.from_arrays(cols, schema=schema)
                    for code, split in enumerate(SPLITS):
                        m = keep & (codes == code)
                        if m.all():
                            writers[split].write(table)
                        elif m.any():
                            writers[split].write(table.filter(pa.array(m)))
                    rows += len(block)
                    bar.update(len(block))
                input_rows[k] = rows
                rows_read += rows
        for w in writers.values():
            w.close()
        if writers["train"].rows == 0:
            raise DataError(f"{job.dataset}: no rows were left for the train split "
                            f"(inputs: {', '.join(str(p.source.path) for p in job.parts)})")

        used = [s for s in SPLITS if writers[s].rows > 0]
        source = {
            "converter": job.dataset,
            "inputs": [{"path": str(p.source.path.absolute()), "split": p.split or "random",
                        "rows": input_rows.get(k, 0)} for k, p in enumerate(job.parts)],
            "split_rule": job.split_rule,
            "fractions": list(job.fractions) if job.fractions else None,
            "options": opts.as_dict(),
            "oov_id": OOV_ID,
            "dense_transform": DENSE_TRANSFORM if job.dense else None,
            "features": {n: encoders[n].describe() for n in plan},
            **job.extra_source,
        }
        if opts.lenient:
            source["lenient"] = issues.as_dict()
        meta = DatasetMeta(dense=list(job.dense), sparse=sparse_meta,
                           splits={s: writers[s].files for s in used},
                           rows={s: writers[s].rows for s in used}, source=source)
        meta.save(tmp)
    return ConvertResult(output=Path(output), meta=meta, seconds=time.perf_counter() - t0, rows_read=rows_read,
                         issues=issues if opts.lenient else None)


__all__ = [
    "ConvertOptions", "ConvertJob", "ConvertResult", "InputPart", "FeatureSpec", "ParsedBlock", "RawBlock",
    "TextSource", "BlockChecker", "IssueCounter", "SplitWriter", "atomic_output_dir", "iter_blocks",
    "run_job", "check_fractions", "assign_splits", "row_uniforms", "parse_numbers", "dense_feature",
    "label01", "read_header", "check_input_file", "progress_bar", "DENSE_TRANSFORM",
]
