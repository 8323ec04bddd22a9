"""The ``mlet`` command: thin subcommands, each declared in its own module of this package.

    mlet train --config FILE_OR_NAME [key.sub=value ...] [--nproc-per-node N] [--seed S]
    mlet collapse --input RUN_DIR --output DIR [--nproc-per-node N] [--output-sharding same]
    mlet export --input COLLAPSED_DIR --output DIR [--int8] [--shards N] [--format safetensors npy] [--no-check]
    mlet serve --input EXPORT_DIR [--host 127.0.0.1] [--port 8080] [--precision int8|fp32]
    mlet evaluate --input RUN_OR_COLLAPSED_DIR [--split test] [--nproc-per-node N] [--auc histogram|exact]
    mlet predict --input RUN|COLLAPSED|EXPORT [--data DATASET] [--split S] --output FILE.parquet [--precision fp32]
    mlet synth --output DIR [--config FILE_OR_NAME] [key=value ...]
    mlet convert criteo|avazu|movielens --input ... --output DIR
    mlet demo [--output DIR]
    mlet sweep --config FILE_OR_NAME --grid "embedding.d=[4,8] embedding.k=[none,64] seed=[0,1,2]" --output FILE
    mlet report --input RESULTS --output DIR
    mlet advise --input RESULTS [--json]
    mlet compression hash|study --input ...

Each module (``cli/train.py``, ``cli/collapse.py``, ...) has a ``register(subparsers)`` declaring its
arguments and a ``_cmd_*`` calling one function of a lower layer; :data:`COMMANDS` lists them in help order.
Every subcommand takes ``--log-level``. A ``UserError`` (bad config, missing input, bad data...) prints
one line ``mlet CMD: error: MESSAGE`` and exits 2; anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import sys

from mlet_torchrec.cli import (
    advise,
    collapse,
    compression,
    convert,
    demo,
    evaluate,
    export,
    flags,
    plan,
    predict,
    report,
    results,
    serve,
    sweep,
    synth,
    train,
)
from mlet_torchrec.cli.entry import run

COMMANDS = (
    train,
    collapse,
    export,
    serve,
    evaluate,
    predict,
    synth,
    demo,
    sweep,
    report,
    convert,
    plan,
    results,
    advise,
    compression,
)
"""The subcommand modules, in the order ``mlet --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The ``mlet`` parser: the common flags, then every module of :data:`COMMANDS` registers its subcommand."""
    parser = flags.Parser(
        prog="mlet",
        description="MLET embeddings on sharded TorchRec",
        parents=[flags.common_parent()],
        formatter_class=flags.EXAMPLE_FORMATTER,
        epilog=flags.example(
            "mlet synth --output data/tiny rows=8000 num_sparse=4",
            "mlet train --config tiny --nproc-per-node 2",
            "mlet <command> --help",
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv, lambda args: f"mlet {args.command}")


if __name__ == "__main__":
    sys.exit(main())
