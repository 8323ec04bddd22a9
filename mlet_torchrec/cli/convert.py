"""``mlet convert criteo|avazu|movielens``: raw CTR files -> the Parquet data set the trainer reads.

    mlet convert criteo --input train.txt --output data/criteo [--min-count 10] [--split 0.8 0.1 0.1]
    mlet convert criteo --input criteo_1tb/ --output data/criteo1tb --hash-buckets 40000000
    mlet convert criteo --input train.tsv --valid valid.tsv --test test.tsv --output data/sample
    mlet convert avazu --input train.gz --output data/avazu --hash-buckets device_ip=1000000 device_id=500000
    mlet convert movielens --input ml-100k/ --output data/ml100k

Under torchrun/TorchX (``launch/components.py:convert -j NODESxPROCS``) every process of the job runs the
same command as one rank of one conversion (data_pipes/convert/ranks.py); rank 0 prints the summary.

Standalone (same arguments, no ``mlet`` needed): ``python -m mlet_torchrec.cli.convert criteo --input ...``.
Each prints a one-line summary; bad input prints one ``error:`` line (file, row, column) and exits 2,
leaving no output behind. ``--log-level`` as for every ``mlet`` subcommand.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_pipes.convert.options import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_ROW_GROUP_ROWS,
    DEFAULT_ROWS_PER_FILE,
    DEFAULT_SHARD_SIZE,
)
from mlet_torchrec.cli import flags
from mlet_torchrec.cli.entry import print_once, run
from mlet_torchrec.cli.flags import example, existing


def bucket_spec(text: str) -> tuple[str, int]:
    """``N`` (every feature) or ``FEATURE=N``: one ``--hash-buckets`` item as ``(feature or "*", N)``."""
    name, sep, value = text.rpartition("=")
    if sep and not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or FEATURE=N")
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected N or FEATURE=N with an integer N") from None
    if n < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: buckets must be >= 2 (row 0 is the OOV id)")
    return (name if sep else "*"), n


def buckets_dict(specs: Sequence[tuple[str, int]] | None) -> dict[str, int] | None:
    if not specs:
        return None
    out: dict[str, int] = {}
    for name, n in specs:
        if name in out:
            what = "a bare N" if name == "*" else name
            raise flags.UsageError(f"--hash-buckets gives {what} twice")
        out[name] = n
    return out


def _common(
    p: argparse.ArgumentParser, default_min_count: int, default_split: Sequence[float], input_help: str
) -> None:
    flags.add_input(p, input_help)
    flags.add_output(p, "data set directory to create")
    p.add_argument(
        "--min-count",
        type=int,
        default=default_min_count,
        help=f"values seen fewer times in the train split map to the OOV id 0 (default {default_min_count})",
    )
    p.add_argument(
        "--hash-buckets",
        type=bucket_spec,
        nargs="+",
        metavar="N|FEATURE=N",
        help="hash features into N rows instead of a vocabulary (row 0 stays the OOV id): "
        "N for every feature and/or FEATURE=N for single ones",
    )
    p.add_argument(
        "--split",
        type=float,
        nargs=3,
        metavar=("TRAIN", "VALID", "TEST"),
        help="fractions of the random split (default " + " ".join(f"{x:g}" for x in default_split) + ")",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random split (default 0)")
    p.add_argument(
        "--lenient",
        action="store_true",
        help="count bad values instead of failing: bad categorical/dense values -> OOV id / 0, rows "
        "with a bad label or column count dropped; counts go to metadata.json",
    )
    p.add_argument(
        "--features-from",
        type=Path,
        metavar="DATASET|RUN|EXPORT",
        help="encode with the feature transform of this data set, run, collapse or export dir (its vocabularies; "
        "unseen values -> OOV): every input row, in input order, goes to --split-name",
    )
    p.add_argument(
        "--split-name",
        choices=("train", "valid", "test"),
        default="test",
        help="with --features-from: the split that gets every row (default test)",
    )
    flags.add_overwrite(p)
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar with rows/s on stderr (default: when stderr is a terminal)",
    )
    p.add_argument(
        "--block-size-mb",
        type=float,
        default=DEFAULT_BLOCK_SIZE / 2**20,
        help=f"text read per block, MiB (default {DEFAULT_BLOCK_SIZE / 2**20:g}); memory is a few times this",
    )
    p.add_argument(
        "--shard-size-mb",
        type=float,
        default=DEFAULT_SHARD_SIZE / 2**20,
        help="uncompressed inputs are cut into shards of about this size, MiB "
        f"(default {DEFAULT_SHARD_SIZE / 2**20:g}); each shard is encoded by one process into its own Parquet "
        "files (compressed inputs, and all inputs with --lenient, are one shard per file). The output depends "
        "on it, not on --jobs or the ranks",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="processes for the counting and encoding passes, by file and by byte range of uncompressed "
        "files; the output is the same for any count (default 1). Under torchrun/TorchX each rank is one "
        "process: leave it at 1",
    )
    p.add_argument(
        "--row-group-rows",
        type=int,
        default=DEFAULT_ROW_GROUP_ROWS,
        help=f"rows per Parquet row group (the reader's unit of decoding) (default {DEFAULT_ROW_GROUP_ROWS})",
    )
    p.add_argument(
        "--rows-per-file",
        type=int,
        default=DEFAULT_ROWS_PER_FILE,
        help=f"rows per Parquet file (default {DEFAULT_ROWS_PER_FILE})",
    )


def _options(args: argparse.Namespace) -> dict[str, Any]:
    if args.features_from is not None:
        given = [f for f, v in (("--hash-buckets", args.hash_buckets), ("--split", args.split)) if v]
        given += [f for f in ("--valid", "--test") if getattr(args, f[2:], None) is not None]
        if given:
            raise flags.UsageError(
                f"--features-from takes the ids from its transform and writes every row to --split-name; "
                f"drop {' '.join(given)}"
            )
    elif args.split_name != "test":
        raise flags.UsageError("--split-name applies with --features-from only")
    return dict(
        features_from=None if args.features_from is None else existing(args.features_from, "--features-from"),
        split_name=args.split_name,
        min_count=args.min_count,
        hash_buckets=buckets_dict(args.hash_buckets),
        seed=args.seed,
        lenient=args.lenient,
        overwrite=args.overwrite,
        progress=args.progress,
        block_size=int(args.block_size_mb * (1 << 20)),
        shard_size=int(args.shard_size_mb * (1 << 20)),
        rows_per_file=args.rows_per_file,
        row_group_rows=args.row_group_rows,
        jobs=args.jobs,
        split=args.split,
        **_ranks(),
    )


def _ranks() -> dict[str, int]:
    """``rank`` and ``world_size`` of the torchrun/TorchX job this process is one rank of (none outside one),
    read from the environment as torchrun and TorchX set it: a converting rank imports nothing of torch, which
    would cost it seconds."""
    from mlet_torchrec.ranks import in_distributed_job

    if not in_distributed_job():
        return {}
    return {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}


def _cmd_criteo(args: argparse.Namespace) -> int:
    from data_pipes.convert.criteo import convert_criteo

    print_once(
        convert_criteo(existing(args.input), args.output, valid=args.valid, test=args.test, **_options(args)).summary()
    )
    return 0


def _cmd_avazu(args: argparse.Namespace) -> int:
    from data_pipes.convert.avazu import convert_avazu

    print_once(convert_avazu(existing(args.input), args.output, **_options(args)).summary())
    return 0


def _cmd_movielens(args: argparse.Namespace) -> int:
    from data_pipes.convert.movielens import convert_movielens

    result = convert_movielens(
        existing(args.input),
        args.output,
        click_threshold=args.click_threshold,
        drop_columns=args.drop_columns,
        **_options(args),
    )
    print_once(result.summary())
    return 0


def add_dataset_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``criteo``, ``avazu`` and ``movielens`` subcommands, on any subparsers object."""
    from data_pipes.convert import avazu, criteo, movielens

    p = sub.add_parser(
        "criteo",
        help="Criteo Kaggle train.txt, 1TB day_N files, or train/valid/test files",
        parents=[flags.common_parent()],
        formatter_class=flags.EXAMPLE_FORMATTER,
        epilog=example(
            "mlet convert criteo --input train.txt --output data/criteo --min-count 10",
            "mlet convert criteo --input criteo_1tb/ --output data/criteo1tb --hash-buckets 40000000",
        ),
        description="Criteo TSV (label, I1..I13, C1..C26) -> Parquet. --input FILE: seeded "
        "random split (--split). --input DIR of day_N files: time split (all days "
        "but the last -> train, the last -> valid/test 50/50). --input FILE --valid "
        "FILE --test FILE: explicit splits. Vocabularies use the train split only.",
    )
    _common(
        p,
        criteo.DEFAULT_MIN_COUNT,
        criteo.DEFAULT_SPLIT,
        "a file (random split) or a directory of day_N files (time split); .gz/.bz2/.zst are read as such",
    )
    p.add_argument("--valid", type=Path, help="validation file (then --input is the train split)")
    p.add_argument("--test", type=Path, help="test file (then --input is the train split)")
    p.set_defaults(func=_cmd_criteo)

    p = sub.add_parser(
        "avazu",
        help="Avazu train CSV (with header)",
        parents=[flags.common_parent()],
        formatter_class=flags.EXAMPLE_FORMATTER,
        epilog=example(
            "mlet convert avazu --input train.gz --output data/avazu --hash-buckets device_ip=1000000 device_id=500000"
        ),
        description="Avazu CSV -> Parquet: id dropped, hour -> hour_of_day and weekday, seeded "
        "random split (90% train, 10% held out, split evenly into valid and test).",
    )
    _common(p, avazu.DEFAULT_MIN_COUNT, avazu.DEFAULT_SPLIT, "the Avazu train CSV with its header (may be .gz)")
    p.set_defaults(func=_cmd_avazu)

    p = sub.add_parser(
        "movielens",
        help="MovieLens atomic files (ml-100k.inter/.user/.item)",
        parents=[flags.common_parent()],
        formatter_class=flags.EXAMPLE_FORMATTER,
        epilog=example("mlet convert movielens --input ml-100k/ --output data/ml100k"),
        description="MovieLens -> Parquet: rating >= --click-threshold is a click; user and item "
        "side columns become categorical features (token_seq -> multi-hot bags).",
    )
    _common(
        p,
        movielens.DEFAULT_MIN_COUNT,
        movielens.DEFAULT_SPLIT,
        "a directory holding one *.inter file (and its .user/.item), or the .inter file",
    )
    p.add_argument("--click-threshold", type=float, default=4.0, help="rating >= this is a click (default 4)")
    p.add_argument(
        "--drop-columns",
        nargs="*",
        default=list(movielens.DEFAULT_DROP_COLUMNS),
        metavar="COLUMN",
        help="side-table columns not to use (default: movie_title)",
    )
    p.set_defaults(func=_cmd_movielens)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``convert`` (with ``criteo``, ``avazu``, ``movielens``) to the ``mlet`` command's subparsers."""
    p = subparsers.add_parser(
        "convert",
        help="raw Criteo/Avazu/MovieLens files -> Parquet data set",
        parents=[flags.common_parent()],
        formatter_class=flags.EXAMPLE_FORMATTER,
        epilog=example("mlet convert criteo --input train.txt --output data/criteo", "mlet convert criteo --help"),
        description="Convert raw CTR files to the Parquet data set layout of "
        "data_pipes/schema.py, streaming (memory does not grow with the input).",
    )
    add_dataset_parsers(p.add_subparsers(dest="dataset", required=True, metavar="{criteo,avazu,movielens}"))


def build_parser() -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = flags.Parser(
        prog="python -m mlet_torchrec.cli.convert",
        parents=[flags.common_parent()],
        description="Convert raw CTR files to a Parquet data set (= mlet convert).",
    )
    add_dataset_parsers(parser.add_subparsers(dest="dataset", required=True, metavar="{criteo,avazu,movielens}"))
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser(), argv, lambda args: f"convert {args.dataset}")
    except KeyboardInterrupt:
        print("convert: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
