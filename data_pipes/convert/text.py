"""Delimited text in, blocks of Arrow string columns out: streamed, with exact line numbers.

Text is read in chunks of ``block_size`` bytes cut at line ends, each parsed by ``pyarrow.csv.read_csv``
(explicit column names, every column a string, no inference, no quoting; see :func:`iter_blocks`), so
memory is a few times ``block_size`` whatever the file size. Rows are named by their 1-based line in the
file (a header is line 1); a row with the wrong number of columns, text that is not UTF-8 or a truncated
compressed file raises a :class:`~data_pipes.errors.DataError` naming the line.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.tsv"
    >>> _ = p.write_text("1\\ta\\n0\\tb\\n")
    >>> src = TextSource(p, "demo", "\\t", ["label", "c"], {"label": pa.string(), "c": pa.string()})
    >>> [b.batch.column("c").to_pylist() for b in iter_blocks(src, lenient=False, issues=IssueCounter())]
    [['a', 'b']]
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv

from data_pipes.convert.checks import IssueCounter
from data_pipes.convert.options import DEFAULT_BLOCK_SIZE
from data_pipes.errors import DataError


@dataclass
class TextSource:
    """One delimited text file (plain, or compressed with a .gz/.bz2/.zst/.lz4 name)."""

    path: Path
    dataset: str  # "criteo", ... (the first word of every message)
    delimiter: str
    column_names: list[str]  # every column of the file, in order
    column_types: dict[str, pa.DataType]  # type of each included column (strings or binary)
    include: list[str] | None = None  # columns to read; None: all
    header: bool = False

    @property
    def prefix(self) -> str:
        return f"{self.dataset} {self.path}"

    def fail(self, message: str) -> DataError:
        return DataError(f"{self.prefix}: {message}")


def open_input(path: Path) -> pa.NativeFile:
    return pa.input_stream(str(path), compression="detect")


def is_compressed(path: Path) -> bool:
    """Whether ``open_input`` decompresses ``path`` (by its extension): such a file is read whole."""
    try:
        pa.Codec.detect(str(path))
    except (TypeError, ValueError):  # no codec for the extension
        return False
    return True


@dataclass(frozen=True)
class Span:
    """Bytes ``[start, stop)`` of an uncompressed file (``start`` a line start; ``stop`` None: to the
    end), with the number of its first line and the data rows of the file before it."""

    start: int = 0
    stop: int | None = None
    line: int = 1
    row: int = 0

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop is None


def line_start(path: Path, offset: int, chunk: int = 1 << 16) -> int:
    """The first line start at or after byte ``offset`` of an uncompressed file (its size if none)."""
    if offset <= 0:
        return 0
    with pa.OSFile(str(path)) as f:
        f.seek(offset - 1)
        pos = offset - 1
        while buf := f.read(chunk):
            at = buf.find(b"\n")
            if at >= 0:
                return int(pos + at + 1)
            pos += len(buf)
    return pos


def count_lines(path: Path, start: int, stop: int, chunk: int = 16 << 20) -> int:
    """Lines beginning in bytes ``[start, stop)`` of an uncompressed file (``start`` a line start)."""
    lines, last = 0, b"\n"
    with pa.OSFile(str(path)) as f:
        f.seek(start)
        left = stop - start
        while left > 0 and (buf := f.read(min(chunk, left))):
            lines += int(buf.count(b"\n"))
            left -= len(buf)
            last = buf[-1:]
    return lines + int(last != b"\n")


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
        return int(self.batch.num_rows)


_WIDTH_RE = re.compile(r"Expected (\d+) columns, got (\d+)")


def _split_lines(chunk: bytes) -> list[bytes]:
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


def _iter_chunks(f: pa.NativeFile, block_size: int, limit: int | None = None) -> Iterator[bytes]:
    """Chunks of about ``block_size`` bytes ending at a line end (the last one possibly without), of
    the next ``limit`` bytes (None: all); one copy per chunk (the partial line carried over + the
    new bytes up to the last line end)."""
    carry = b""
    while True:
        size = block_size if limit is None else min(block_size, limit)
        buf = f.read(size) if size > 0 else b""
        if limit is not None:
            limit -= len(buf)
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


def iter_blocks(
    src: TextSource,
    *,
    lenient: bool,
    issues: IssueCounter,
    block_size: int = DEFAULT_BLOCK_SIZE,
    span: Span = Span(),
) -> Iterator[RawBlock]:
    """Stream a delimited file (or the ``span`` of it) as blocks of string columns (empty fields are null).

    The file is read in chunks of about ``block_size`` bytes cut at line ends, each parsed by
    ``pyarrow.csv.read_csv`` (multi-threaded, explicit column names and types, no quoting), so memory
    is a few times ``block_size`` whatever the file size, and line numbers are exact. (``open_csv``'s
    background reader keeps up to 32 blocks in flight, which is why it is not used.)

    Rows with the wrong number of columns raise a :class:`DataError` naming their line (lenient: they are
    skipped and counted under ``rows_dropped["row"]``). A file without data rows is an error.
    """
    check_input_file(src.path, src.dataset)
    expected = len(src.column_names)

    def on_invalid(row: pcsv.InvalidRow) -> str:
        issues.add("row", f"wrong number of columns (expected {row.expected_columns})", 1, drop=True)
        return "skip"

    parse_opts = pcsv.ParseOptions(
        delimiter=src.delimiter,
        quote_char=False,
        double_quote=False,
        escape_char=False,
        newlines_in_values=False,
        ignore_empty_lines=False,
        invalid_row_handler=on_invalid if lenient else None,
    )
    conv_opts = pcsv.ConvertOptions(
        column_types=src.column_types,
        include_columns=src.include,
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
        check_utf8=True,
    )
    sub_block = max(1 << 16, min(4 << 20, block_size // 2))
    line = span.line  # number of the first line of the next chunk
    delivered = span.row
    try:
        f = open_input(src.path) if span.whole else pa.OSFile(str(src.path))
    except OSError as e:
        raise src.fail(f"cannot read: {e}") from None
    with f:
        if not span.whole:
            f.seek(span.start)
        chunks = _iter_chunks(f, block_size, None if span.stop is None else span.stop - span.start)
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
            read_opts = pcsv.ReadOptions(
                column_names=src.column_names, skip_rows=skip, block_size=sub_block, use_threads=True
            )
            try:
                table = pcsv.read_csv(
                    pa.BufferReader(chunk), read_options=read_opts, parse_options=parse_opts, convert_options=conv_opts
                )
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
    if delivered == 0 and span.whole:
        if lenient and issues.rows_dropped.get("row"):
            raise src.fail("no row has the expected number of columns")
        raise src.fail("file has a header but no data rows" if src.header else "file is empty")


__all__ = [
    "RawBlock",
    "Span",
    "TextSource",
    "check_input_file",
    "count_lines",
    "is_compressed",
    "iter_blocks",
    "iter_lines",
    "line_start",
    "open_input",
    "read_header",
]
