"""What a conversion is made of: its inputs, their parser and the features (:class:`ConvertJob`).

The per-format modules (criteo, avazu, movielens) build a job; :mod:`.passes` runs its passes and
:func:`data_pipes.convert.job.run_job` the whole conversion.

Example:
    >>> FeatureSpec("hour", column="hour", derive="hour_of_day").multi_hot
    False
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_pipes.convert.checks import BlockChecker
from data_pipes.convert.options import ConvertOptions
from data_pipes.convert.splits import SplitFractions
from data_pipes.convert.text import RawBlock, TextSource


@dataclass
class FeatureSpec:
    """A categorical feature: its raw ``column`` (default: ``name``), possibly a value ``derive``d from it."""

    name: str
    multi_hot: bool = False
    column: str | None = None
    derive: str | None = None  # "hour_of_day" | "weekday" (see data_pipes.transform)


@dataclass
class ParsedBlock:
    """What a format's parser makes of one block (``n`` rows, before lenient drops)."""

    label: np.ndarray  # float32 (n,)
    dense: dict[str, np.ndarray]  # float32 (n,) each, already transformed
    sparse: dict[str, pa.Array]  # raw values: string/binary, or list<string> for multi-hot features
    oov: dict[str, np.ndarray] = field(default_factory=dict)  # rows whose value is forced to the OOV id


Parser = Callable[[RawBlock, BlockChecker], ParsedBlock]


@dataclass
class InputPart:
    """One input file and where its rows go: a fixed split, or (``split=None``) the job's random split."""

    source: TextSource
    parse: Parser
    split: str | None = None
    stream: int = 0  # distinguishes the random streams of several randomly split files


@dataclass
class ConvertJob:
    dataset: str
    parts: list[InputPart]
    dense: list[str]
    sparse: list[FeatureSpec]
    options: ConvertOptions
    fractions: SplitFractions | None = None  # for parts with split=None
    split_rule: str = ""
    extra_source: dict[str, Any] = field(default_factory=dict)
    extra_inputs: list[Path] = field(default_factory=list)  # files read besides the parts (side tables)
    raw_columns: list[tuple[str, str]] = field(default_factory=list)  # (name, type) as in data_pipes.transform
    label: tuple[str, str] | None = None  # (column, rule)

    def inputs(self) -> list[Path]:
        """Every file the job reads: the output may neither be nor contain one of them."""
        extra = [Path(self.options.features_from)] if self.options.features_from is not None else []
        return [p.source.path for p in self.parts] + list(self.extra_inputs) + extra


__all__ = ["ConvertJob", "FeatureSpec", "InputPart", "ParsedBlock", "Parser"]
