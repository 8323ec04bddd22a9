"""The row order of one epoch of a split, independent of the number of ranks reading it.

The ``N`` rows of a split (numbered in file and row-group order) are cut into ``V`` virtual shards
(``V = virtual_shards``, default 96 = 2^5 * 3) of contiguous rows, ``N // V`` or ``N // V + 1`` rows
each. The epoch's stream interleaves them row by row: stream row ``t`` is row ``t // V`` of shard
``t % V``. Global batch ``s`` is stream rows ``[s * B, (s + 1) * B)``, so it depends on
(seed, epoch, s), ``B`` and the data only, never on the world size.

With ``shuffle`` the shards are laid over the rows in an order drawn from (seed, epoch), each
shard's row-group pieces are visited in an order drawn from (seed, epoch, shard) and the rows of a
piece are permuted by (seed, epoch, shard, piece).

Rank ``r`` of ``W`` takes the stream rows ``t ≡ r (mod W)``: with ``W`` dividing ``B`` that is
exactly ``B / W`` rows of every global batch. They lie in the shards ``v ≡ r (mod g)``,
``g = gcd(V, W)``, so a rank reads ``1 / g`` of the data: ``1 / W`` when ``W`` divides ``V``.

Example:
    >>> order = EpochOrder([[10, 10], [5]], virtual_shards=4, shuffle=False, seed=0, epoch=0)
    >>> [s.rows for s in order.segments(0)], shard_offset(1, 9, 4)  # shard 0 = rows 0..6; t=1,5 < 9
    ([7], 2)
    >>> rank_shards(virtual_shards=4, world_size=2, rank=1)
    [(1, Progression(residue=0, stride=1)), (3, Progression(residue=0, stride=1))]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_VIRTUAL_SHARDS = 96  # 2^5 * 3: exact and reading 1/W of the data for W in 1-4, 6, 8, 12, 16, 24, 32, 48, 96


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of row group ``group`` of file ``file`` (indices into the split's lists)."""

    file: int
    group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Progression:
    """The offsets ``o ≡ residue (mod stride)`` of a shard: the rows of it one rank takes."""

    residue: int
    stride: int

    def count(self, end: int) -> int:
        """How many offsets of the progression lie in ``[0, end)``."""
        return max(0, (end - self.residue + self.stride - 1) // self.stride)


def shard_rows(rows: int, virtual_shards: int) -> np.ndarray:
    """Rows per shard: shard ``v`` holds the stream rows ``t < rows`` with ``t % V == v``."""
    q, rem = divmod(int(rows), int(virtual_shards))
    return np.array([q + (v < rem) for v in range(virtual_shards)], dtype=np.int64)


def shard_offset(v: int, end: int, virtual_shards: int) -> int:
    """How many stream rows ``t < end`` belong to shard ``v`` (``t % V == v``)."""
    return max(0, (int(end) - v + virtual_shards - 1) // virtual_shards)


def rank_shards(virtual_shards: int, world_size: int, rank: int) -> list[tuple[int, Progression]]:
    """The shards rank ``rank`` of ``world_size`` reads, each with the offsets it takes from it.

    Stream row ``t = v + V * o`` goes to rank ``t % W``; with ``g = gcd(V, W)`` only shards
    ``v ≡ rank (mod g)`` hold such rows, at offsets ``o ≡ o0 (mod W / g)``.
    """
    V, W = int(virtual_shards), int(world_size)
    g = math.gcd(V, W)
    stride, inv = W // g, pow(V // g, -1, W // g) if W // g > 1 else 0
    out = []
    for v in range(rank % g, V, g):
        residue = ((rank - v) // g * inv) % stride if stride > 1 else 0
        out.append((v, Progression(residue, stride)))
    return out


def reads_fraction(virtual_shards: int, world_size: int) -> float:
    """The fraction of the data each of ``world_size`` ranks decodes (``1 / world_size`` at best)."""
    return 1.0 / math.gcd(int(virtual_shards), int(world_size))


class EpochOrder:
    """Which rows make each virtual shard's stream in one epoch (footers' row counts only)."""

    def __init__(
        self, group_rows: Sequence[Sequence[int]], virtual_shards: int, shuffle: bool, seed: int, epoch: int
    ) -> None:
        if virtual_shards < 1:
            raise ValueError(f"virtual_shards must be >= 1, got {virtual_shards}")
        self.virtual_shards, self.shuffle, self.seed, self.epoch = int(virtual_shards), shuffle, int(seed), int(epoch)
        self._groups = [(f, g, int(n)) for f, groups in enumerate(group_rows) for g, n in enumerate(groups) if n]
        self._group_starts = np.cumsum([0] + [n for _, _, n in self._groups])
        self.rows = int(self._group_starts[-1])
        lengths = shard_rows(self.rows, self.virtual_shards)
        layout = self._rng().permutation(self.virtual_shards) if shuffle else np.arange(self.virtual_shards)
        self._start = np.zeros(self.virtual_shards, dtype=np.int64)
        self._start[layout] = np.cumsum(np.concatenate([[0], lengths[layout]]))[:-1]
        self._lengths = lengths

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(self.epoch, *key)))

    def segments(self, v: int) -> list[Segment]:
        """Shard ``v``'s row-group pieces in the order its stream visits them."""
        a, b = int(self._start[v]), int(self._start[v] + self._lengths[v])
        out: list[Segment] = []
        i = int(np.searchsorted(self._group_starts, a, side="right")) - 1
        while a < b:
            f, g, _ = self._groups[i]
            lo, hi = int(self._group_starts[i]), int(self._group_starts[i + 1])
            out.append(Segment(f, g, a - lo, min(b, hi) - lo))
            a, i = min(b, hi), i + 1
        if self.shuffle and len(out) > 1:
            out = [out[j] for j in self._rng(v).permutation(len(out))]
        return out

    def row_permutation(self, v: int, piece: int, rows: int) -> np.ndarray | None:
        """The order of the rows of piece ``piece`` of shard ``v`` (None: stored order)."""
        if not self.shuffle or rows < 2:
            return None
        return self._rng(v, piece + 1).permutation(rows)


__all__ = [
    "DEFAULT_VIRTUAL_SHARDS",
    "EpochOrder",
    "Progression",
    "Segment",
    "rank_shards",
    "reads_fraction",
    "shard_offset",
    "shard_rows",
]
