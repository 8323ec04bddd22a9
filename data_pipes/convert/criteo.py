"""Criteo display-advertising logs -> Parquet: the Kaggle ``train.txt`` and the 1TB ``day_0 .. day_23``.

Rows: ``label, I1..I13, C1..C26``, tab separated, no header, empty fields allowed. Dense ``I*`` values
become ``log(1 + max(x, 0))`` (missing -> 0) as float32; ``C*`` values (8 hex digits in practice, any
bytes accepted) become ids through a vocabulary or hashing (:mod:`data_pipes.convert.vocab`; id 0 is
OOV; an empty field is a value of its own).

Splits (all deterministic given ``seed``):

* one file (Kaggle ``train.txt``, the shared sample's ``train.tsv``): each row independently goes to
  train / valid / test with probabilities ``split`` (default 0.8 / 0.1 / 0.1, the usual random 8:1:1);
* a directory of ``day_N`` files (optionally compressed, ``day_0.gz``): split by time as in the
  DLRM/MLET papers: every day but the last is train (days 0-5 of the 7-day Kaggle layout, 0-22 of the
  1TB set), and the last day's rows go to valid or test with probability 1/2 each;
* explicit files: ``input`` is train, ``valid`` and ``test`` are taken as they are.

Vocabularies are always counted on the train rows only.

Example:
    >>> res = convert_criteo("train.txt", "data/criteo", min_count=10)   # doctest: +SKIP
    >>> res.meta.cardinalities()["C3"]                                    # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_pipes.convert.checks import BlockChecker, dense_feature, label01
from data_pipes.convert.job import (
    ConvertJob,
    ConvertResult,
    FeatureSpec,
    InputPart,
    ParsedBlock,
    run_job,
)
from data_pipes.convert.options import ConvertOptions
from data_pipes.convert.splits import check_fractions
from data_pipes.convert.text import RawBlock, TextSource
from data_pipes.errors import DataError, OptionError

DENSE = [f"I{i}" for i in range(1, 14)]
SPARSE = [f"C{i}" for i in range(1, 27)]
COLUMNS = ["label"] + DENSE + SPARSE
DEFAULT_MIN_COUNT = 10
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
_DAY_RE = re.compile(r"^day_(\d+)(\.[A-Za-z0-9]+)*$")

PathLike = str | Path


def criteo_source(path: PathLike) -> TextSource:
    types = {c: pa.string() for c in ["label"] + DENSE}
    types.update({c: pa.binary() for c in SPARSE})  # no UTF-8 check needed for opaque categories
    return TextSource(path=Path(path), dataset="criteo", delimiter="\t", column_names=COLUMNS, column_types=types)


def parse_block(block: RawBlock, check: BlockChecker) -> ParsedBlock:
    b = block.batch
    label = label01(b.column("label"), "label", check)
    dense = {n: dense_feature(b.column(n), n, check) for n in DENSE}
    return ParsedBlock(label=label, dense=dense, sparse={n: b.column(n) for n in SPARSE})


def find_day_files(directory: PathLike) -> list[Path]:
    """``day_N`` files of a directory (any extension, e.g. ``day_3.gz``), ordered by N."""
    directory = Path(directory)
    days = []
    for p in directory.iterdir():
        m = _DAY_RE.match(p.name)
        if m and p.is_file():
            days.append((int(m.group(1)), p))
    days.sort()
    numbers = [d for d, _ in days]
    if len(set(numbers)) != len(numbers):
        dup = sorted({d for d in numbers if numbers.count(d) > 1})
        raise DataError(f"criteo {directory}: several files for day(s) {dup}")
    if len(days) < 2:
        raise DataError(
            f"criteo {directory}: a directory input needs at least two day_N files "
            f"(found {[p.name for _, p in days]}); pass a single file for a random split"
        )
    return [p for _, p in days]


def convert_criteo(
    input: PathLike,
    output: PathLike,
    *,
    valid: PathLike | None = None,
    test: PathLike | None = None,
    split: Sequence[float] | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
    **options: Any,
) -> ConvertResult:
    """Convert Criteo text to a Parquet data set at ``output``.

    Args:
        input: one file (random split), or a directory of ``day_N`` files (time split).
        valid, test: explicit validation/test files; ``input`` is then the train split.
        split: ``(train, valid, test)`` fractions of a single-file random split (default 0.8/0.1/0.1).
        min_count: values seen fewer times in the train rows map to the OOV id 0.
        **options: see :class:`~data_pipes.convert.options.ConvertOptions` (``hash_buckets``, ``seed``,
            ``lenient``, ``overwrite``, ``progress``, ``block_size``, ``rows_per_file``, ...).
    """
    opts = ConvertOptions(min_count=min_count, **options)
    input = Path(input)
    if not input.exists():
        raise DataError(f"criteo {input}: no such file or directory")
    fractions = None
    if input.is_dir():
        if valid is not None or test is not None or split is not None:
            raise OptionError(
                "a directory of day files is split by time; --valid, --test and --split apply to a single input file"
            )
        days = find_day_files(input)
        parts = [InputPart(criteo_source(p), parse_block, split="train") for p in days[:-1]]
        parts.append(InputPart(criteo_source(days[-1]), parse_block, split=None, stream=len(days) - 1))
        fractions = (0.0, 0.5, 0.5)
        rule = (
            f"time: days {days[0].name}..{days[-2].name} -> train; {days[-1].name} -> valid/test, "
            f"each row with probability 1/2 (seed {opts.seed})"
        )
    elif valid is not None or test is not None:
        if split is not None:
            raise OptionError("--split applies to a single input; with --valid/--test the files are the splits")
        parts = [InputPart(criteo_source(input), parse_block, split="train")]
        if valid is not None:
            parts.append(InputPart(criteo_source(valid), parse_block, split="valid"))
        if test is not None:
            parts.append(InputPart(criteo_source(test), parse_block, split="test"))
        rule = "explicit files: " + ", ".join(f"{p.split}={p.source.path.name}" for p in parts)
    else:
        fractions = check_fractions(split if split is not None else DEFAULT_SPLIT)
        parts = [InputPart(criteo_source(input), parse_block, split=None)]
        rule = (
            f"random: each row independently to train/valid/test with probabilities "
            f"{fractions[0]:g}/{fractions[1]:g}/{fractions[2]:g} (seed {opts.seed})"
        )
    job = ConvertJob(
        dataset="criteo",
        parts=parts,
        dense=DENSE,
        sparse=[FeatureSpec(n) for n in SPARSE],
        options=opts,
        fractions=fractions,
        split_rule=rule,
        raw_columns=[("label", "label")] + [(n, "number") for n in DENSE] + [(n, "token") for n in SPARSE],
        label=("label", "0 or 1"),
    )
    return run_job(job, output)


__all__ = [
    "COLUMNS",
    "DEFAULT_MIN_COUNT",
    "DEFAULT_SPLIT",
    "DENSE",
    "SPARSE",
    "convert_criteo",
    "criteo_source",
    "find_day_files",
    "parse_block",
]
