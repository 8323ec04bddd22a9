"""The two passes of a conversion over shards of its inputs, in one process or ``options.jobs``.

A shard is one input file or, with several jobs, a byte range of an uncompressed one cut at a line
start. ``plan_shards`` counts the lines of every range (in parallel), so each shard knows the number
of its first line and the data rows of the file before it: split draws (counter-based,
:mod:`.splits`) and error messages are those of one process reading the whole file. Compressed files
and lenient mode (a dropped row shifts the row numbers after it) keep files whole.

* Pass 1 (:func:`count_pass`): each of ``jobs`` processes counts the train values of a contiguous
  group of shards; the parent adds the counters up (:meth:`VocabCounter.counts`: counts by hash, so
  the merge is exact and ``finalize`` numbers the values as one process would).
* Pass 2 (:func:`encode_pass`): the processes encode shards, at most ``2 * jobs`` ahead of the parent,
  each into an Arrow IPC file in the output's temporary directory; the parent appends them to the
  split writers in input order and deletes them. The writers cut files and row groups by row count,
  so the output (ids, rows, files, row groups) is that of ``jobs=1``. When a worker dies (killed, out
  of memory), new workers take over (up to ``MAX_RESTARTS`` times); shards whose spool file was
  complete are not encoded again.

Workers are forked after the parent put the pass's inputs (job, encoders, schema) in ``_STATE``, so
nothing large is pickled per task; only shard indices, counts and lenient tallies travel.

The ranks of a torchrun/TorchX job (:mod:`.ranks`) run the same steps, one process each:
:func:`shard_ranges` and :func:`number_shards` (the plan), :func:`count_shards` (pass 1),
:func:`encode_to_spool`, :func:`read_tally` and :func:`append_spooled` (pass 2).

Example (run_job calls these):
    >>> shards = plan_shards(job)                                          # doctest: +SKIP
    >>> counters, rows = count_pass(job, shards, ["C1"], bar)              # doctest: +SKIP
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from data_pipes.convert.checks import BlockChecker, IssueCounter
from data_pipes.convert.spec import ConvertJob, InputPart, ParsedBlock
from data_pipes.convert.splits import assign_splits
from data_pipes.convert.text import (
    RawBlock,
    Span,
    check_input_file,
    count_lines,
    is_compressed,
    iter_blocks,
    line_start,
)
from data_pipes.convert.vocab import OOV_ID, Encoder, VocabCounter
from data_pipes.convert.writer import SplitWriter
from data_pipes.schema import SPLITS
from mlet_torchrec.io import atomic_write_text

if TYPE_CHECKING:
    from tqdm import tqdm

SPLIT_COLUMN = "__split"  # the split code of each row in a pass-2 spool file (-1: dropped)
MAX_RESTARTS = 3  # times pass 2 replaces its workers after one died, before it gives up
_STATE: dict[str, Any] = {}  # the pass's inputs, set by the parent before it forks the workers


@dataclass(frozen=True)
class Shard:
    """Part ``part`` of the job (its whole file, or ``span`` of it)."""

    part: int
    span: Span = Span()
    nbytes: int = 0


def _pool(jobs: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork"))


ByteRange = tuple[int, int, int | None, int]
"""``(part, start, stop, nbytes)``: a whole file (``stop`` None) or bytes ``[start, stop)`` of one."""


def shard_ranges(job: ConvertJob, workers: int) -> list[ByteRange]:
    """The job's files, uncompressed ones cut into up to ``4 * workers`` byte ranges at line starts."""
    opts, ranges = job.options, list[ByteRange]()
    for k, part in enumerate(job.parts):
        path = check_input_file(part.source.path, part.source.dataset)
        size = path.stat().st_size
        pieces = min(4 * workers, size // opts.block_size)
        if workers == 1 or opts.lenient or pieces < 2 or is_compressed(path):
            ranges.append((k, 0, None, size))
            continue
        cuts = sorted({line_start(path, size * i // pieces) for i in range(pieces)} | {size})
        ranges += [(k, a, b, b - a) for a, b in zip(cuts, cuts[1:], strict=False) if a < b]
    return ranges


def number_shards(job: ConvertJob, ranges: Sequence[ByteRange], lines: dict[tuple[int, int, int], int]) -> list[Shard]:
    """The shards of ``ranges``, each byte range numbered from the ``lines`` of the ranges before it."""
    shards, before = [], dict.fromkeys(range(len(job.parts)), 0)
    for k, a, b, n in ranges:
        header = int(job.parts[k].source.header)
        span = Span() if b is None else Span(a, b, 1 + before[k], max(0, before[k] - header))
        shards.append(Shard(k, span, n))
        before[k] += 0 if b is None else lines[(k, a, b)]
    return shards


def plan_shards(job: ConvertJob) -> list[Shard]:
    """The job's shards in input order (see the module docstring)."""
    ranges = shard_ranges(job, job.options.jobs)
    split = [(k, a, b) for k, a, b, _ in ranges if b is not None]
    lines: dict[tuple[int, int, int], int] = {}
    if split:
        with _pool(job.options.jobs) as pool:
            counted = pool.map(_count_lines, [(str(job.parts[k].source.path), a, b) for k, a, b in split])
            lines = dict(zip(split, counted, strict=True))
    return number_shards(job, ranges, lines)


def _count_lines(args: tuple[str, int, int]) -> int:
    path, a, b = args
    return count_lines(Path(path), a, b)


# ------------------------------------------------------------------------------------------ per block


def _split_codes(job: ConvertJob, part: InputPart, block: RawBlock) -> np.ndarray:
    n = len(block)
    if job.options.features_from is not None:  # every row, in input order, to the one split
        return np.full(n, SPLITS.index(job.options.split_name), dtype=np.int8)
    if part.split is not None:
        return np.full(n, SPLITS.index(part.split), dtype=np.int8)
    assert job.fractions is not None
    return assign_splits(job.fractions, job.options.seed, part.stream, block.start_row, n)


def _blocks(job: ConvertJob, shard: Shard, issues: IssueCounter) -> Iterator[tuple[RawBlock, ParsedBlock, np.ndarray]]:
    """Each block of a shard, parsed, with its split codes (-1: a row lenient mode drops)."""
    part, opts = job.parts[shard.part], job.options
    for block in iter_blocks(
        part.source, lenient=opts.lenient, issues=issues, block_size=opts.block_size, span=shard.span
    ):
        check = BlockChecker(part.source.prefix, block.first_line, len(block), opts.lenient, issues)
        parsed = part.parse(block, check)
        check.finish()
        yield block, parsed, np.where(check.drop, np.int8(-1), _split_codes(job, part, block))


def part_has_train(job: ConvertJob, part: InputPart) -> bool:
    return part.split == "train" if part.split is not None else bool(job.fractions and job.fractions[0] > 0)


# ------------------------------------------------------------------------------------------ pass 1


def count_shards(
    job: ConvertJob, shards: Sequence[Shard], features: Sequence[str], bar: tqdm[Any] | None = None
) -> tuple[dict[str, VocabCounter], dict[int, int]]:
    counters, rows = {n: VocabCounter() for n in features}, dict.fromkeys({s.part for s in shards}, 0)
    scratch = IssueCounter()  # lenient counts are taken in pass 2, which sees every row
    for shard in shards:
        for block, parsed, codes in _blocks(job, shard, scratch):
            train = codes == 0
            mask = None if bool(train.all()) else pa.array(train)
            for n in features:
                oov = parsed.oov.get(n)
                m = pa.array(train & ~oov) if oov is not None and oov.any() else mask
                counters[n].add(parsed.sparse[n] if m is None else parsed.sparse[n].filter(m))
            rows[shard.part] += len(block)
            if bar is not None:
                bar.update(len(block))
    return counters, rows


def _count_group(group: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[int, int]]:
    counters, rows = count_shards(_STATE["job"], _STATE["groups"][group], _STATE["features"])
    return {n: c.counts() for n, c in counters.items()}, rows


def count_pass(
    job: ConvertJob, shards: Sequence[Shard], features: Sequence[str], bar: tqdm[Any]
) -> tuple[dict[str, VocabCounter], dict[int, int]]:
    """The train values of ``features`` counted over the shards that hold train rows, and the rows
    of each part read."""
    todo = [s for s in shards if part_has_train(job, job.parts[s.part])]
    jobs = min(job.options.jobs, len(todo))
    if jobs <= 1:
        return count_shards(job, todo, features, bar)
    ends = np.cumsum([max(s.nbytes, 1) for s in todo])
    cut = np.searchsorted(ends, ends[-1] * np.arange(1, jobs) / jobs)  # contiguous groups of equal bytes
    groups = [list(g) for g in np.split(np.array(todo, dtype=object), cut) if len(g)]
    _STATE.update(job=job, groups=groups, features=list(features))
    counters, rows = {n: VocabCounter() for n in features}, dict.fromkeys({s.part for s in todo}, 0)
    try:
        with _pool(jobs) as pool:
            for counts, part_rows in pool.map(_count_group, range(len(groups))):
                for n, (keys, values) in counts.items():
                    counters[n].add_hashes(keys, values)
                for k, r in part_rows.items():
                    rows[k] += r
                bar.update(sum(part_rows.values()))
    finally:
        _STATE.clear()
    return counters, rows


# ------------------------------------------------------------------------------------------ pass 2


def _sparse_column(values: pa.Array, enc: Encoder, oov: np.ndarray | None, multi_hot: bool) -> pa.Array:
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


def _encoded(
    job: ConvertJob, shard: Shard, encoders: dict[str, Encoder], schema: pa.Schema, issues: IssueCounter
) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """Each block of a shard as a table of the data set's schema, with its rows' split codes."""
    for _, parsed, codes in _blocks(job, shard, issues):
        cols = [pa.array(parsed.label, pa.float32())]
        cols += [pa.array(parsed.dense[n], pa.float32()) for n in job.dense]
        cols += [
            _sparse_column(parsed.sparse[f.name], encoders[f.name], parsed.oov.get(f.name), f.multi_hot)
            for f in job.sparse
        ]
        yield pa.Table.from_arrays(cols, schema=schema), codes


def _write(writers: dict[str, SplitWriter], table: pa.Table, codes: np.ndarray) -> None:
    for code, split in enumerate(SPLITS):
        m = codes == code
        if m.all():
            writers[split].write(table)
        elif m.any():
            writers[split].write(table.filter(pa.array(m)))


def read_tally(path: Path) -> tuple[int, IssueCounter]:
    """The rows and lenient tallies of a complete spool file, from the ``.json`` written beside it."""
    saved = json.loads(path.read_text())
    issues = IssueCounter()
    issues.values_replaced, issues.rows_dropped = saved["values_replaced"], saved["rows_dropped"]
    return int(saved["rows"]), issues


def encode_to_spool(
    job: ConvertJob, shard: Shard, encoders: dict[str, Encoder], schema: pa.Schema, spool: Path, i: int
) -> tuple[int, IssueCounter, bool]:
    """Shard ``i`` encoded into ``spool/i.arrow``, then its tallies into ``spool/i.json`` (the mark of a
    complete shard): its rows, lenient tallies, and whether it was encoded now (False: it was complete)."""
    done, tally = spool / f"{i}.arrow", spool / f"{i}.json"
    if tally.is_file():  # finished before a worker died: not redone
        return (*read_tally(tally), False)
    issues, rows = IssueCounter(), 0
    spooled = schema.append(pa.field(SPLIT_COLUMN, pa.int8()))
    part = done.with_suffix(".part")
    with pa.ipc.new_stream(str(part), spooled) as out:
        for table, codes in _encoded(job, shard, encoders, schema, issues):
            out.write_table(table.append_column(SPLIT_COLUMN, pa.array(codes, pa.int8())))
            rows += table.num_rows
    os.replace(part, done)
    atomic_write_text(tally, json.dumps({"rows": rows, **issues.as_dict()}))
    return rows, issues, True


def _encode_to_file(i: int) -> tuple[int, IssueCounter]:
    """Worker: :func:`encode_to_spool` of shard ``i`` with the pass's inputs."""
    s = _STATE
    rows, issues, _ = encode_to_spool(s["job"], s["shards"][i], s["encoders"], s["schema"], s["spool"], i)
    return rows, issues


def append_spooled(path: Path, writers: dict[str, SplitWriter], keep: bool = False) -> None:
    """A spool file's rows appended to the split writers; the file and its tallies deleted unless ``keep``."""
    with pa.OSFile(str(path)) as f:
        for batch in pa.ipc.open_stream(f):
            codes = batch.column(batch.num_columns - 1).to_numpy()
            _write(writers, pa.Table.from_batches([batch]).drop_columns([SPLIT_COLUMN]), codes)
    if not keep:
        path.unlink()
        path.with_suffix(".json").unlink()


def encode_pass(
    job: ConvertJob,
    shards: Sequence[Shard],
    encoders: dict[str, Encoder],
    writers: dict[str, SplitWriter],
    issues: IssueCounter,
    bar: tqdm[Any],
) -> dict[int, int]:
    """Every shard encoded and appended to the split writers in input order; the rows of each part."""
    schema, rows = writers["train"].schema, dict.fromkeys(range(len(job.parts)), 0)
    jobs = min(job.options.jobs, len(shards))
    if jobs <= 1:
        for shard in shards:
            for table, codes in _encoded(job, shard, encoders, schema, issues):
                _write(writers, table, codes)
                rows[shard.part] += table.num_rows
                bar.update(table.num_rows)
        return rows
    spool = writers["train"].root / ".spool"
    spool.mkdir()
    _STATE.update(job=job, shards=list(shards), encoders=encoders, schema=schema, spool=spool)
    pool, restarts = _pool(jobs), 0
    try:
        pending: dict[int, Future[tuple[int, IssueCounter]]] = {}
        k = 0
        while k < len(shards):
            try:
                for i in range(k, min(len(shards), k + 2 * jobs)):
                    if i not in pending:
                        pending[i] = pool.submit(_encode_to_file, i)
                n, tallies = pending.pop(k).result()
            except BrokenProcessPool:  # a worker died (killed, out of memory): new workers redo what was unfinished
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise
                pool.shutdown(cancel_futures=True)
                pool, pending = _pool(jobs), {}
                continue
            append_spooled(spool / f"{k}.arrow", writers)
            issues.merge(tallies)
            rows[shards[k].part] += n
            bar.update(n)
            k += 1
    finally:
        pool.shutdown(cancel_futures=True)
        _STATE.clear()
    spool.rmdir()
    return rows


__all__ = [
    "SPLIT_COLUMN",
    "ByteRange",
    "Shard",
    "append_spooled",
    "count_pass",
    "count_shards",
    "encode_pass",
    "encode_to_spool",
    "number_shards",
    "part_has_train",
    "plan_shards",
    "read_tally",
    "shard_ranges",
]
