"""MovieLens in RecBole's atomic-file layout (ML-100K: ``ml-100k.inter``, ``.user``, ``.item``) -> Parquet.

The files are tab separated with a typed header (``user_id:token  item_id:token  rating:float ...``).
Each interaction is a row: the label is ``rating >= click_threshold`` (default 4, a "click"), and the
categorical features are ``user_id``, ``item_id`` and every other column of the ``.user`` and ``.item``
files (ML-100K: ``age``, ``gender``, ``occupation``, ``zip_code``, ``release_year`` and ``class``),
except ``drop_columns`` (default ``movie_title``, nearly one-to-one with ``item_id``). ``token_seq``
columns (ML-100K's genre list ``class``) become multi-hot bags (``list<int64>``), split on whitespace;
an empty one is a one-element bag holding the "empty" token. There are no dense features.

Interactions are streamed; the side tables (one row per user / item) are read whole, as they are small.
An interaction whose user (item) is not in the ``.user`` (``.item``) file is an error; in lenient mode
its side features get the OOV id 0. Split: random, default 0.8 / 0.1 / 0.1, deterministic given ``seed``.

Example:
    >>> convert_movielens("../shared/data/movielens_100k", "data/ml100k").summary()   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipes.convert.checks import BlockChecker, IssueCounter, parse_numbers, token_bags
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
from data_pipes.convert.text import (
    RawBlock,
    TextSource,
    check_input_file,
    iter_blocks,
    read_header,
)
from data_pipes.errors import DataError

DEFAULT_MIN_COUNT = 1
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
DEFAULT_DROP_COLUMNS = ("movie_title",)

PathLike = str | Path


def typed_header(path: Path) -> list[tuple[str, str]]:
    """``[(name, type)]`` of an atomic file's header (``user_id:token`` -> ``("user_id", "token")``)."""
    fields = []
    for raw in read_header(path, "movielens").split("\t"):
        name, _, typ = raw.strip().partition(":")
        fields.append((name, typ or "token"))
    names = [n for n, _ in fields]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup or "" in names:
        raise DataError(f"movielens {path}: row 1: bad header {names} (duplicate or empty column names)")
    return fields


def locate_files(input: PathLike) -> tuple[Path, Path | None, Path | None]:
    """The ``.inter`` file and its ``.user``/``.item`` siblings (same stem), from a directory or the .inter."""
    input = Path(input)
    if input.is_dir():
        inters = sorted(input.glob("*.inter"))
        if len(inters) != 1:
            raise DataError(
                f"movielens {input}: expected one *.inter file in the directory, found {[p.name for p in inters]}"
            )
        inter = inters[0]
    elif input.exists():
        inter = input
    else:
        raise DataError(f"movielens {input}: no such file or directory")
    user = inter.with_suffix(".user")
    item = inter.with_suffix(".item")
    return inter, (user if user.exists() else None), (item if item.exists() else None)


def _source(path: Path, fields: list[tuple[str, str]], include: list[str]) -> TextSource:
    return TextSource(
        path=path,
        dataset="movielens",
        delimiter="\t",
        column_names=[n for n, _ in fields],
        column_types={n: pa.string() for n, _ in fields},
        include=include,
        header=True,
    )


@dataclass
class SideTable:
    """One row per key (user or item): the key column and the raw side features."""

    path: Path
    key: str
    keys: pa.Array
    features: dict[str, pa.Array]  # string arrays, or list<string> for token_seq columns
    multi_hot: dict[str, bool]
    dropped: list[str]  # columns of the file that are no feature


def load_side_table(path: Path, key: str, drop_columns: Sequence[str]) -> SideTable:
    check_input_file(path, "movielens")
    fields = typed_header(path)
    names = [n for n, _ in fields]
    if key not in names:
        raise DataError(f"movielens {path}: row 1: the header has no {key} column (it has {names})")
    keep = [n for n in names if n == key or n not in drop_columns]
    src = _source(path, fields, keep)
    batches = [b.batch for b in iter_blocks(src, lenient=False, issues=IssueCounter())]
    table = pa.Table.from_batches(batches).combine_chunks()
    keys = table.column(key).chunk(0) if table.column(key).num_chunks else pa.array([], pa.string())
    if keys.null_count:
        row = int(np.argmax(keys.is_null().to_numpy(zero_copy_only=False))) + 2
        raise DataError(f"movielens {path}: row {row}, column {key}: empty value")
    seen: dict[str, int] = {}
    for i, k in enumerate(keys.to_pylist()):  # side tables are small (ML-20M: 138K users)
        if k in seen:
            raise DataError(f"movielens {path}: row {i + 2}, column {key}: {k!r} repeats row {seen[k] + 2}")
        seen[k] = i
    types = dict(fields)
    features, multi = {}, {}
    for n in keep:
        if n == key:
            continue
        col = table.column(n).combine_chunks() if table.num_rows else pa.array([], pa.string())
        if types[n] == "token_seq":
            features[n], multi[n] = token_bags(col), True
        else:
            features[n], multi[n] = col, False
    dropped = [n for n in names if n not in keep]
    return SideTable(path=path, key=key, keys=keys, features=features, multi_hot=multi, dropped=dropped)


