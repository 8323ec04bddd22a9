"""``mlet predict``: the click probability of every row of a split, by a run, a collapse or an export.

The model comes from a training run (or one of its checkpoints) or a collapse output, sharded over the
job's ranks as ``mlet evaluate`` shards it, or from an export dir: its INT8 TorchScript model (default) or
the FP32 one (``precision="fp32"``; every export holds both), whole in every rank. Every rank scores its
slice of the split (:func:`~mlet_torchrec.evaluation.evaluate.split_stream`) and writes
``(row, probability, label)`` to its own part file; rank 0 then scatters the parts into a memory-mapped
column per output field, by the rows' positions in the split (the reader's stream interleaves virtual shards,
see :mod:`data_pipes.order`), and writes the file in chunks: memory stays bounded by a batch and a chunk,
whatever the split's size. The file (``probability`` float32 and ``label`` float32, one row per row of the
split, in its order) appears by one rename or not at all; the parts live beside it in a hidden temporary
directory, so on a cluster the output must be on a file system every node sees.

The output's suffix picks its format (:data:`FORMATS`): ``.parquet`` is Parquet (its schema metadata records
the writer, the source, data, split and precision), so is a name without a suffix, ``.csv`` is CSV with a quoted
header row (``"probability","label"``) and float32 values in their shortest exact form; any other suffix is
refused.

The data set must hold the features the model was trained on: when both record a feature transform
(:mod:`data_pipes.transform`), their identities must match (raw data is encoded for a model with
``mlet convert ... --features-from MODEL``); otherwise its features and cardinalities must.

Example:
    >>> predict("runs/tiny/export", "data/new", "test", "scores.parquet")          # doctest: +SKIP
    PredictReport(output='scores.parquet', kind='export', precision='int8', rows=3000, ...)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import torch

from data_pipes.order import shard_rows
from data_pipes.reader import ParquetBatchReader
from data_pipes.schema import DatasetMeta
from mlet_torchrec import ranks
from mlet_torchrec.errors import UserError
from mlet_torchrec.evaluation.evaluate import eval_device, score, split_stream
from mlet_torchrec.files import reserve
from mlet_torchrec.io import atomic_file
from mlet_torchrec.serving.scoring import Scorer, check_data, resolve_scorer, scorer_model

WRITER = b"mlet predict"
CHUNK_ROWS = 1 << 20  # rows per read and write while assembling the output
_PART_SCHEMA = pa.schema([("row", pa.int64()), ("probability", pa.float32()), ("label", pa.float32())])
_SCHEMA = pa.schema([("probability", pa.float32()), ("label", pa.float32())])
FORMATS = {".parquet": "Parquet", ".csv": "CSV"}
"""The output's suffix (any case) -> the format written; an output without a suffix is Parquet."""
CSV_HEADER = b'"probability","label"\n'
"""The first line of every CSV file predict writes (pyarrow's header row for :data:`_SCHEMA`)."""


def output_format(output: Path | str) -> str:
    """The suffix of the format ``output`` is written in (no suffix: ``.parquet``); one line naming the formats for
    any other.

    >>> output_format("scores.CSV"), output_format("scores")
    ('.csv', '.parquet')
    >>> output_format("scores.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mlet_torchrec.errors.UserError: --output scores.json: not a format predict writes; name a .parquet ...
    """
    suffix = Path(output).suffix.lower() or ".parquet"
    if suffix not in FORMATS:
        kinds = " or ".join(f"{s} ({name})" for s, name in FORMATS.items())
        raise UserError(f"--output {output}: not a format predict writes; name a {kinds} file")
    return suffix


@dataclass
class PredictReport:
    output: str
    source: str
    kind: str
    precision: str
    data: str
    split: str
    rows: int
    world_size: int
    seconds: float

    def summary(self) -> str:
        rate = self.rows / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"predict: {self.rows:,} rows of {self.data} ({self.split}) scored by the {self.kind} {self.source} "
            f"({self.precision}, {self.world_size} process(es)) -> {self.output}; "
            f"{self.seconds:.1f} s ({rate:,.0f} rows/s)"
        )


