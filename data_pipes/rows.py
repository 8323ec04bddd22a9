"""Decoded rows in a packed layout that is cheap to slice, permute and join, and their Batch.

The reader cuts every global batch out of many shards (data_pipes/order.py), so a batch is joined
from dozens of small pieces: fixed-width columns live in two 2-D arrays (label and dense values as
float32, single-id features as int64) so a piece costs two slices, not one per column. Multi-hot
bags keep (values, offsets) each.

Example:
    >>> import numpy as np
    >>> rows = Rows(np.zeros((4, 2), np.float32), np.arange(8).reshape(4, 2), [])
    >>> Rows.join([rows.slice(1, 3), rows.take(np.array([0]))], rows.slice(0, 0)).ids.tolist()
    [[2, 3], [4, 5], [0, 1]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

Bag = tuple[np.ndarray, np.ndarray]  # int64 values, int64 offsets (n + 1, starting at 0)


@dataclass
class Rows:
    """``fixed`` float32 (n, 1 + D): label then dense values; ``ids`` int64 (n, S): the single-id
    features in key order; ``bags``: the multi-hot features in key order."""

    fixed: np.ndarray
    ids: np.ndarray
    bags: list[Bag]

    @property
    def rows(self) -> int:
        return len(self.fixed)

    def slice(self, a: int, b: int) -> Rows:
        bags = [(v[o[a] : o[b]], o[a : b + 1] - o[a]) for v, o in self.bags]
        return Rows(self.fixed[a:b], self.ids[a:b], bags)

    def take(self, rows: np.ndarray) -> Rows:
        """The rows at the indices ``rows``, in that order."""
        bags = []
        for values, offsets in self.bags:
            lengths = (offsets[1:] - offsets[:-1])[rows]
            new = np.zeros(len(rows) + 1, dtype=np.int64)
            np.cumsum(lengths, out=new[1:])
            at = np.repeat(offsets[:-1][rows] - new[:-1], lengths) + np.arange(new[-1], dtype=np.int64)
            bags.append((values[at], new))
        return Rows(self.fixed[rows], self.ids[rows], bags)

    @staticmethod
    def join(parts: Sequence[Rows], empty: Rows) -> Rows:
        """The rows of ``parts`` one after the other (``empty``, a 0-row block, when there are none)."""
        parts = [p for p in parts if p.rows] or [empty]
        if len(parts) == 1:
            return parts[0]
        bags = []
        for k in range(len(parts[0].bags)):
            lengths = np.concatenate([np.diff(p.bags[k][1]) for p in parts])
            new = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=new[1:])
            bags.append((np.concatenate([p.bags[k][0] for p in parts]), new))
        return Rows(np.concatenate([p.fixed for p in parts]), np.concatenate([p.ids for p in parts]), bags)

    def to_batch(self, keys: list[str], multi_hot: Sequence[bool]) -> Batch:
        """A Batch whose four tensors are views of one fresh buffer.

        Copies (a view of a row group would pin it, or ship all of it to the main process), and one
        buffer because DataLoader workers hand each storage over as its own shared-memory segment:
        one per batch instead of four makes worker -> main transfers ~2x faster.
        """
        n, d = self.rows, self.fixed.shape[1] - 1
        single, bag = iter(range(self.ids.shape[1])), iter(self.bags)
        columns = [next(bag) if m else self.ids[:, next(single)] for m in multi_hot]
        per_key = [len(c[0]) if m else n for c, m in zip(columns, multi_hot, strict=True)]
        nv, nl = sum(per_key), n * len(keys)
        nbytes = 8 * (nv + nl) + 4 * (n * d + n)  # int64 parts first keeps every view aligned
        buf = torch.empty(nbytes, dtype=torch.uint8)
        values = buf[: 8 * nv].view(torch.int64)
        lengths = buf[8 * nv : 8 * (nv + nl)].view(torch.int64)
        dense = buf[8 * (nv + nl) : 8 * (nv + nl) + 4 * n * d].view(torch.float32).view(n, d)
        labels = buf[8 * (nv + nl) + 4 * n * d :].view(torch.float32)
        values_np, lengths_np = values.numpy(), lengths.numpy()
        pos = 0
        for k, (col, m) in enumerate(zip(columns, multi_hot, strict=True)):
            if m:
                values_np[pos : pos + per_key[k]] = col[0]
                np.subtract(col[1][1:], col[1][:-1], out=lengths_np[k * n : (k + 1) * n])
            else:
                values_np[pos : pos + n] = col
                lengths_np[k * n : (k + 1) * n] = 1
            pos += per_key[k]
        dense.numpy()[...] = self.fixed[:, 1:]
        labels.numpy()[...] = self.fixed[:, 0]
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


__all__ = ["Rows", "join_batches"]
