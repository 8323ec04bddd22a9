"""Categorical ids: streamed vocabularies with a minimum count, or hashing into a fixed number of buckets.

Every categorical value is first reduced to a stable 64-bit hash (:func:`data_pipes.hashing.hash_strings`,
vectorised over Arrow's string buffers, the same on every machine and run). Vocabularies store hashes, never strings:

* :class:`VocabCounter` counts hashes over a stream of Arrow arrays (a first pass over the train split).
  Each chunk is reduced with ``pyarrow.compute.value_counts`` and the per-chunk ``(hash, count)`` pairs
  are merged into one sorted ``uint64``/``int64`` array pair, in an LSM fashion (pending chunks are merged
  once they hold as many entries as the main arrays, or ``merge_min`` = 65536 while those are smaller, so
  every entry is merged O(log) times and the pending entries never outnumber the distinct values).

  **Memory**: 16 bytes per distinct value while counting, up to as much again of pending chunk counts,
  and ~3x that transiently during a merge (one column at a time). The real Criteo Kaggle ``train.txt`` has
  ~33M distinct values over its 26 columns (the largest column ~10M): ~0.5 GB of counts, ~1.5 GB at the
  peak of the largest merge. Criteo 1TB has ~880M distinct values: count it with ``hash_buckets`` instead
  (no counting pass at all).
* :meth:`VocabCounter.finalize` keeps values seen at least ``min_count`` times and numbers them
  ``1..V`` by decreasing count (ties by hash), giving a :class:`Vocabulary` of 12 bytes per kept value.
* :class:`HashEncoder` maps a value to ``1 + hash % (buckets - 1)``: the table has exactly ``buckets``
  rows and needs no counting pass.

**Id 0 is the out-of-vocabulary id** in both modes: values rarer than ``min_count``, values first seen
outside the train split, and (in lenient mode) bad values. A missing (empty) value is a value like any
other (its own token), so it gets an id when it is frequent enough.

The hash is 64 bits: two different values of one feature collide with probability ~n^2 / 2^65
(~3e-6 for 10M distinct values), in which case they share an id.

Example:
    >>> import pyarrow as pa
    >>> c = VocabCounter()
    >>> c.add(pa.array(["a", "b", "a", None]))
    >>> v = c.finalize(min_count=2)
    >>> v.cardinality, v.encode(pa.array(["a", "b", "zz"])).tolist()
    (2, [1, 0, 0])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipes.hashing import NULL_HASH, ArrayLike, hash_strings, single_chunk

OOV_ID = 0

_U64 = np.uint64


def _flat_values(arr: ArrayLike) -> pa.Array:
    """The values of a (list of) string array: lists are flattened, so a bag counts each element."""
    arr = single_chunk(arr)
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        return pc.list_flatten(arr)
    return arr


class VocabCounter:
    """Counts of value hashes over a stream of chunks; see the module docstring for its memory."""

    def __init__(self, merge_min: int = 1 << 16) -> None:
        self.merge_min = merge_min  # pending entries that trigger a merge at the least
        self._keys = np.empty(0, dtype=np.uint64)
        self._counts = np.empty(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_len = 0
        self.total = 0  # values counted

    def add(self, arr: ArrayLike) -> None:
        """Count the values of a string/binary array, or of a list<string> array's elements."""
        values = _flat_values(arr)
        if len(values) == 0:
            return
        vc = pc.value_counts(values)
        self.add_hashes(hash_strings(vc.field(0)), vc.field(1).to_numpy(zero_copy_only=False))

    def add_hashes(self, hashes: np.ndarray, counts: np.ndarray | None = None) -> None:
        hashes = np.asarray(hashes, dtype=np.uint64)
        counts = np.ones(len(hashes), np.int64) if counts is None else np.asarray(counts, dtype=np.int64)
        if len(hashes) == 0:
            return
        self.total += int(counts.sum())
        self._pending.append((hashes, counts))
        self._pending_len += len(hashes)
        if self._pending_len >= max(len(self._keys), self.merge_min):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self._keys] + [k for k, _ in self._pending])
        counts = np.concatenate([self._counts] + [c for _, c in self._pending])
        self._pending, self._pending_len = [], 0
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        del order
        starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        self._keys = keys[starts]
        self._counts = np.add.reduceat(counts, starts) if len(starts) else counts[:0]

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct hashes (sorted) and their counts: ``other.add_hashes(*c.counts())`` adds them
        to ``other`` exactly (counters of disjoint parts of the input merge into the whole's)."""
        self._merge()
        return self._keys, self._counts

    def __len__(self) -> int:
        """Number of distinct values counted so far."""
        self._merge()
        return len(self._keys)

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._counts.nbytes + sum(k.nbytes + c.nbytes for k, c in self._pending)

    def count_of(self, value: str | None) -> int:
        """Count of one value (for tests and debugging)."""
        self._merge()
        h = hash_strings(pa.array([value], pa.string()))[0]
        i = int(np.searchsorted(self._keys, h))
        return int(self._counts[i]) if i < len(self._keys) and self._keys[i] == h else 0

    def finalize(self, min_count: int = 1) -> Vocabulary:
        """Values counted at least ``min_count`` times get ids ``1..V`` by decreasing count (ties: by hash)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        self._merge()
        keep = self._counts >= min_count
        keys, counts = self._keys[keep], self._counts[keep]
        order = np.lexsort((keys, -counts))
        ids = np.empty(len(keys), dtype=np.int64)
        ids[order] = np.arange(1, len(keys) + 1, dtype=np.int64)
        return Vocabulary(
            keys=keys,
            ids=ids,
            distinct=len(self._keys),
            min_count=min_count,
            dropped_values=int(self._counts[~keep].sum()),
        )


@dataclass
class Vocabulary:
    """A frozen map value-hash -> id; id 0 (:data:`OOV_ID`) for everything else. ``keys`` is sorted."""

    keys: np.ndarray  # uint64, sorted
    ids: np.ndarray  # int64, ids[i] is the id of keys[i], a permutation of 1..len(keys)
    distinct: int = 0  # distinct values counted, kept or not
    min_count: int = 1
    dropped_values: int = 0  # occurrences of values rarer than min_count (they became OOV)

    @property
    def cardinality(self) -> int:
        """Rows the embedding table needs: the kept values plus the OOV id."""
        return len(self.keys) + 1

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        hashes = np.asarray(hashes, dtype=np.uint64)
        if len(self.keys) == 0 or len(hashes) == 0:
            return np.zeros(len(hashes), dtype=np.int64)
        order = np.argsort(hashes)  # sorted queries walk the (large) key array cache-friendly: ~3x faster
        pos = np.empty(len(hashes), dtype=np.intp)
        pos[order] = np.searchsorted(self.keys, hashes[order])
        pos[pos == len(self.keys)] = 0
        return np.where(self.keys[pos] == hashes, self.ids[pos], OOV_ID).astype(np.int64, copy=False)

    def encode(self, arr: ArrayLike) -> np.ndarray:
        """Ids (int64) of a string array's values, or of a list array's flattened elements."""
        return _encode_by_dictionary(_flat_values(arr), self.lookup)

    def describe(self) -> dict[str, Any]:
        return {
            "mode": "vocabulary",
            "min_count": self.min_count,
            "distinct_in_train": self.distinct,
            "kept": len(self.keys),
            "oov_occurrences_in_train": self.dropped_values,
            "cardinality": self.cardinality,
        }


@dataclass
class HashEncoder:
    """``id = 1 + hash(value) % (buckets - 1)``: a table of exactly ``buckets`` rows, row 0 kept for OOV."""

    buckets: int

    def __post_init__(self) -> None:
        if self.buckets < 2:
            raise ValueError(f"hash buckets must be >= 2 (row 0 is the OOV id), got {self.buckets}")

    @property
    def cardinality(self) -> int:
        return self.buckets

    def lookup(self, hashes: np.ndarray) -> np.ndarray:
        return (np.asarray(hashes, dtype=np.uint64) % _U64(self.buckets - 1)).astype(np.int64) + 1

    def encode(self, arr: ArrayLike) -> np.ndarray:
        return _encode_by_dictionary(_flat_values(arr), self.lookup)

    def describe(self) -> dict[str, Any]:
        return {"mode": "hashing", "buckets": self.buckets, "cardinality": self.cardinality}


Encoder = Vocabulary | HashEncoder


def _encode_by_dictionary(values: pa.Array, lookup: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Hash and look up each distinct value of the chunk once, then gather by the dictionary indices."""
    if len(values) == 0:
        return np.empty(0, dtype=np.int64)
    enc = pc.dictionary_encode(values, null_encoding="encode")
    dict_ids = lookup(hash_strings(enc.dictionary))
    return np.asarray(dict_ids[enc.indices.to_numpy(zero_copy_only=False)])


__all__ = ["NULL_HASH", "OOV_ID", "Encoder", "HashEncoder", "VocabCounter", "Vocabulary", "hash_strings"]