def _file_rows(reader: ParquetBatchReader, step: int) -> np.ndarray:
    """Positions in the split (file and row order) of this rank's rows at ``step`` (no shuffling):
    stream row ``t`` is row ``t // V`` of virtual shard ``t % V``, which starts at the sum of the lengths before it."""
    lengths = shard_rows(reader.num_rows(), reader.virtual_shards)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    t = reader.stream_rows(step)
    return np.asarray(starts[t % reader.virtual_shards] + t // reader.virtual_shards, dtype=np.int64)


def _score_part(scorer: Scorer, data: str, split: str, meta: DatasetMeta, part: Path, rank: int, world: int) -> int:
    """Score this rank's slice of ``split`` into ``part`` (row, probability, label); returns its rows."""
    device = eval_device()
    model = scorer_model(scorer, world, device)
    batch = scorer.config.train.eval_batch_size
    reader, steps, local_batch, _ = split_stream(data, split, batch, rank, world)
    keys = meta.sparse_names()
    written = 0
    with pq.ParquetWriter(part, _PART_SCHEMA) as writer:
        for step, out in enumerate(score([model], iter(reader), steps, local_batch, keys, len(meta.dense), device)):
            n = out.labels.numel()
            if n == 0:
                continue
            rows = _file_rows(reader, step)
            if len(rows) != n:
                raise AssertionError(f"step {step}: {n} scored rows but {len(rows)} stream positions")
            prob = torch.sigmoid(out.logits[0].double()).float().numpy()
            cols = [pa.array(rows), pa.array(prob), pa.array(out.labels.float().numpy())]
            writer.write_table(pa.Table.from_arrays(cols, schema=_PART_SCHEMA))
            written += n
    return written


def _column(path: Path, dtype: type, rows: int) -> np.ndarray:
    """A memory-mapped column on disk, its blocks allocated (a full disk: ENOSPC here, not SIGBUS later)."""
    column = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(rows,))
    reserve(path)
    return column


def _assemble(parts: list[Path], rows: int, built: Path, info: dict[str, str]) -> None:
    """Rank 0: scatter the parts into memory-mapped columns by row (beside ``built``), then write them out in
    chunks into ``built``."""
    tmp = built.parent
    prob, label = _column(tmp / "probability.npy", np.float32, rows), _column(tmp / "label.npy", np.float32, rows)
    seen = _column(tmp / "seen.npy", np.bool_, rows)
    for part in parts:
        for b in pq.ParquetFile(part).iter_batches(batch_size=CHUNK_ROWS):
            r = b.column(0).to_numpy()
            prob[r], label[r], seen[r] = b.column(1).to_numpy(), b.column(2).to_numpy(), True
    missing = rows - int(np.count_nonzero(seen))
    if missing:
        raise AssertionError(f"{missing} of {rows} rows were not scored")
    if output_format(built) == ".csv":
        writer: pq.ParquetWriter | pcsv.CSVWriter = pcsv.CSVWriter(built, _SCHEMA)
    else:
        meta = {b"mlet.writer": WRITER, **{f"mlet.{k}".encode(): v.encode() for k, v in info.items()}}
        writer = pq.ParquetWriter(built, _SCHEMA.with_metadata(meta))
    with writer:
        for a in range(0, rows, CHUNK_ROWS):
            b = min(rows, a + CHUNK_ROWS)
            writer.write_table(pa.Table.from_arrays([pa.array(prob[a:b]), pa.array(label[a:b])], schema=_SCHEMA))


def written_by_predict(path: Path) -> bool:
    """True if ``path`` is a file ``mlet predict`` wrote: a Parquet file whose schema metadata says so, or a CSV
    file (``.csv``) that starts with its quoted header row (CSV has no metadata; a hand-written CSV rarely
    quotes its header)."""
    if path.suffix.lower() == ".csv":
        try:
            with open(path, "rb") as f:
                return f.read(len(CSV_HEADER)) == CSV_HEADER
        except OSError:
            return False
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return False
    return meta.get(b"mlet.writer") == WRITER


def predict(
    source: Path | str,
    data: Path | str | None,
    split: str,
    output: Path | str,
    precision: str | None = None,
    overwrite: bool = False,
) -> PredictReport:
    """Score every row of ``split`` of ``data`` (default: the model's own data set) into ``output``.

    In one process, or as one rank of a job (torchrun, TorchX, ``mlet predict --nproc-per-node``); every rank returns
    the report once rank 0 has written the file.
    """
    from mlet_torchrec.training.distributed import process_group

    start = time.perf_counter()
    output_format(output)
    scorer = resolve_scorer(source, precision)
    data = str(data if data is not None else scorer.config.data.path)
    meta = check_data(scorer, data, split)
    with (
        process_group(scorer.config.run.device) as ctx,
        atomic_file(output, written_by_predict, [source, data], overwrite, ranks=ranks) as built,
    ):
        part = built.parent / f"part-{ctx.rank:05d}.parquet"
        _score_part(scorer, data, split, meta, part, ctx.rank, ctx.world_size)
        ranks.barrier()  # every rank's part is written
        rows = meta.rows.get(split) or ParquetBatchReader(data, split, 1, validate=False).num_rows()
        if ctx.is_main:
            parts = [built.parent / f"part-{r:05d}.parquet" for r in range(ctx.world_size)]
            info = {"source": str(source), "data": data, "split": split, "precision": scorer.precision}
            _assemble(parts, rows, built, info)
    return PredictReport(
        output=str(output),
        source=str(source),
        kind=scorer.kind,
        precision=scorer.precision,
        data=data,
        split=split,
        rows=rows,
        world_size=ctx.world_size,
        seconds=time.perf_counter() - start,
    )


__all__ = [
    "FORMATS",
    "PredictReport",
    "output_format",
    "predict",
    "written_by_predict",
]