def _make_parser(
    rating_col: str, threshold: float, sides: list[SideTable]
) -> Callable[[RawBlock, BlockChecker], ParsedBlock]:
    def parse(block: RawBlock, check: BlockChecker) -> ParsedBlock:
        b = block.batch
        rating = b.column(rating_col)
        values, ok = parse_numbers(rating, rating_col, check, drop=True)
        check.bad(rating_col, rating.is_null().to_numpy(zero_copy_only=False), rating, "is not a rating", drop=True)
        label = (ok & (np.nan_to_num(values, nan=-np.inf) >= threshold)).astype(np.float32)
        sparse = {"user_id": b.column("user_id"), "item_id": b.column("item_id")}
        oov: dict[str, np.ndarray] = {}
        for side in sides:
            ids = b.column(side.key)
            pos = pc.index_in(ids, value_set=side.keys)
            unknown = pos.is_null().to_numpy(zero_copy_only=False)
            check.bad(side.key, unknown, ids, f"is not in {side.path.name}")
            for n, col in side.features.items():
                sparse[n] = col.take(pos)
                if unknown.any():
                    oov[n] = unknown
                    if side.multi_hot[n]:  # a null bag -> one (OOV) element
                        sparse[n] = pc.if_else(pa.array(unknown), pa.scalar([""], col.type), sparse[n])
        return ParsedBlock(label=label, dense={}, sparse=sparse, oov=oov)

    return parse


def _raw_columns(inter_names: list[str], sides: list[SideTable]) -> list[tuple[str, str]]:
    """The columns of a joined row (interaction + side features), as the feature transform knows them."""
    kinds = {"user_id": "token", "item_id": "token", "rating": "label"}
    cols = [(n, kinds.get(n, "ignored")) for n in inter_names]
    for side in sides:
        cols += [(n, "token_seq" if multi else "token") for n, multi in side.multi_hot.items()]
        cols += [(n, "ignored") for n in side.dropped]
    first: dict[str, str] = {}
    for n, t in cols:
        first.setdefault(n, t)
    return list(first.items())


def convert_movielens(
    input: PathLike,
    output: PathLike,
    *,
    split: Sequence[float] | None = None,
    min_count: int = DEFAULT_MIN_COUNT,
    click_threshold: float = 4.0,
    drop_columns: Sequence[str] = DEFAULT_DROP_COLUMNS,
    **options: Any,
) -> ConvertResult:
    """Convert a MovieLens atomic-file directory (or its ``.inter`` file) to a Parquet data set.

    Args:
        split: ``(train, valid, test)`` fractions of the random split (default 0.8/0.1/0.1).
        min_count: values seen fewer times in the train rows map to the OOV id 0 (default 1).
        click_threshold: ``rating >= click_threshold`` is a click (label 1).
        drop_columns: side-table columns not to use as features.
        **options: see :class:`~data_pipes.convert.options.ConvertOptions`.
    """
    opts = ConvertOptions(min_count=min_count, **options)
    fractions = check_fractions(split if split is not None else DEFAULT_SPLIT)
    inter, user, item = locate_files(input)
    check_input_file(inter, "movielens")
    fields = typed_header(inter)
    names = [n for n, _ in fields]
    missing = [c for c in ("user_id", "item_id", "rating") if c not in names]
    if missing:
        raise DataError(f"movielens {inter}: row 1: the header lacks column(s) {missing} (it has {names})")
    sides = []
    if user is not None:
        sides.append(load_side_table(user, "user_id", drop_columns))
    if item is not None:
        sides.append(load_side_table(item, "item_id", drop_columns))
    features = [FeatureSpec("user_id"), FeatureSpec("item_id")]
    for side in sides:
        for n, multi in side.multi_hot.items():
            if n in {f.name for f in features}:
                raise DataError(f"movielens {side.path}: column {n} is also a column of another file")
            features.append(FeatureSpec(n, multi_hot=multi))
    source = _source(inter, fields, ["user_id", "item_id", "rating"])
    parser = _make_parser("rating", float(click_threshold), sides)
    rule = (
        f"random: each row independently to train/valid/test with probabilities "
        f"{fractions[0]:g}/{fractions[1]:g}/{fractions[2]:g} (seed {opts.seed})"
    )
    extra = {
        "label": f"rating >= {click_threshold:g}",
        "side_files": [str(s.path.absolute()) for s in sides],
        "dropped_columns": list(drop_columns),
    }
    job = ConvertJob(
        dataset="movielens",
        parts=[InputPart(source, parser)],
        dense=[],
        sparse=features,
        options=opts,
        fractions=fractions,
        split_rule=rule,
        extra_source=extra,
        extra_inputs=[s.path for s in sides],
        raw_columns=_raw_columns(names, sides),
        label=("rating", f"rating >= {click_threshold:g}"),
    )
    return run_job(job, output)


__all__ = [
    "DEFAULT_DROP_COLUMNS",
    "DEFAULT_MIN_COUNT",
    "DEFAULT_SPLIT",
    "convert_movielens",
    "load_side_table",
    "locate_files",
    "typed_header",
]
