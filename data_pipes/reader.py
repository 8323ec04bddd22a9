"""Streamed Parquet -> ``torchrec.datasets.utils.Batch`` for one rank: its slice of each global batch.

Order (data_pipes/order.py). The rows of a split are cut into ``virtual_shards`` (V, default 96)
contiguous virtual shards, interleaved row by row into the epoch's stream; global batch ``s`` of
epoch ``e`` is stream rows ``[s * B, (s + 1) * B)`` with ``B = batch_size * world_size``. It is a
function of (seed, e, s), ``B`` and the data only: 1, 2 or 3 ranks train on the same rows at every
step, and a checkpoint's position (epoch, global batches done) resumes exactly at any world size.
Rank ``r`` takes the stream rows ``t ≡ r (mod world_size)``, ``batch_size`` of each global batch.

World sizes. Every world size gets the same batches. One that divides V (1, 2, 3, 4, 6, 8, 12, 16,
24, 32, 48, 96 for V = 96) reads 1/W of the data per rank: rank r decodes only the shards
``v ≡ r (mod W)``. Any other reads ``1 / gcd(V, W)`` of it per rank (W = 5: all of it; W = 64: 1/32),
so training stays exact but each rank decodes more (train logs a warning). The trainer refuses a
global batch that does not split evenly over the ranks.

Last batch. With ``drop_last=True`` (training) an epoch is ``N // B`` global batches and the
stream's last ``N % B`` rows are dropped; with shuffling they are other rows every epoch. With
``drop_last=False`` (evaluation) the last global batch holds the rest, and a rank's last batch can
be smaller than the others' (by one row) or empty: evaluation pads it.

Shuffle (``shuffle=True``): the shards' layout over the rows, the order of each shard's row-group
pieces and the rows within a piece are permuted by (seed, epoch): the same on every rank and at
every world size. Without it the stream still interleaves the shards (each batch holds rows from
V places of the split), so rows do not come in file order.

Reading. A rank decodes row groups (never whole files), each once per epoch when shards are
longer than row groups, and holds at most about 2 V / W of them: one piece per shard it reads plus
row groups that several of its shards overlap, kept until their last piece is taken. Row groups
longer than a shard (N / V rows) cost memory and, across ranks, repeated decoding: keep them well
under N / V rows (converters write 8192). ``set_position(epoch, step)`` starts at a global batch
without decoding the row groups before it. DataLoader workers split the rank's shards and the main
process joins their parts (``make_dataloader``): the batches are identical for any worker count.

A batch holds ``dense_features`` float32 (b, num_dense), ``sparse_features`` a KeyedJaggedTensor
with keys ``meta.sparse_names()`` (int64 values and lengths; single-id features have length 1)
and ``labels`` float32 (b,).

Checks: the Parquet schema of every file is compared with ``meta.arrow_schema()`` when the reader
is built (footers only; always on), and nulls are always refused. With ``validate=True`` (the
default) every row group is also checked, vectorised, before any of its rows leave the reader:
ids in ``[0, cardinality)``, finite dense values, labels 0 or 1, Parquet page checksums (when the
writer stored them). Every problem raises ``DataError`` naming the file, the row group, the column
and, for values, the row within the file.

Example:
    >>> reader = ParquetBatchReader("data/demo", "train", 1024, rank=0, world_size=2, shuffle=True)  # doctest: +SKIP
    >>> reader.set_position(epoch=0, step=0)                                      # doctest: +SKIP
    >>> steps = reader.num_batches()                 # global batches of 2048 rows  # doctest: +SKIP
    >>> for batch in make_dataloader(reader, num_workers=2):                       # doctest: +SKIP
    ...     logits = model(batch.dense_features, batch.sparse_features)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchrec.datasets.utils import Batch

from data_pipes.errors import DataError
from data_pipes.handoff import WindowLoader
from data_pipes.order import DEFAULT_VIRTUAL_SHARDS, EpochOrder, Progression, Segment, rank_shards, shard_offset
from data_pipes.rows import Rows, Window, window_batches
from data_pipes.schema import DatasetMeta

WINDOW_ROWS = 16384  # a rank's rows decoded together (and handed over by a worker at once)


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_list(t) or pa.types.is_large_list(t):  # without the writer-specific item field name
        return f"{'large_' if pa.types.is_large_list(t) else ''}list<{_type_name(t.value_type)}>"
    return str(t)


def _types_match(expected: pa.DataType, found: pa.DataType) -> bool:
    if pa.types.is_list(expected):  # list item field names differ between writers ("item"/"element")
        return pa.types.is_list(found) and bool(found.value_type.equals(expected.value_type))
    return bool(found.equals(expected))


class ParquetBatchReader(IterableDataset[Batch]):
    """One rank's ``batch_size``-row slices of the global batches (``batch_size * world_size`` rows)
    of one split, in the order of (seed, epoch) over ``virtual_shards`` (see the module docstring)."""

    def __init__(
        self,
        root: Path | str,
        split: str,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        shuffle: bool = False,
        seed: int = 0,
        validate: bool = True,
        virtual_shards: int = DEFAULT_VIRTUAL_SHARDS,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.root = Path(root)
        self.split = split
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        if virtual_shards < 1:
            raise ValueError(f"virtual_shards must be >= 1, got {virtual_shards}")
        self.drop_last, self.shuffle, self.seed, self.validate = drop_last, shuffle, int(seed), validate
        self.virtual_shards = int(virtual_shards)
        self.epoch, self.start_step = 0, 0
        self.meta = DatasetMeta.load(self.root)
        self.files: list[str] = [str(p) for p in self.meta.files(self.root, split)]
        self.keys: list[str] = self.meta.sparse_names()
        self._cardinalities = [f.cardinality for f in self.meta.sparse]
        self._multi_hot = [f.multi_hot for f in self.meta.sparse]
        single_cards = [c for c, m in zip(self._cardinalities, self._multi_hot, strict=True) if not m]
        # decoded single ids: int32 where every cardinality allows (half the memory and copies), else int64
        self.id_dtype = np.dtype(np.int32 if max(single_cards, default=0) <= 2**31 else np.int64)
        self._columns = [self.meta.label, *self.meta.dense, *self.keys]
        self._group_rows: list[list[int]] = [self._inspect(path) for path in self.files]
        if validate and split in self.meta.rows:
            found = sum(sum(g) for g in self._group_rows)
            if found != self.meta.rows[split]:
                raise DataError(
                    f"{self.root / 'metadata.json'}: split {split!r} should have {self.meta.rows[split]} rows "
                    f"but its files hold {found}"
                )

    # ------------------------------------------------------------------ footers only

    def _open(self, path: str) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(path, page_checksum_verification=self.validate)
        except FileNotFoundError:
            raise DataError(f"{path}: file listed in {self.root / 'metadata.json'} does not exist") from None
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable Parquet file (truncated or corrupt footer): {e}") from e

    def _inspect(self, path: str) -> list[int]:
        """Rows per row group of ``path``, after checking its schema against the metadata."""
        pf = self._open(path)
        try:
            try:
                found = pf.schema_arrow
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{path}: cannot read the Parquet schema: {e}") from e
            expected = self.meta.arrow_schema()
            for field in expected:
                idx = found.get_field_index(field.name)
                if idx < 0:
                    raise DataError(
                        f"{path}: all row groups, column {field.name!r}: missing "
                        f"(expected {_type_name(field.type)}; file has {found.names})"
                    )
                if not _types_match(field.type, found.field(idx).type):
                    raise DataError(
                        f"{path}: all row groups, column {field.name!r}: expected type "
                        f"{_type_name(field.type)}, found {_type_name(found.field(idx).type)}"
                    )
            extra = [n for n in found.names if expected.get_field_index(n) < 0]
            if extra:
                raise DataError(
                    f"{path}: all row groups, column {extra[0]!r}: unexpected column "
                    f"(extra columns {extra}; the metadata lists {expected.names})"
                )
            md = pf.metadata
            return [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        finally:
            pf.close()

    def set_epoch(self, epoch: int) -> None:
        """Epoch of the shuffle order, starting at its first batch (call before iterating)."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, step: int) -> None:
        """Start ``epoch`` at global batch ``step`` (the batches before it are never decoded)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.epoch, self.start_step = int(epoch), int(step)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def num_batches(self, num_workers: int = 0, epoch: int | None = None) -> int:
        """Global batches in an epoch (every rank yields one local batch per global batch). From the
        footers only; the same for every epoch, worker count and world size (arguments kept for callers)."""
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        rows = self.num_rows()
        return rows // self.global_batch_size if self.drop_last else -(-rows // self.global_batch_size)

    def rows_per_epoch(self) -> int:
        """Rows the ranks together consume in one epoch (all rows unless ``drop_last`` drops the tail)."""
        return min(self.num_rows(), self.num_batches() * self.global_batch_size)

    def num_rows(self) -> int:
        """Rows of the whole split (all ranks)."""
        return sum(sum(g) for g in self._group_rows)

    def stream_rows(self, step: int) -> np.ndarray:
        """The epoch-stream positions ``t`` of the rows of this rank's batch at global batch ``step``,
        in batch order (arithmetic only). A batch holds its rows shard by shard, so ``t`` is not sorted:
        keep ``t < n`` to take the first ``n`` rows of the stream, the same rows at any world size."""
        size, V, out = self.global_batch_size, self.virtual_shards, []
        end = min((step + 1) * size, self.num_rows())
        for v, prog in self.shards():
            a, b = prog.count(shard_offset(v, step * size, V)), prog.count(shard_offset(v, end, V))
            out.append(v + V * (prog.residue + prog.stride * np.arange(a, b, dtype=np.int64)))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def shards(self) -> list[tuple[int, Progression]]:
        """This rank's virtual shards and the rows of each it takes (order.rank_shards)."""
        return rank_shards(self.virtual_shards, self.world_size, self.rank)

    # ------------------------------------------------------------------ rows

    @property
    def multi_hot(self) -> list[bool]:
        """Per key (``keys``), whether the feature is multi-hot."""
        return list(self._multi_hot)

    def window_slot_rows(self, shards: Sequence[tuple[int, Progression]]) -> tuple[int, int, int]:
        """The most rows a Window of ``shards`` holds, with its single-id and fixed (label + dense) widths."""
        per_shard = -(-self.global_batch_size // self.virtual_shards)
        rows = sum(-(-per_shard // prog.stride) for _, prog in shards) * self.window_steps
        return rows, sum(not m for m in self._multi_hot), 1 + len(self.meta.dense)

    @property
    def window_steps(self) -> int:
        """Global batches decoded together: about ``WINDOW_ROWS`` of this rank's rows, at least one batch."""
        return max(1, WINDOW_ROWS // self.batch_size)

    def worker_shards(self, worker: int, workers: int) -> list[tuple[int, Progression]]:
        """The contiguous block of this rank's shards that worker ``worker`` of ``workers`` reads: the
        workers' parts of a batch, joined in worker order, are the rank's batch."""
        shards = self.shards()
        return shards[worker * len(shards) // workers : (worker + 1) * len(shards) // workers]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        shards = self.shards() if info is None else self.worker_shards(info.id, info.num_workers)
        for window in self.windows(shards):
            yield from window_batches([window], self.keys, self._multi_hot)

    def windows(self, shards: Sequence[tuple[int, Progression]]) -> Iterator[Window]:
        """The rows of ``shards`` in the global batches from ``start_step`` on, ``window_steps`` batches
        per Window."""
        order = EpochOrder(self._group_rows, self.virtual_shards, self.shuffle, self.seed, self.epoch)
        groups = _RowGroups(self)
        cursors = [_Cursor(order, v, prog, groups) for v, prog in shards]
        size, V, last = self.global_batch_size, self.virtual_shards, self.num_batches()
        shard = np.array([v for v, _ in shards], dtype=np.int64)[:, None]
        residue = np.array([p.residue for _, p in shards], dtype=np.int64)[:, None]
        stride = np.array([p.stride for _, p in shards], dtype=np.int64)[:, None]
        try:
            for c in cursors:
                c.seek(c.prog.count(shard_offset(c.shard, self.start_step * size, V)))
                for seg in c.segments[c.piece :]:
                    groups.expect(seg)
            for first in range(self.start_step, last, self.window_steps):
                ends = np.minimum(np.arange(first + 1, min(first + self.window_steps, last) + 1) * size, order.rows)
                offsets = np.maximum(0, (ends[None, :] - shard + V - 1) // V)  # order.shard_offset, per shard and end
                yield self._window(cursors, first, np.maximum(0, (offsets - residue + stride - 1) // stride))
        finally:
            groups.close()

    def _window(self, cursors: Sequence[_Cursor], first: int, ends: np.ndarray) -> Window:
        """The Window of the steps whose ends (positions of each cursor, shape (cursors, steps)) are
        ``ends``: each cursor's rows taken at once (views of its decoded piece where they fit in one)."""
        if not cursors:
            return Window(first, [self._empty], np.zeros((1, ends.shape[1]), dtype=np.int64))
        start = np.array([c.pos for c in cursors], dtype=np.int64)
        parts = [c.take(int(e)) for c, e in zip(cursors, ends[:, -1], strict=True)]
        return Window(first, parts, np.diff(ends, axis=1, prepend=start[:, None]))

    @property
    def _empty(self) -> Rows:
        single = sum(not m for m in self._multi_hot)
        bags = [(np.zeros(0, np.int64), np.zeros(1, np.int64)) for m in self._multi_hot if m]
        return Rows(np.zeros((0, 1 + len(self.meta.dense)), np.float32), np.zeros((0, single), self.id_dtype), bags)

    def _read(self, pf: pq.ParquetFile, f: int, g: int) -> Rows:
        path = self.files[f]
        try:
            table = pf.read_row_group(g, columns=self._columns)
        except (OSError, pa.ArrowException) as e:
            raise DataError(
                f"{path}: row group {g}, column {self._failing_column(pf, g)}: "
                f"cannot read (truncated or corrupt Parquet): {e}"
            ) from e
        if table.num_rows != self._group_rows[f][g]:
            raise DataError(
                f"{path}: row group {g}, all columns: footer says {self._group_rows[f][g]} rows, read {table.num_rows}"
            )
        first_row = sum(self._group_rows[f][:g])
        where = (path, g, first_row)

        n = table.num_rows
        fixed = np.empty((n, 1 + len(self.meta.dense)), dtype=np.float32)
        ids = np.empty((n, sum(not m for m in self._multi_hot)), dtype=self.id_dtype)
        label = fixed[:, 0] = self._primitive(table.column(self.meta.label), self.meta.label, where)
        if self.validate:
            bad = (label != 0) & (label != 1)
            if bad.any():
                i = int(np.argmax(bad))
                raise DataError(
                    f"{path}: row group {g}, row {first_row + i}, column {self.meta.label!r}: "
                    f"label {float(label[i])!r} is not 0 or 1"
                )
        for j, name in enumerate(self.meta.dense):
            col = self._primitive(table.column(name), name, where)
            if self.validate:
                finite = np.isfinite(col)
                if not finite.all():
                    i = int(np.argmin(finite))
                    raise DataError(
                        f"{path}: row group {g}, row {first_row + i}, column {name!r}: "
                        f"dense value {float(col[i])!r} is not finite"
                    )
            fixed[:, 1 + j] = col

        bags: list[tuple[np.ndarray, np.ndarray]] = []
        single = 0
        for name, card, multi in zip(self.keys, self._cardinalities, self._multi_hot, strict=True):
            col = table.column(name)
            if multi:
                values, offsets = self._bags(col, name, where)
            else:
                values, offsets = self._primitive(col, name, where), None
            if self.validate and len(values) and (values.min() < 0 or values.max() >= card):
                bad = (values < 0) | (values >= card)
                pos = int(np.argmax(bad))
                row = pos if offsets is None else int(np.searchsorted(offsets, pos, side="right")) - 1
                raise DataError(
                    f"{path}: row group {g}, row {first_row + row}, column {name!r}: "
                    f"id {int(values[pos])} outside [0, {card})"
                )
            if offsets is not None:  # multi-hot
                bags.append((values.astype(np.int64, copy=False), offsets))
            else:
                ids[:, single] = values  # validated ids fit id_dtype
                single += 1
        return Rows(fixed, ids, bags)

    @staticmethod
    def _null_error(col: pa.Array, name: str, where: tuple[str, int, int], what: str) -> DataError:
        path, g, first_row = where
        i = int(np.argmax(np.asarray(col.is_null())))
        return DataError(f"{path}: row group {g}, row {first_row + i}, column {name!r}: {what}")

    def _primitive(self, chunked: pa.ChunkedArray, name: str, where: tuple[str, int, int]) -> np.ndarray:
        col = chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)
        if col.null_count:
            raise self._null_error(col, name, where, "null value")
        return np.asarray(col.to_numpy(zero_copy_only=False))

    def _bags(self, chunked: pa.ChunkedArray, name: str, where: tuple[str, int, int]) -> tuple[np.ndarray, np.ndarray]:
        col = chunked.combine_chunks() if chunked.num_chunks != 1 else chunked.chunk(0)
        if col.null_count:
            raise self._null_error(col, name, where, "null bag")
        offsets = col.offsets.to_numpy().astype(np.int64)
        inner = col.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        if inner.null_count:
            path, g, first_row = where
            pos = int(np.argmax(np.asarray(inner.is_null())))
            row = int(np.searchsorted(offsets - offsets[0], pos, side="right")) - 1
            raise DataError(f"{path}: row group {g}, row {first_row + row}, column {name!r}: null id in a bag")
        return inner.to_numpy(zero_copy_only=False), offsets - offsets[0]

    def _failing_column(self, pf: pq.ParquetFile, g: int) -> str:
        """Which column of a row group cannot be read (only called once reading it failed)."""
        for name in self._columns:
            try:
                pf.read_row_group(g, columns=[name])
            except (OSError, pa.ArrowException):
                return repr(name)
        return "unknown"


class _RowGroups:
    """Row groups decoded for one process's cursors: one that several shards overlap is decoded once
    and kept until its last piece is taken (pieces are counted ahead with ``expect``)."""

    def __init__(self, reader: ParquetBatchReader) -> None:
        self.reader = reader
        self.files: dict[int, pq.ParquetFile] = {}
        self.kept: dict[tuple[int, int], Rows] = {}
        self.pending: dict[tuple[int, int], int] = {}

    def expect(self, seg: Segment) -> None:
        key = (seg.file, seg.group)
        self.pending[key] = self.pending.get(key, 0) + 1

    def piece(self, seg: Segment) -> Rows:
        key = (seg.file, seg.group)
        chunk = self.kept.pop(key, None)
        if chunk is None:
            if seg.file not in self.files:
                self.files[seg.file] = self.reader._open(self.reader.files[seg.file])
            chunk = self.reader._read(self.files[seg.file], seg.file, seg.group)
        self.pending[key] = self.pending.get(key, 1) - 1
        if self.pending[key] > 0:
            self.kept[key] = chunk
        return chunk.slice(seg.start, seg.stop)

    def close(self) -> None:
        for pf in self.files.values():
            pf.close()


class _Cursor:
    """The rows one process takes from one virtual shard, decoded one row-group piece at a time.

    Positions count the shard's rows this rank takes (its ``Progression``), from the epoch's start.
    """

    def __init__(self, order: EpochOrder, shard: int, prog: Progression, groups: _RowGroups) -> None:
        self.order, self.shard, self.prog, self.groups = order, shard, prog, groups
        self.segments = order.segments(shard)
        ends = np.cumsum([s.rows for s in self.segments])
        self._first = [prog.count(int(e - s.rows)) for e, s in zip(ends, self.segments, strict=True)]  # per piece
        self._last = [prog.count(int(e)) for e in ends]
        self.pos, self.piece = 0, 0
        self._buf: Rows | None = None

    def seek(self, pos: int) -> None:
        """Continue at position ``pos`` (pieces before it are never decoded)."""
        self.pos, self._buf = int(pos), None
        self.piece = int(np.searchsorted(self._last, self.pos, side="right"))

    def take(self, end: int) -> Rows:
        """The rows at positions ``[pos, end)``."""
        out: list[Rows] = []
        while self.pos < end:
            if self._buf is None:
                self._buf = self._decode(self.piece)
            lo, hi = self._first[self.piece], self._last[self.piece]
            stop = min(end, hi)
            out.append(self._buf.slice(self.pos - lo, stop - lo))
            self.pos = stop
            if stop == hi:
                self.piece, self._buf = self.piece + 1, None
        return Rows.join(out, self.groups.reader._empty) if len(out) != 1 else out[0]

    def _decode(self, k: int) -> Rows:
        seg = self.segments[k]
        chunk = self.groups.piece(seg)
        perm = self.order.row_permutation(self.shard, k, seg.rows)
        if perm is not None:
            chunk = chunk.take(perm)
        if self.prog.stride > 1:  # another rank takes the other rows of this shard
            start = sum(s.rows for s in self.segments[:k])
            first = self.prog.residue + self.prog.stride * self._first[k] - start
            chunk = chunk.take(np.arange(first, seg.rows, self.prog.stride))
        return chunk


def make_dataloader(
    reader: ParquetBatchReader,
    num_workers: int = 0,
    generator: torch.Generator | None = None,
    pin_memory: bool = False,
) -> Iterable[Batch]:
    """The reader's batches, decoded by ``num_workers`` processes (at most one per virtual shard this
    rank reads), each owning a block of the rank's shards (data_pipes/handoff.py). Same batches for
    any worker count. Build it after ``set_epoch``/``set_position``; ``pin_memory`` on CUDA only."""
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return WindowLoader(reader, min(num_workers, len(reader.shards())), generator, pin_memory)


__all__ = ["ParquetBatchReader", "make_dataloader", "DEFAULT_VIRTUAL_SHARDS"]


def check_splits(root: Path | str, validate: bool = True) -> None:
    """Check every split of a data set from its file footers only (cheap): each file readable, its schema the
    metadata's, and (with ``validate``) the row counts ``metadata.json`` records. A truncated Parquet file in
    the test split is then a one-line ``DataError`` before training starts, not after it ends."""
    for split in DatasetMeta.load(root).splits:
        ParquetBatchReader(root, split, batch_size=1, validate=validate)
