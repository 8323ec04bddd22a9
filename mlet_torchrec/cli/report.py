"""``mlet report --input RESULTS [...] --output DIR [--budget-mb MB ...]``: Markdown tables and PNG plots of a
sweep's results store(s)."""

from __future__ import annotations

import argparse

from mlet_torchrec.cli import flags
from mlet_torchrec.cli.flags import existing


def _cmd_report(args: argparse.Namespace) -> int:
    from mlet_torchrec.experiments.report import render_report

    out = render_report([existing(p) for p in args.input], args.output, title=args.title, budget_mb=args.budget_mb)
    print(f"wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``report`` to the ``mlet`` subcommands."""
    p = flags.subparser(
        sub,
        "report",
        "Markdown tables and PNG plots from a sweep's results store",
        "mlet report --input runs/sweep.jsonl --output runs/report --budget-mb 1 4",
    )
    flags.add_input(p, "results store(s) (JSON lines)", nargs="+")
    flags.add_output(p, "output directory (report.md, plots/)")
    p.add_argument("--title", default=None)
    p.add_argument(
        "--budget-mb",
        type=float,
        nargs="*",
        default=None,
        help="serving memory budgets (MiB of FP32 tables) to recommend d and k for",
    )
    p.set_defaults(func=_cmd_report)
