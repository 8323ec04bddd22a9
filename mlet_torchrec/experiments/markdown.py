"""Markdown helpers of the reports: a table from a header and rows, MiB from bytes.

Example:
    >>> _table(["a", "b"], [["1", "2"]])
    ['| a | b |', '|---|---|', '| 1 | 2 |']
    >>> _mib(3 * 2**20), _mib(None)
    ('3.00', '–')
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _mib(b: float | None) -> str:
    return "–" if b is None else f"{b / 2**20:.2f}"
