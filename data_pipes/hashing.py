"""Stable 64-bit hashing, vectorised over NumPy ``uint64`` arrays: the one place data_pipes mixes bits.

Three users, one module, so that a data set written today hashes alike tomorrow:

* :func:`splitmix64` (a counter-based generator): the converters' per-row split assignment and the
  synthetic generator's planted tables and id permutation;
* :func:`hash_strings` (MurmurHash3's finaliser over 8-byte words): categorical values -> vocabulary
  keys and hash buckets (:mod:`data_pipes.convert.vocab`);
* :func:`unit_interval`: the top 53 bits of a hash as a uniform float in ``[0, 1)``.

Every value is pinned by tests (``tests/test_convert_vocab.py``, ``tests/test_convert_parsers.py``,
``tests/test_synth.py``): a change would silently remap the ids or splits of existing data sets.

    >>> import numpy as np
    >>> splitmix64(np.arange(3, dtype=np.uint64), 0).tolist()
    [0, 16294208416658607535, 7960286522194355700]
    >>> unit_interval(np.array([1 << 63], dtype=np.uint64)).tolist()
    [0.5]
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import pyarrow as pa

GOLDEN = 0x9E3779B97F4A7C15
"""splitmix64's increment (2^64 / golden ratio), also a general-purpose odd multiplier."""

_U64 = np.uint64
_SM1 = _U64(0xBF58476D1CE4E5B9)
_SM2 = _U64(0x94D049BB133111EB)
_FM1 = _U64(0xFF51AFD7ED558CCD)
_FM2 = _U64(0xC4CEB9FE1A85EC53)
_LEN_MUL = _U64(0xD6E8FEB86659FD93)

NULL_HASH = _U64(0x6A09E667F3BCC908)
"""The hash of a missing (null) value; distinct from the hash of any string with overwhelming probability."""

ArrayLike: TypeAlias = pa.Array | pa.ChunkedArray


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (a bijection of ``uint64``) on a copy of ``x`` (wrapping arithmetic).

    >>> mix64(np.array([1], dtype=np.uint64)).tolist()
    [6238072747940578789]
    """
    x = x ^ (x >> _U64(30))
    x *= _SM1
    x ^= x >> _U64(27)
    x *= _SM2
    x ^= x >> _U64(31)
    return x


def splitmix64(counter: np.ndarray, key: int) -> np.ndarray:
    """``mix64(counter * GOLDEN + key)``: output ``counter`` of the splitmix64 stream keyed by ``key``.

    Counter-based: the value for one counter does not depend on any other, so rows (or table entries)
    can be drawn in any order and any block size.
    """
    z = np.asarray(counter, dtype=np.uint64) * _U64(GOLDEN)
    z += _U64(int(key) % (1 << 64))
    return mix64(z)


def unit_interval(h: np.ndarray) -> np.ndarray:
    """``uint64`` hashes -> uniform float64 in ``[0, 1)`` (their top 53 bits)."""
    return (h >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection), **in place** on a ``uint64`` array; returns it."""
    h ^= h >> _U64(33)
    h *= _FM1
    h ^= h >> _U64(33)
    h *= _FM2
    h ^= h >> _U64(33)
    return h


def single_chunk(arr: ArrayLike) -> pa.Array:
    """An Arrow array as one contiguous ``pa.Array`` (chunked arrays are combined only if needed)."""
    if isinstance(arr, pa.ChunkedArray):
        return arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    return arr


def hash_strings(arr: ArrayLike) -> np.ndarray:
    """Stable 64-bit hashes of a string or binary Arrow array (nulls hash to :data:`NULL_HASH`).

    Vectorised: strings are laid out in a zero-padded ``(n, 8 * words)`` byte matrix and mixed one
    64-bit word at a time (the length first, then ``max(1, ceil(len / 8))`` words, so the result does
    not depend on the other strings of the chunk): O(total bytes) in NumPy, no Python loop per value.
    ``string`` and ``binary`` values with the same bytes hash alike.

        >>> int(hash_strings(pa.array(["abc"]))[0])
        4658521565417623649
    """
    arr = single_chunk(arr)
    t = arr.type
    if pa.types.is_dictionary(t):
        return hash_strings(arr.cast(t.value_type))
    off_dtype: type[np.int32] | type[np.int64]
    if pa.types.is_string(t) or pa.types.is_binary(t):
        off_dtype = np.int32
    elif pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        off_dtype = np.int64
    elif pa.types.is_null(t):
        return np.full(len(arr), NULL_HASH, dtype=np.uint64)
    else:
        raise TypeError(f"hash_strings needs a string or binary array, got {t}")
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=off_dtype, count=arr.offset + n + 1)[arr.offset :].astype(np.int64)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.empty(0, np.uint8)
    lengths = np.diff(offsets)
    lo, hi = int(offsets[0]), int(offsets[-1])
    maxlen = int(lengths.max())
    width = max(8, (maxlen + 7) // 8 * 8)
    mat = np.zeros((n, width), dtype=np.uint8)
    if maxlen == int(lengths.min()):  # fixed width (e.g. Criteo's 8 hex digits): a reshape, no scatter
        if maxlen:
            mat[:, :maxlen] = data[lo:hi].reshape(n, maxlen)
    elif hi > lo:
        rows = np.repeat(np.arange(n), lengths)
        cols = np.arange(lo, hi) - np.repeat(offsets[:-1], lengths)
        mat[rows, cols] = data[lo:hi]
    words = mat.view("<u8")
    h = lengths.astype(np.uint64) * _LEN_MUL
    h ^= _U64(GOLDEN)
    h ^= words[:, 0]
    fmix64(h)
    for w in range(1, words.shape[1]):  # later words only for the strings that reach them
        m = lengths > 8 * w
        hm = h[m] ^ words[m, w]
        h[m] = fmix64(hm)
    if arr.null_count:
        h[arr.is_null().to_numpy(zero_copy_only=False)] = NULL_HASH
    return h


__all__ = ["GOLDEN", "NULL_HASH", "fmix64", "hash_strings", "mix64", "single_chunk", "splitmix64", "unit_interval"]
