"""The two passes of a conversion over shards of its inputs, in one process or ``options.jobs``.

A shard is one input file or a byte range of about ``options.shard_size`` bytes of an uncompressed one,
cut at a line start. The plan (:func:`shard_ranges`) depends on the inputs and the options only, never on
the number of processes or ranks, so neither does the output. ``plan_shards`` counts the lines of every
range (in parallel), so each shard knows the number of its first line and the data rows of the file
before it: split draws (counter-based, :mod:`.splits`) and error messages are those of one process
reading the whole file. Compressed files and lenient mode (a dropped row shifts the row numbers after
it) keep files whole.

* Pass 1 (:func:`count_pass`): the processes count the train values of one shard at a time; the parent
  adds the counters up (:meth:`VocabCounter.counts`: counts by hash, so the merge is exact and
  ``finalize`` numbers the values as one process would).
* Pass 2 (:func:`encode_pass`): the process that encodes shard ``i`` writes its rows of each split
  straight to the final files ``SPLIT/part-IIIII-NNNNN.parquet`` in the output's temporary directory
  (:func:`encode_shard`: files cut by ``rows_per_file``, row groups by ``row_group_rows``, a new file at
  every shard boundary), then its mark ``i.json`` (its files, rows and lenient tallies). The parent only
  collects the marks in input order (:func:`collect`): no row is encoded or copied twice. When a worker
  dies (killed, out of memory), new workers take over (up to ``MAX_RESTARTS`` times); shards with a
  mark are not encoded again.

Workers are forked after the parent put the pass's inputs (job, encoders, schema) in ``_STATE``, so
nothing large is pickled per task; only shard indices, counts, file lists and lenient tallies travel.

The ranks of a torchrun/TorchX job (:mod:`.ranks`) run the same steps, one process each:
:func:`shard_ranges` and :func:`number_shards` (the plan), :func:`count_shards` (pass 1),
:func:`encode_shard` and :func:`collect` (pass 2).

Example (run_job calls these):
    >>> shards = plan_shards(job)                                          # doctest: +SKIP
    >>> counters, rows = count_pass(job, shards, ["C1"], bar)              # doctest: +SKIP
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from data_pipes.convert.checks import BlockChecker, IssueCounter
from data_pipes.convert.output import Written, open_writers
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


def shard_ranges(job: ConvertJob) -> list[ByteRange]:
    """The job's files, uncompressed ones cut at line starts into ranges of about ``options.shard_size``
    bytes (whole files when smaller, compressed, or in lenient mode)."""
    opts, ranges = job.options, list[ByteRange]()
    for k, part in enumerate(job.parts):
        path = check_input_file(part.source.path, part.source.dataset)
        size = path.stat().st_size
        pieces = -(-size // opts.shard_size)
        if opts.lenient or pieces < 2 or is_compressed(path):
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
    ranges = shard_ranges(job)
    split = [(k, a, b) for k, a, b, _ in ranges if b is not None]
    tasks = [(str(job.parts[k].source.path), a, b) for k, a, b in split]
    if job.options.jobs > 1 and len(split) > 1:
        with _pool(job.options.jobs) as pool:
            counted = list(pool.map(_count_lines, tasks))
    else:
        counted = [_count_lines(t) for t in tasks]
    return number_shards(job, ranges, dict(zip(split, counted, strict=True)))


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


def _count_one(i: int) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[int, int]]:
    counters, rows = count_shards(_STATE["job"], [_STATE["shards"][i]], _STATE["features"])
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
    _STATE.update(job=job, shards=todo, features=list(features))
    counters, rows = {n: VocabCounter() for n in features}, dict.fromkeys({s.part for s in todo}, 0)
    try:
        with _pool(jobs) as pool:
            for counts, part_rows in pool.map(_count_one, range(len(todo))):
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


@dataclass
class ShardOutput:
    """What shard ``i`` wrote (its mark ``i.json``): its Parquet files and rows per split, the input
    rows it read, and its lenient tallies; ``fresh``: encoded now (False: complete before)."""

    files: dict[str, list[str]]
    rows: dict[str, int]
    read: int
    issues: IssueCounter
    fresh: bool = True

    def save(self, path: Path) -> None:
        counts = self.issues.as_dict()
        tallies = {k: counts[k] for k in ("values_replaced", "rows_dropped")}
        atomic_write_text(path, json.dumps({"files": self.files, "rows": self.rows, "read": self.read, **tallies}))

    @classmethod
    def load(cls, path: Path) -> ShardOutput:
        saved = json.loads(path.read_text())
        issues = IssueCounter()
        issues.values_replaced, issues.rows_dropped = saved["values_replaced"], saved["rows_dropped"]
        return cls(saved["files"], saved["rows"], int(saved["read"]), issues, fresh=False)


def shard_stem(i: int) -> str:
    """The name of shard ``i``'s files, before their number: ``part-IIIII``."""
    return f"part-{i:05d}"


