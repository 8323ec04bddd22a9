"""Batches decoded by DataLoader worker processes, handed over a window of batches at a time through
shared-memory slots that are allocated once and reused.

Each worker owns a contiguous block of the rank's virtual shards (``worker_shards``), so the workers
decode disjoint row groups; it yields one message per Window (``window_steps`` global batches): the
rows are written into the next of ``SLOTS`` shared-memory buffers that the main process allocated
before the workers started (inherited, never re-created or re-mapped), and only small arrays (batch
rows per batch, multi-hot bags) travel through the DataLoader's queue. The main process joins the workers'
parts of each batch in worker order, which is the rank's batch, and copies it out of the slot.

Why reuse is safe: a DataLoader asks each worker for at most ``PREFETCH`` items ahead of the last one
the main process took, and ``WindowLoader`` is done with a worker's window (its batches copied out)
before it takes the next one, so a worker writing window ``i + SLOTS`` cannot reach the slot of
window ``i`` while it is read. Slots are sized from the order (``window_slot_rows``); multi-hot bags
travel through the queue.

Example:
    >>> loader = WindowLoader(reader, workers=2)       # doctest: +SKIP
    >>> for batch in loader: ...                       # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.datasets.utils import Batch

from data_pipes.order import Progression
from data_pipes.rows import Bag, Rows, Window, window_batches

PREFETCH = 2  # windows a DataLoader asks each worker for ahead of the main process
SLOTS = PREFETCH + 2  # shared buffers per worker; see the module docstring for why this is enough


class WindowReader(Protocol):
    """What WindowLoader needs of a reader (data_pipes.reader.ParquetBatchReader)."""

    keys: list[str]
    id_dtype: np.dtype

    @property
    def multi_hot(self) -> list[bool]: ...

    def shards(self) -> list[tuple[int, Progression]]: ...

    def worker_shards(self, worker: int, workers: int) -> list[tuple[int, Progression]]: ...

    def windows(self, shards: Sequence[tuple[int, Progression]]) -> Iterator[Window]: ...

    def window_slot_rows(self, shards: Sequence[tuple[int, Progression]]) -> tuple[int, int, int]: ...


@dataclass
class _Message:
    """One worker's Window: its rows in the worker's slot ``seq % SLOTS``, in batch order."""

    worker: int
    seq: int
    first_step: int
    counts: np.ndarray  # rows of each step
    count: int
    widths: tuple[int, int]  # single-id features, 1 + dense features
    bags: list[Bag]


class _WindowSource(IterableDataset[_Message]):
    """The DataLoader's dataset: in worker ``w``, the windows of the shards that worker owns."""

    def __init__(self, reader: WindowReader, workers: int, slots: list[list[torch.Tensor]]) -> None:
        super().__init__()
        self.reader, self.workers, self.slots = reader, workers, slots

    def __iter__(self) -> Iterator[_Message]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        for seq, window in enumerate(self.reader.windows(self.reader.worker_shards(worker, self.workers))):
            yield _pack(window, worker, seq, self.slots[worker][seq % SLOTS].numpy(), self.reader.id_dtype)


def _pack(window: Window, worker: int, seq: int, slot: np.ndarray, id_dtype: np.dtype) -> _Message:
    """The message of a worker's Window: its rows written into ``slot`` in batch order, ids as ``id_dtype``
    (the reader's, which the main process reads them back as)."""
    part, n = window.parts[0], window.rows
    widths = (part.ids.shape[1], part.fixed.shape[1])
    if n * (id_dtype.itemsize * widths[0] + 4 * widths[1]) > slot.nbytes:
        raise RuntimeError(f"a window of {n} rows does not fit its {slot.nbytes}-byte slot")
    ids, fixed = _views(slot, n, *widths, id_dtype)
    bags = window.batch_order(out=(fixed, ids)).bags
    return _Message(worker, seq, window.first_step, window.counts.sum(axis=0), n, widths, bags)


def _views(slot: np.ndarray, n: int, single: int, width: int, id_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The ids (n, single) ``id_dtype`` and fixed (n, width) float32 arrays laid out in ``slot``."""
    end = id_dtype.itemsize * n * single  # a multiple of 4: fixed stays aligned
    ids = slot[:end].view(id_dtype).reshape(n, single)
    return ids, slot[end : end + 4 * n * width].view(np.float32).reshape(n, width)


def _shared(nbytes: int) -> torch.Tensor:
    """A uint8 tensor in a new shared-memory segment (inherited by worker processes started later)."""
    tensor = torch.empty(nbytes, dtype=torch.uint8)
    tensor.share_memory_()  # type: ignore[no-untyped-call]
    return tensor


class WindowLoader:
    """The reader's batches, decoded by ``workers`` DataLoader worker processes (0: in this process).
    The batches are the same for any worker count; ``pin_memory`` puts them in page-locked memory
    (CUDA only) so their host-to-device copies can be asynchronous."""

    def __init__(
        self,
        reader: WindowReader,
        workers: int,
        generator: torch.Generator | None = None,
        pin_memory: bool = False,
    ) -> None:
        self.reader, self.workers, self.generator, self.pin_memory = reader, workers, generator, pin_memory
        self.slots: list[list[torch.Tensor]] = []
        for w in range(workers):
            rows, single, width = reader.window_slot_rows(reader.worker_shards(w, workers))
            nbytes = rows * (reader.id_dtype.itemsize * single + 4 * width)
            self.slots.append([_shared(nbytes) for _ in range(SLOTS)])

    def __iter__(self) -> Iterator[Batch]:
        keys, multi_hot = self.reader.keys, self.reader.multi_hot
        if self.workers == 0:
            for window in self.reader.windows(self.reader.shards()):
                yield from window_batches([window], keys, multi_hot, self.pin_memory)
            return
        loader = DataLoader(
            _WindowSource(self.reader, self.workers, self.slots),
            batch_size=None,
            num_workers=self.workers,
            prefetch_factor=PREFETCH,
            persistent_workers=False,
            generator=self.generator,
        )
        messages = iter(loader)
        for seq in itertools.count():
            parts = [self._window(msg, w, seq) for w, msg in zip(range(self.workers), messages, strict=False)]
            if not parts:
                return
            if len(parts) != self.workers:
                raise RuntimeError(f"DataLoader workers yielded {len(parts)} of {self.workers} parts of a window")
            yield from window_batches(parts, keys, multi_hot, self.pin_memory)

    def _window(self, msg: _Message, worker: int, seq: int) -> Window:
        if (msg.worker, msg.seq) != (worker, seq):  # the DataLoader takes one item from each worker in turn
            raise RuntimeError(f"expected window {seq} of worker {worker}, got {msg.seq} of worker {msg.worker}")
        ids, fixed = _views(self.slots[worker][seq % SLOTS].numpy(), msg.count, *msg.widths, self.reader.id_dtype)
        return Window(msg.first_step, [Rows(fixed, ids, msg.bags)], msg.counts[None, :])
