"""``mlet demo [--output DIR]``: synthetic data -> baseline and MLET on 2 ranks -> collapse -> table."""

from __future__ import annotations

import argparse
from pathlib import Path

from mlet_torchrec.cli import flags


def _cmd_demo(args: argparse.Namespace) -> int:
    from mlet_torchrec.experiments.demo import run_demo

    overrides = list(args.overrides) + ([f"train.seed={args.seed}"] if args.seed is not None else [])
    run_demo(Path(args.output), Path(args.data), nproc_per_node=args.nproc_per_node, overrides=overrides)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``demo`` to the ``mlet`` subcommands."""
    p = flags.subparser(
        sub,
        "demo",
        "synthetic data -> baseline and MLET on 2 ranks -> collapse -> table",
        "mlet demo --output runs/demo --nproc-per-node 2",
    )
    flags.add_output(p, "work directory of the demo's runs", required=False, default=Path("runs/demo"))
    p.add_argument("--data", default="data/demo", help="where the demo's synthetic data set goes (reused)")
    flags.add_seed(p, "training seed of every run (short for train.seed=...)")
    flags.add_nproc(p, 2, "local processes per run")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for both runs")
    p.set_defaults(func=_cmd_demo)