def encode_shard(
    job: ConvertJob, shard: Shard, i: int, encoders: dict[str, Encoder], schema: pa.Schema, root: Path, marks: Path
) -> ShardOutput:
    """Shard ``i`` encoded into its own Parquet files under ``root``, then its mark ``marks/i.json``
    written; a shard with a mark is not encoded again (its mark is returned)."""
    mark = marks / f"{i}.json"
    if mark.is_file():  # finished before a worker or rank died
        return ShardOutput.load(mark)
    stem = shard_stem(i)
    for split in SPLITS:  # what a killed attempt left of this shard
        for stale in (root / split).glob(f"{stem}-*.parquet"):
            stale.unlink()
    writers, issues, read = open_writers(root, schema, job.options, stem), IssueCounter(), 0
    for table, codes in _encoded(job, shard, encoders, schema, issues):
        _write(writers, table, codes)
        read += table.num_rows
    for w in writers.values():
        w.close()
    used = [s for s in SPLITS if writers[s].rows]
    out = ShardOutput({s: writers[s].files for s in used}, {s: writers[s].rows for s in used}, read, issues)
    out.save(mark)
    return out


def _encode_one(i: int) -> ShardOutput:
    """Worker: :func:`encode_shard` of shard ``i`` with the pass's inputs."""
    s = _STATE
    return encode_shard(s["job"], s["shards"][i], i, s["encoders"], s["schema"], s["root"], s["marks"])


def _encode_in_pool(jobs: int, todo: list[int], done: dict[int, ShardOutput], bar: tqdm[Any]) -> None:
    """Shards ``todo`` encoded by ``jobs`` workers into ``done``, taken in input order (so a bad input
    raises the error ``jobs=1`` would); a dead worker's shards are redone by new workers (those with a
    mark are not), up to ``MAX_RESTARTS`` times."""
    for restart in range(MAX_RESTARTS + 1):
        pool = _pool(jobs)
        try:
            futures = {i: pool.submit(_encode_one, i) for i in todo if i not in done}
            for i, f in futures.items():
                done[i] = f.result()
                bar.update(done[i].read)
            return
        except BrokenProcessPool:  # a worker died (killed, out of memory)
            if restart == MAX_RESTARTS:
                raise
        finally:
            pool.shutdown(cancel_futures=True)


def encode_pass(
    job: ConvertJob,
    shards: Sequence[Shard],
    encoders: dict[str, Encoder],
    schema: pa.Schema,
    root: Path,
    bar: tqdm[Any],
) -> list[ShardOutput]:
    """Every shard encoded into its own Parquet files under ``root`` (marks in ``root/.shards``, removed
    at the end); what each wrote, in input order."""
    marks = root / ".shards"
    marks.mkdir(exist_ok=True)
    jobs, done = min(job.options.jobs, len(shards)), dict[int, ShardOutput]()
    if jobs <= 1:
        for i, shard in enumerate(shards):
            done[i] = encode_shard(job, shard, i, encoders, schema, root, marks)
            bar.update(done[i].read)
    else:
        _STATE.update(job=job, shards=list(shards), encoders=encoders, schema=schema, root=root, marks=marks)
        try:
            _encode_in_pool(jobs, list(range(len(shards))), done, bar)
        finally:
            _STATE.clear()
    shutil.rmtree(marks)
    return [done[i] for i in range(len(shards))]


def collect(job: ConvertJob, shards: Sequence[Shard], outputs: Sequence[ShardOutput]) -> Written:
    """The shards' outputs put together in input order."""
    w = Written(
        {s: [] for s in SPLITS}, dict.fromkeys(SPLITS, 0), dict.fromkeys(range(len(job.parts)), 0), IssueCounter()
    )
    for shard, out in zip(shards, outputs, strict=True):
        for split, files in out.files.items():
            w.files[split] += files
            w.rows[split] += out.rows[split]
        w.input_rows[shard.part] += out.read
        w.issues.merge(out.issues)
    return w


__all__ = [
    "ByteRange",
    "Shard",
    "ShardOutput",
    "collect",
    "count_pass",
    "count_shards",
    "encode_pass",
    "encode_shard",
    "number_shards",
    "part_has_train",
    "plan_shards",
    "shard_ranges",
    "shard_stem",
]
