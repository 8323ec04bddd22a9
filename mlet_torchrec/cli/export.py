"""``mlet export --input COLLAPSED_DIR --output DIR [--int8] [--shards N] [--format safetensors npy] [--no-check]``.

A collapsed model -> TorchRec's inference package (TorchScript modules with TorchRec's dict signature: FP32 always,
INT8 with ``--int8`` checked against FP32 AUC, sharded INT8 with ``--shards``) and every table as plain float32
arrays with ``--format``.
"""

from __future__ import annotations

import argparse
from functools import partial

from mlet_torchrec import options
from mlet_torchrec.cli import flags
from mlet_torchrec.cli.entry import on_ranks, print_once
from mlet_torchrec.cli.flags import existing


def _cmd_export(args: argparse.Namespace) -> int:
    source = existing(args.input)
    from mlet_torchrec.serving.export import export, format_report

    call = partial(
        export,
        source,
        args.output,
        int8=args.int8,
        formats=args.format,
        check=not args.no_check,
        split=args.split,
        max_check_rows=args.max_check_rows,
        auc_tolerance=args.auc_tolerance,
        overwrite=args.overwrite,
        shards=args.shards,
    )
    report = on_ranks(args, call)
    print_once(format_report(report))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``export`` to the ``mlet`` subcommands."""
    p = flags.subparser(
        sub,
        "export",
        "a collapsed model -> TorchRec inference modules (FP32, --int8, --shards N) and per-table files",
        "mlet export --input runs/tiny/collapsed --output runs/tiny/serving --int8 --format npy",
    )
    flags.add_input(p, "output directory of `mlet collapse`")
    flags.add_output(p, "directory of the exported model")
    flags.add_overwrite(p)
    p.add_argument("--int8", action="store_true", help="TorchRec's quantized (INT8) inference model, TorchScript")
    p.add_argument(
        "--format",
        action="extend",
        nargs="+",
        default=[],
        choices=options.EXPORT_FORMATS,
        help="also write every table as plain float32 arrays: one or both formats (--format safetensors npy)",
    )
    p.add_argument(
        "--shards",
        type=int,
        default=0,
        metavar="N",
        help="also write the INT8 model sharded table-wise over N devices (TorchRec's shard_quant_model)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the INT8-vs-FP32 AUC check (needs the data set)")
    p.add_argument("--split", default="test", help="split of the INT8 quality check")
    p.add_argument(
        "--max-check-rows", type=flags.positive_int, default=None, help="score at most this many rows (default all)"
    )
    p.add_argument(
        "--auc-tolerance",
        type=flags.nonnegative_float,
        default=options.AUC_TOLERANCE,
        help=f"largest |AUC INT8 - AUC FP32| accepted (default {options.AUC_TOLERANCE:g})",
    )
    flags.add_nproc(p, 1, "local processes of the INT8 check, each scoring its slice of the split")
    p.set_defaults(func=_cmd_export)
