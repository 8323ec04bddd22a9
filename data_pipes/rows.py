"""Decoded rows in a packed layout that is cheap to slice, permute and join, and their Batch.

The reader cuts every global batch out of many shards (data_pipes/order.py), so a batch is joined
from dozens of small pieces: fixed-width columns live in two 2-D arrays (label and dense values as
float32, single-id features as int32, or int64 where a cardinality needs it) so a piece costs two
slices, not one per column. Multi-hot bags keep (values, offsets) each. Arrays are row-major:
gathering and joining whole rows is several times faster than along columns, and one 2-D transposed
copy puts a batch in the KeyedJaggedTensor's key-major int64 layout.

Example:
    >>> import numpy as np
    >>> rows = Rows(np.zeros((4, 2), np.float32), np.arange(8).reshape(4, 2), [])
    >>> Rows.join([rows.slice(1, 3), rows.take(np.array([0]))], rows.slice(0, 0)).ids.tolist()
    [[2, 3], [4, 5], [0, 1]]
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

Bag = tuple[np.ndarray, np.ndarray]  # int64 values, int64 offsets (n + 1, starting at 0)


@dataclass
class Rows:
    """``fixed`` float32 (n, 1 + D): label then dense values; ``ids`` int32 or int64 (n, S): the
    single-id features in key order; ``bags``: the multi-hot features in key order."""

    fixed: np.ndarray
    ids: np.ndarray
    bags: list[Bag]

    @property
    def rows(self) -> int:
        return len(self.fixed)

    def slice(self, a: int, b: int) -> Rows:
        bags = [(v[o[a] : o[b]], o[a : b + 1] - o[a]) for v, o in self.bags]
        return Rows(self.fixed[a:b], self.ids[a:b], bags)

    def take(self, rows: np.ndarray, out: tuple[np.ndarray, np.ndarray] | None = None) -> Rows:
        """The rows at the indices ``rows``, in that order (fixed and ids written into ``out`` if given)."""
        bags = []
        for values, offsets in self.bags:
            lengths = (offsets[1:] - offsets[:-1])[rows]
            new = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(lengths, out=new[1:])
            at = np.repeat(offsets[:-1][rows] - new[:-1], lengths) + np.arange(new[-1], dtype=np.int64)
            bags.append((values[at], new))
        if out is None:
            return Rows(np.take(self.fixed, rows, axis=0), np.take(self.ids, rows, axis=0), bags)
        np.take(self.fixed, rows, axis=0, out=out[0], mode="clip")  # "clip": not buffered; rows are valid
        np.take(self.ids, rows, axis=0, out=out[1], mode="clip")
        return Rows(out[0], out[1], bags)

    @staticmethod
    def join(parts: Sequence[Rows], empty: Rows, out: tuple[np.ndarray, np.ndarray] | None = None) -> Rows:
        """The rows of ``parts`` one after the other (``empty``, a 0-row block, when there are none);
        fixed and ids written into ``out`` if given."""
        parts = [p for p in parts if p.rows] or [empty]
        if len(parts) == 1 and out is None:
            return parts[0]
        return Rows.join_runs([(p, 0, p.rows) for p in parts], empty, out)

    @staticmethod
    def join_runs(
        runs: Sequence[tuple[Rows, int, int]], empty: Rows, out: tuple[np.ndarray, np.ndarray] | None = None
    ) -> Rows:
        """Rows ``[a, b)`` of each run's block ``(rows, a, b)`` one after the other, in one copy (``empty``, a
        0-row block, when there are none); fixed and ids written into ``out`` if given.

        >>> rows = Rows(np.zeros((4, 1), np.float32), np.arange(4).reshape(4, 1), [])
        >>> Rows.join_runs([(rows, 2, 4), (rows, 0, 1)], rows.slice(0, 0)).ids.ravel().tolist()
        [2, 3, 0]
        """
        runs = runs or [(empty, 0, 0)]  # a run may be empty: it adds nothing
        bags = []
        for k in range(len(runs[0][0].bags)):
            offsets = [p.bags[k][1][a : b + 1] for p, a, b in runs]
            lengths = np.concatenate([np.diff(o) for o in offsets])
            new = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=new[1:])
            values = [p.bags[k][0][o[0] : o[-1]] for (p, _, _), o in zip(runs, offsets, strict=True)]
            bags.append((np.concatenate(values), new))
        fixed = np.concatenate([p.fixed[a:b] for p, a, b in runs], out=None if out is None else out[0])
        return Rows(fixed, np.concatenate([p.ids[a:b] for p, a, b in runs], out=None if out is None else out[1]), bags)


@dataclass
class Window:
    """The rows one process decodes for ``steps`` consecutive global batches from ``first_step`` on, as
    they were decoded: ``parts[c]`` holds source ``c``'s rows of every step, ``counts[c, j]`` of them in
    step ``j``. Its part of batch ``first_step + j`` is every source's step-``j`` rows, source after source
    (``batch_order`` lays them out so, batch after batch, in one copy)."""

    first_step: int
    parts: list[Rows]
    counts: np.ndarray  # int64 (len(parts), steps)

    @property
    def steps(self) -> int:
        return int(self.counts.shape[1])

    @property
    def rows(self) -> int:
        return int(self.counts.sum())

    @property
    def bounds(self) -> np.ndarray:
        """int64 (steps + 1,): batch ``first_step + j`` is rows ``[bounds[j], bounds[j + 1])`` of ``batch_order``."""
        return np.concatenate([[0], np.cumsum(self.counts.sum(axis=0))]).astype(np.int64)

    def batch_order(self, out: tuple[np.ndarray, np.ndarray] | None = None) -> Rows:
        """The rows batch after batch (fixed and ids written into ``out``, shaped (rows, ...), if given).

        One concatenation of views of the parts: no index is built and no row is gathered twice."""
        if len(self.parts) == 1 or self.steps == 1:  # the parts' own order is the batch order
            return Rows.join(self.parts, self.parts[0].slice(0, 0), out)
        starts = (np.cumsum(self.counts, axis=1) - self.counts).T.tolist()  # (steps, parts)
        runs = [
            (p, a, a + m)
            for row_a, row_m in zip(starts, self.counts.T.tolist(), strict=True)
            for p, a, m in zip(self.parts, row_a, row_m, strict=True)
            if m
        ]
        return Rows.join_runs(runs, self.parts[0].slice(0, 0), out)


def window_batches(
    windows: Sequence[Window], keys: list[str], multi_hot: Sequence[bool], pin_memory: bool = False
) -> Iterator[Batch]:
    """The Batches of windows that cover the same steps, each batch joining the windows' parts in order."""
    rows = [w.batch_order() for w in windows]
    bounds = [w.bounds.tolist() for w in windows]
    for j in range(windows[0].steps):
        yield to_batch(
            [r.slice(b[j], b[j + 1]) for r, b in zip(rows, bounds, strict=True)], keys, multi_hot, pin_memory
        )


