"""Avazu click logs -> Parquet.

Input: the Kaggle ``train`` CSV (40.4M rows) with its header ``id, click, hour, C1, banner_pos, site_id,
..., C21`` (columns may come in any order; optionally compressed, ``train.gz``). ``id`` is dropped,
``click`` is the 0/1 label, ``hour`` (``YYMMDDHH``) becomes two categorical features ``hour_of_day``
(``0..23``) and ``weekday`` (``0`` Monday .. ``6`` Sunday), and the 21 other columns are categorical
(ids through a vocabulary or hashing, :mod:`data_pipes.convert.vocab`; id 0 is OOV). There are no dense
features.

Split: random as in the papers, 90% train and 10% held out, the held-out rows going to valid or test
with probability 1/2 each (``split`` default 0.9 / 0.05 / 0.05; ``split=(0.9, 0, 0.1)`` gives a pure
90/10 train/test split). Deterministic given ``seed``; vocabularies are counted on the train rows.

Example:
    >>> convert_avazu("train.gz", "data/avazu", min_count=5).summary()   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from data_pipes.convert.checks import BlockChecker, label01, parse_hour
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
from data_pipes.convert.text import RawBlock, TextSource, check_input_file, read_header
from data_pipes.errors import DataError

CATEGORICAL = [
    "C1",
    "banner_pos",
    "site_id",
    "site_domain",
    "site_category",
    "app_id",
    "app_domain",
    "app_category",
    "device_id",
    "device_ip",
    "device_model",
    "device_type",
    "device_conn_type",
    "C14",
    "C15",
    "C16",
    "C17",
    "C18",
    "C19",
    "C20",
    "C21",
]
COLUMNS = ["id", "click", "hour"] + CATEGORICAL
SPARSE = ["hour_of_day", "weekday"] + CATEGORICAL
DEFAULT_MIN_COUNT = 5
DEFAULT_SPLIT = (0.9, 0.05, 0.05)

PathLike = str | Path


def avazu_source(path: PathLike) -> TextSource:
    path = check_input_file(Path(path), "avazu")
    header = read_header(path, "avazu")
    names = [h.strip() for h in header.split(",")]
    missing = [c for c in COLUMNS[1:] if c not in names]
    if missing:
        if len(missing) > 3:
            raise DataError(
                f"avazu {path}: row 1: not an Avazu header (it lacks {len(missing)} of the columns, "
                f"e.g. {missing[:3]}); expected {','.join(COLUMNS)}"
            )
        hint = " (Avazu's unlabelled test file cannot be converted)" if missing == ["click"] else ""
        raise DataError(
            f"avazu {path}: row 1: the header lacks column(s) {missing}{hint}; expected {','.join(COLUMNS)}"
        )
    unknown = [c for c in names if c not in COLUMNS]
    dup = sorted({c for c in names if names.count(c) > 1})
    if unknown or dup:
        raise DataError(
            f"avazu {path}: row 1: unexpected header column(s) {unknown or dup}; expected {','.join(COLUMNS)}"
        )
    types = {c: pa.string() for c in ("click", "hour")}
    types.update({c: pa.binary() for c in CATEGORICAL})
    return TextSource(
        path=path,
        dataset="avazu",
        delimiter=",",
        column_names=names,
        column_types=types,
        include=COLUMNS[1:],
        header=True,
    )


def parse_block(block: RawBlock, check: BlockChecker) -> ParsedBlock:
    b = block.batch
    label = label01(b.column("click"), "click", check)
    hod, wd, bad = parse_hour(b.column("hour"), check)
    sparse = {"hour_of_day": hod, "weekday": wd}
    sparse.update({c: b.column(c) for c in CATEGORICAL})
    oov = {"hour_of_day": bad, "weekday": bad} if bad.any() else {}
    return ParsedBlock(label=label, dense={}, sparse=sparse, oov=oov)


def convert_avazu(
    input: PathLike,
    output: PathLike,
    *,
    split: Sequence[float] | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
    **options: Any,
) -> ConvertResult:
    """Convert the Avazu CSV ``input`` to a Parquet data set at ``output``.

    Args:
        split: ``(train, valid, test)`` fractions of the random split (default 0.9/0.05/0.05).
        min_count: values seen fewer times in the train rows map to the OOV id 0.
        **options: see :class:`~data_pipes.convert.options.ConvertOptions`.
    """
    opts = ConvertOptions(min_count=min_count, **options)
    fractions = check_fractions(split if split is not None else DEFAULT_SPLIT)
    source = avazu_source(input)
    rule = (
        f"random: each row independently to train/valid/test with probabilities "
        f"{fractions[0]:g}/{fractions[1]:g}/{fractions[2]:g} (seed {opts.seed})"
    )
    job = ConvertJob(
        dataset="avazu",
        parts=[InputPart(source, parse_block)],
        dense=[],
        sparse=[FeatureSpec(n, column="hour", derive=n) for n in SPARSE[:2]] + [FeatureSpec(n) for n in CATEGORICAL],
        options=opts,
        fractions=fractions,
        split_rule=rule,
        extra_source={"dropped_columns": ["id"], "derived": {"hour": ["hour_of_day", "weekday"]}},
        raw_columns=[("id", "ignored"), ("click", "label"), ("hour", "hour")] + [(c, "token") for c in CATEGORICAL],
        label=("click", "0 or 1"),
    )
    return run_job(job, output)


__all__ = [
    "CATEGORICAL",
    "COLUMNS",
    "DEFAULT_MIN_COUNT",
    "DEFAULT_SPLIT",
    "SPARSE",
    "avazu_source",
    "convert_avazu",
    "parse_block",
    "parse_hour",
]
