"""``mlet evaluate --input RUN_OR_COLLAPSED_DIR [--split test] [--nproc-per-node N] [--auc histogram|exact]``.

Metrics of a training checkpoint or a collapsed model on one split, printed as JSON by rank 0.
"""

from __future__ import annotations

import argparse
from functools import partial

from mlet_torchrec.cli import flags
from mlet_torchrec.cli.entry import on_ranks, print_summary
from mlet_torchrec.cli.flags import existing


def _cmd_evaluate(args: argparse.Namespace) -> int:
    source = existing(args.input)
    from mlet_torchrec.serving.artifact import evaluate_path

    print_summary(on_ranks(args, partial(evaluate_path, source, args.split, args.auc)))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``evaluate`` to the ``mlet`` subcommands."""
    p = flags.subparser(
        sub,
        "evaluate",
        "metrics of a checkpoint or collapsed model on one split",
        "mlet evaluate --input runs/tiny/collapsed --split valid --nproc-per-node 2",
    )
    flags.add_input(p, "training checkpoint/run directory, or a collapse output")
    p.add_argument("--split", default="test")
    flags.add_nproc(p, 1, "local processes, each scoring its slice of the split (ignored under torchrun/TorchX)")
    p.add_argument(
        "--auc",
        default="histogram",
        choices=["histogram", "exact"],
        help="histogram: 2^16 logit bins, bounded memory, error bound reported (auc_error_bound); "
        "exact: every score streamed to rank 0 (memory grows with the split there)",
    )
    p.set_defaults(func=_cmd_evaluate)
