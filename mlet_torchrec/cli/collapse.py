"""``mlet collapse --input RUN_DIR --output DIR [--nproc-per-node N] [--output-sharding same]``: W = W1 @ W2.

Reads a training checkpoint, writes the plain d-dimensional model and checks that its predictions match the
factored model's on ``--check-split``; prints one line with the sizes and the check.
"""

from __future__ import annotations

import argparse
from functools import partial

from mlet_torchrec import options
from mlet_torchrec.cli import flags
from mlet_torchrec.cli.entry import on_ranks, print_once
from mlet_torchrec.cli.flags import existing
from mlet_torchrec.logs import human_bytes


def _cmd_collapse(args: argparse.Namespace) -> int:
    source = existing(args.input)  # before the imports: a typo fails in a second
    output = args.output
    from mlet_torchrec.serving.collapse import collapse

    split = None if args.check_split == "none" else args.check_split
    kwargs = dict(
        check_split=split,
        max_check_rows=args.max_check_rows,
        tolerance=args.tolerance,
        overwrite=args.overwrite,
        output_sharding=args.output_sharding,
        block_rows=args.block_rows,
        accumulate=args.accumulate,
    )
    report = on_ranks(args, partial(collapse, source, output, **kwargs))
    copied = f" and {report.copied_tables} first-order tables copied" if report.copied_tables else ""
    first = (
        f"collapsed {len(report.tables)} embedding tables (W = W1 @ W2){copied} into {report.output} "
        f"({human_bytes(report.serving_table_bytes)} of embedding tables at serving)"
    )
    check = (
        f"  check on {report.rows_checked:,} {split} rows: max |p_collapsed - p_factored| = {report.max_abs_diff:.2e} "
        f"(tolerance {report.tolerance:g}); AUC {report.collapsed_metrics['auc']:.4f} "
        f"LogLoss {report.collapsed_metrics['logloss']:.4f}"
        if split
        else "  prediction check skipped (--check-split none)"
    )
    print_once(f"{first}\n{check}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``collapse`` to the ``mlet`` subcommands."""
    p = flags.subparser(
        sub,
        "collapse",
        "W = W1 @ W2: a trained checkpoint -> plain d-dim model",
        "mlet collapse --input runs/tiny --output runs/tiny/collapsed --nproc-per-node 2",
    )
    flags.add_input(p, "training run directory or one of its checkpoints")
    flags.add_output(p, "directory of the collapsed model")
    flags.add_overwrite(p)
    flags.add_nproc(
        p, 1, "local processes, each collapsing its own W1 shards (1 under torchrun/TorchX, which start the processes)"
    )
    p.add_argument("--check-split", default="test", help="split to compare predictions on, or 'none'")
    p.add_argument(
        "--max-check-rows", type=flags.positive_int, default=None, help="compare at most this many rows (default all)"
    )
    p.add_argument(
        "--tolerance",
        type=flags.nonnegative_float,
        default=options.COLLAPSE_TOLERANCE,
        help=f"largest |p_collapsed - p_factored| accepted (default {options.COLLAPSE_TOLERANCE:g})",
    )
    p.add_argument(
        "--output-sharding",
        default="same",
        choices=options.OUTPUT_SHARDINGS,
        help="sharding of the output tables: 'same' mirrors the input, others ask TorchRec's planner",
    )
    p.add_argument(
        "--block-rows",
        type=flags.positive_int,
        default=options.BLOCK_ROWS,
        help=f"rows per block of the W1 @ W2 product (default {options.BLOCK_ROWS})",
    )
    p.add_argument(
        "--accumulate",
        default=options.ACCUMULATE[0],
        choices=options.ACCUMULATE,
        help="precision of the product (rounded once to float32)",
    )
    p.set_defaults(func=_cmd_collapse)
