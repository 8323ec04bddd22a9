"""Value checks of one block of text columns: numbers, 0/1 labels, and what to do with bad values.

Strict mode (the default): the first bad value of a block raises a :class:`~data_pipes.errors.DataError`
naming file, row and column, e.g. ``criteo train.tsv: row 1234, column I5: 'abc' is not a number``.
Lenient mode: bad values are counted per column (:class:`IssueCounter`) and replaced (dense -> 0,
categorical -> the OOV id) or their rows dropped (bad labels).

    >>> import pyarrow as pa
    >>> check = BlockChecker("criteo t.tsv", first_line=1, n=3, lenient=False, issues=IssueCounter())
    >>> label01(pa.array(["1", "0", "2"]), "label", check).tolist()
    [1.0, 0.0, 0.0]
    >>> check.finish()
    Traceback (most recent call last):
    ...
    data_pipes.errors.DataError: criteo t.tsv: row 3, column label: '2' is not 0 or 1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipes.errors import DataError


@dataclass(frozen=True)
class DenseTransform:
    """How a raw number becomes a dense feature: ``log(1 + max(x, clip_min))`` (or ``max(x, clip_min)``
    without ``log1p``); missing values (and, in lenient mode, bad ones) are ``fill`` before it.

    >>> out = DenseTransform().apply(np.array([3.0, -2.0, 9.0]), np.array([True, True, False]))
    >>> [round(float(v), 4) for v in out]
    [1.3863, 0.0, 0.0]
    """

    log1p: bool = True
    clip_min: float = 0.0
    fill: float = 0.0

    def apply(self, values: np.ndarray, ok: np.ndarray) -> np.ndarray:
        x = np.where(ok, values, self.fill)
        np.maximum(x, self.clip_min, out=x)
        return (np.log1p(x) if self.log1p else x).astype(np.float32)

    def describe(self) -> str:
        core = f"max(x, {self.clip_min:g})"
        return f"{f'log(1 + {core})' if self.log1p else core}; missing -> x = {self.fill:g}"


DENSE_TRANSFORM = DenseTransform().describe()


class IssueCounter:
    """Lenient-mode counts: values replaced (by 0 / the OOV id) and rows dropped, per column and kind."""

    def __init__(self) -> None:
        self.values_replaced: dict[str, dict[str, int]] = {}
        self.rows_dropped: dict[str, dict[str, int]] = {}

    def add(self, column: str, kind: str, n: int, drop: bool) -> None:
        table = self.rows_dropped if drop else self.values_replaced
        per = table.setdefault(column, {})
        per[kind] = per.get(kind, 0) + int(n)

    def merge(self, other: IssueCounter) -> None:
        """Add ``other``'s counts (of the rows after this counter's)."""
        for drop, table in ((False, other.values_replaced), (True, other.rows_dropped)):
            for column, kinds in table.items():
                for kind, n in kinds.items():
                    self.add(column, kind, n, drop)

    @property
    def total_values_replaced(self) -> int:
        return sum(sum(v.values()) for v in self.values_replaced.values())

    @property
    def total_rows_dropped(self) -> int:
        return sum(sum(v.values()) for v in self.rows_dropped.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "values_replaced": self.values_replaced,
            "rows_dropped": self.rows_dropped,
            "total_values_replaced": self.total_values_replaced,
            "total_rows_dropped": self.total_rows_dropped,
        }


def show_value(v: object, limit: int = 40) -> str:
    if v is None or v == "" or v == b"":
        return "empty value"
    if isinstance(v, bytes):
        v = v.decode("utf-8", "backslashreplace")
    s = str(v)
    return repr(s if len(s) <= limit else s[:limit] + "...")


class BlockChecker:
    """Collects the bad values of one block. Strict: the first bad (row, column) of the block raises a
    :class:`DataError` at :meth:`finish`. Lenient: counts them; ``drop`` marks rows to leave out."""

    def __init__(self, prefix: str, first_line: int, n: int, lenient: bool, issues: IssueCounter) -> None:
        self.prefix, self.first_line, self.lenient, self.issues = prefix, first_line, lenient, issues
        self.drop = np.zeros(n, dtype=bool)
        self._first: tuple[int, int, str] | None = None
        self._order = 0

    def bad(
        self, column: str, mask: np.ndarray, values: pa.Array | Sequence[Any], kind: str, drop: bool = False
    ) -> bool:
        """Report ``mask`` rows of ``column`` as bad: message ``<value> <kind>``, e.g. ``'x' is not a number``."""
        self._order += 1
        if not mask.any():
            return False
        if self.lenient:
            self.issues.add(column, kind.removeprefix("is "), int(mask.sum()), drop)
            if drop:
                self.drop |= mask
            return True
        i = int(np.argmax(mask))
        if self._first is None or i < self._first[0]:
            v = values[i]
            v = v.as_py() if isinstance(v, pa.Scalar) else v
            msg = f"{self.prefix}: row {self.first_line + i}, column {column}: {show_value(v)} {kind}"
            self._first = (i, self._order, msg)
        return True

    def finish(self) -> None:
        if self._first is not None:
            raise DataError(self._first[2])


_NUMBER_RE = (
    r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
    r"|^[+-]?([nN][aA][nN]|[iI][nN][fF]([iI][nN][iI][tT][yY])?)$"
)


def _to_float64(arr: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Cast strings to float64; unparsable values become null and are flagged in the returned mask."""
    n = len(arr)
    try:
        return pc.cast(arr, pa.float64()), np.zeros(n, dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    if not pa.types.is_string(arr.type):
        arr = arr.cast(pa.string())
    ok = pc.match_substring_regex(arr, _NUMBER_RE)
    bad = pc.invert(ok).fill_null(False).to_numpy(zero_copy_only=False)
    masked = pc.if_else(ok, arr, pa.scalar(None, arr.type))
    try:
        return pc.cast(masked, pa.float64()), bad
    except pa.ArrowInvalid:  # the regex let through something Arrow rejects: element by element (rare)
        out = []
        for j, v in enumerate(masked.to_pylist()):
            try:
                out.append(None if v is None else pc.cast(pa.scalar(v), pa.float64()).as_py())
            except pa.ArrowInvalid:
                out.append(None)
                bad[j] = True
        return pa.array(out, pa.float64()), bad


def parse_numbers(arr: pa.Array, column: str, check: BlockChecker, drop: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Numbers of a string column: ``(values, ok)``; missing, non-numeric and non-finite values are
    not ``ok`` (reported to ``check`` unless missing; lenient: the row is dropped if ``drop``)."""
    missing = arr.is_null().to_numpy(zero_copy_only=False)
    floats, bad = _to_float64(arr)
    values = floats.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    nonfinite = ~np.isfinite(values) & ~missing & ~bad
    check.bad(column, bad, arr, "is not a number", drop=drop)
    check.bad(column, nonfinite, arr, "is not finite", drop=drop)
    ok = ~(missing | bad | nonfinite)
    return values, ok


def dense_feature(
    arr: pa.Array, column: str, check: BlockChecker, transform: DenseTransform = DenseTransform()
) -> np.ndarray:
    """``transform`` (default ``log(1 + max(x, 0))``) as float32; missing (and, lenient, bad) values -> fill."""
    values, ok = parse_numbers(arr, column, check)
    return transform.apply(values, ok)


def token_bags(col: pa.Array) -> pa.Array:
    """``token_seq`` strings -> ``list<string>`` bags split on whitespace; empty or missing -> ``[""]``.

    >>> token_bags(pa.array(["a b", "", None])).to_pylist()
    [['a', 'b'], [''], ['']]
    """
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_binary(col.type):
        col = col.cast(pa.string())
    bags = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(col.fill_null("")))
    empty = pc.equal(pc.list_value_length(bags), 0).to_numpy(zero_copy_only=False)
    if empty.any():
        bags = pc.if_else(pa.array(empty), pa.scalar([""], pa.list_(pa.string())), bags)
    return bags


def parse_hour(hour: pa.Array, check: BlockChecker) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """``YYMMDDHH`` strings -> (hour-of-day strings, weekday strings, bad mask)."""
    if pa.types.is_binary(hour.type):
        hour = hour.cast(pa.string())
    fmt_ok = pc.match_substring_regex(hour, r"^[0-9]{8}$").fill_null(False)
    ts = pc.strptime(
        pc.if_else(fmt_ok, hour, pa.scalar(None, pa.string())), format="%y%m%d%H", unit="s", error_is_null=True
    )
    # strptime normalises impossible dates (14022900 -> 2014-03-01): demand a round trip
    ok = pc.equal(pc.strftime(ts, format="%y%m%d%H"), hour).fill_null(False).to_numpy(zero_copy_only=False)
    bad = ~ok
    check.bad("hour", bad, hour, "is not an hour YYMMDDHH")
    hod = pc.cast(pc.hour(ts), pa.string())
    wd = pc.cast(pc.day_of_week(ts), pa.string())
    return hod, wd, bad


def label01(arr: pa.Array, column: str, check: BlockChecker) -> np.ndarray:
    """A 0/1 label column as float32; anything else is an error (lenient: the row is dropped)."""
    one = pc.equal(arr, "1").fill_null(False).to_numpy(zero_copy_only=False)
    zero = pc.equal(arr, "0").fill_null(False).to_numpy(zero_copy_only=False)
    check.bad(column, ~(one | zero), arr, "is not 0 or 1", drop=True)
    return np.asarray(one, dtype=np.float32)


__all__ = [
    "DENSE_TRANSFORM",
    "BlockChecker",
    "DenseTransform",
    "IssueCounter",
    "dense_feature",
    "label01",
    "parse_hour",
    "parse_numbers",
    "token_bags",
    "show_value",
]
