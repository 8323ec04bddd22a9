"""``mlet evaluate --input RUN|COLLAPSED|EXPORT [--data DATASET] [--split test] [--nproc-per-node N] [--auc ...]``.

Metrics of a training checkpoint, a collapsed model or an export (``--precision int8|fp32``) on one split of its
own data set or of ``--data`` (same features): rank 0 prints what it scored and the headline metrics
(``--json``: every metric).
"""

from __future__ import annotations

import argparse
from functools import partial

from mlet_torchrec import options
from mlet_torchrec.cli import flags
from mlet_torchrec.cli.entry import on_ranks, print_summary
from mlet_torchrec.cli.flags import existing
from mlet_torchrec.cli.summaries import evaluate_lines


def _cmd_evaluate(args: argparse.Namespace) -> int:
    source = existing(args.input)
    data = None if args.data is None else existing(args.data, "--data")
    from mlet_torchrec.serving.scoring import evaluate_path

    call = partial(evaluate_path, source, args.split, args.auc, data=data, precision=args.precision)
    metrics = on_ranks(args, call)
    print_summary(metrics, evaluate_lines(metrics), args.json)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``evaluate`` to the ``mlet`` subcommands."""
    p = flags.subparser(
        sub,
        "evaluate",
        "metrics of a checkpoint or collapsed model on one split",
        "mlet evaluate --input runs/tiny/collapsed --split valid --nproc-per-node 2",
    )
    flags.add_input(p, "training checkpoint/run directory, a collapse output or an export dir")
    flags.add_data(p, "data set to evaluate on; same features (convert with --features-from)")
    flags.add_precision(p)
    flags.add_json(p)
    flags.add_nproc(
        p,
        1,
        "local processes, each scoring its slice of the split (1 under torchrun/TorchX, which start the processes)",
    )
    p.add_argument(
        "--auc",
        default=options.AUC_MODES[0],
        choices=options.AUC_MODES,
        help="histogram: 2^16 logit bins, bounded memory, error bound reported (auc_error_bound); "
        "exact: every score streamed to rank 0 (memory grows with the split there)",
    )
    p.set_defaults(func=_cmd_evaluate)