def _key_runs(multi_hot: Sequence[bool]) -> list[tuple[int, int]]:
    """(first key, key count) of each run of consecutive keys that are all single-id or one multi-hot key."""
    runs: list[tuple[int, int]] = []
    for k, m in enumerate(multi_hot):
        if runs and not m and not multi_hot[k - 1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((k, 1))
    return runs


def to_batch(parts: Sequence[Rows], keys: list[str], multi_hot: Sequence[bool], pin_memory: bool = False) -> Batch:
    """A Batch of the rows of ``parts`` one after the other, its four tensors views of one fresh buffer
    (pinned with ``pin_memory``, for asynchronous host-to-device copies on CUDA).

    Copies (a view of a row group would pin it), and one buffer because DataLoader workers hand each
    storage over as its own shared-memory segment. Runs of single-id keys are copied as one 2-D block
    per part: the KJT's values are key-major, the rows' ids row-major.
    """
    n, d = sum(p.rows for p in parts), parts[0].fixed.shape[1] - 1
    bag_of = {k: b for b, k in enumerate(k for k, m in enumerate(multi_hot) if m)}
    per_key = [sum(len(p.bags[bag_of[k]][0]) for p in parts) if m else n for k, m in enumerate(multi_hot)]
    nv, nl = sum(per_key), n * len(keys)
    nbytes = 8 * (nv + nl) + 4 * (n * d + n)  # int64 parts first keeps every view aligned
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin_memory)
    values = buf[: 8 * nv].view(torch.int64)
    lengths = buf[8 * nv : 8 * (nv + nl)].view(torch.int64)
    dense = buf[8 * (nv + nl) : 8 * (nv + nl) + 4 * n * d].view(torch.float32).view(n, d)
    labels = buf[8 * (nv + nl) + 4 * n * d :].view(torch.float32)
    values_np, lengths_np = values.numpy(), lengths.numpy().reshape(len(keys), n)
    dense_np, labels_np = dense.numpy(), labels.numpy()
    starts = [0, *itertools.accumulate(per_key)]
    runs = _key_runs(multi_hot)
    for k0, count in runs:
        if not multi_hot[k0]:
            lengths_np[k0 : k0 + count] = 1
    row, bag_pos = 0, [0] * len(bag_of)
    for p in parts:
        m = p.rows
        col = 0
        for k0, count in runs:
            if multi_hot[k0]:
                b = bag_of[k0]
                vals, offs = p.bags[b]
                at = starts[k0] + bag_pos[b]
                values_np[at : at + len(vals)] = vals
                np.subtract(offs[1:], offs[:-1], out=lengths_np[k0, row : row + m])
                bag_pos[b] += len(vals)
            else:
                block = values_np[starts[k0] : starts[k0 + count]].reshape(count, n)
                block[:, row : row + m] = p.ids[:, col : col + count].T
                col += count
        dense_np[row : row + m] = p.fixed[:, 1:]
        labels_np[row : row + m] = p.fixed[:, 0]
        row += m
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=lengths, stride=n, length_per_key=per_key)
    return Batch(dense_features=dense, sparse_features=kjt, labels=labels)


def join_batches(pieces: Sequence[Batch], keys: list[str]) -> Batch:
    """One Batch holding the rows of ``pieces`` one after the other (DataLoader workers' parts)."""
    if len(pieces) == 1:
        return pieces[0]
    split = [p.sparse_features.values().split(p.sparse_features.length_per_key()) for p in pieces]
    values = [s[k] for k in range(len(keys)) for s in split]
    lengths = [
        p.sparse_features.lengths().view(len(keys), p.labels.shape[0])[k] for k in range(len(keys)) for p in pieces
    ]
    n = sum(p.labels.shape[0] for p in pieces)
    kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths), stride=n)
    return Batch(
        dense_features=torch.cat([p.dense_features for p in pieces]),
        sparse_features=kjt,
        labels=torch.cat([p.labels for p in pieces]),
    )


__all__ = ["Rows", "Window", "join_batches", "to_batch", "window_batches"]
