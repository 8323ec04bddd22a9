"""Which split a row goes to: a seeded, counter-based draw per row, independent of block boundaries.

Row ``i`` of input stream ``stream`` gets the uniform number ``splitmix64(i, key(seed, stream))`` and
goes to train, valid or test by comparing it with the cumulative fractions, so the same row lands in
the same split however the file is cut into blocks (and on any machine).

    >>> assign_splits((0.8, 0.1, 0.1), seed=3, stream=0, start=0, n=10).tolist()
    [0, 0, 0, 0, 1, 2, 0, 0, 0, 1]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipes.errors import OptionError
from data_pipes.hashing import GOLDEN, splitmix64, unit_interval

SplitFractions = tuple[float, float, float]
_STREAM_MUL = 0xBF58476D1CE4E5B9  # spreads the streams of one seed apart


def check_fractions(split: Sequence[float]) -> SplitFractions:
    """``(train, valid, test)`` fractions: three numbers >= 0 summing to 1, train > 0."""
    fr = tuple(float(x) for x in split)
    if len(fr) != 3 or any(not np.isfinite(x) or x < 0 for x in fr) or abs(sum(fr) - 1.0) > 1e-6 or fr[0] <= 0:
        raise OptionError(
            f"--split: fractions must be three numbers >= 0 (train, valid, test) summing to 1 "
            f"with train > 0, got {list(split)}"
        )
    return fr[0], fr[1], fr[2]


def row_uniforms(seed: int, stream: int, start: int, n: int) -> np.ndarray:
    """Uniform [0, 1) numbers for rows ``start..start+n-1`` of one input: a counter-based generator
    (splitmix64 of the row index), so the split of a row does not depend on block boundaries."""
    key = int(seed) * GOLDEN + (int(stream) + 1) * _STREAM_MUL
    return unit_interval(splitmix64(np.arange(start, start + n, dtype=np.uint64), key))


def assign_splits(fractions: SplitFractions, seed: int, stream: int, start: int, n: int) -> np.ndarray:
    """Split codes (0 train, 1 valid, 2 test) of ``n`` rows drawn with ``fractions``."""
    u = row_uniforms(seed, stream, start, n)
    return (u >= fractions[0]).astype(np.int8) + (u >= fractions[0] + fractions[1]).astype(np.int8)


__all__ = ["SplitFractions", "assign_splits", "check_fractions", "row_uniforms"]
