"""``mlet train --config FILE_OR_NAME [key.sub=value ...] [--nproc-per-node N] [--seed S] [--plan PLAN.json]``.

One process, or N local ones with ``--nproc-per-node``; under torchrun/TorchX every replica runs this same
command and trains as one rank. Rank 0 prints a short summary (``--json``: all of it, as in RUN_DIR/metrics.json).
"""

from __future__ import annotations

import argparse
from functools import partial

from mlet_torchrec.cli import flags
from mlet_torchrec.cli.entry import on_ranks, print_summary
from mlet_torchrec.cli.summaries import train_lines
from mlet_torchrec.config import load_config


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--input``/``--output``/``--seed``/``--plan`` are short for ``data.path``/``run.dir``/``train.seed``/
    ``run.plan``; the overrides given after them win."""
    extra = [
        f"{key}={value}"
        for key, value in (
            ("data.path", args.input),
            ("run.dir", args.output),
            ("train.seed", args.seed),
            ("run.plan", args.plan),
        )
        if value is not None
    ]
    return extra + list(args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from mlet_torchrec.training.launcher import train_summary

    config = load_config(args.config, _overrides(args))
    summary = on_ranks(args, partial(train_summary, config.model_dump(mode="json")), fresh_dir=config.run.dir)
    print_summary(summary, train_lines(summary), args.json)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``train`` to the ``mlet`` subcommands."""
    p = flags.subparser(
        sub,
        "train",
        "train a model (one process, or N with --nproc-per-node)",
        "mlet train --config tiny --nproc-per-node 2 embedding.k=32 run.dir=runs/k32",
    )
    flags.add_config(p)
    flags.add_input(p, "data set directory (short for data.path=...)", required=False)
    flags.add_output(p, "run directory: checkpoints, config.yaml, metrics (short for run.dir=...)", required=False)
    flags.add_seed(p, "seed of initialisation and data order (short for train.seed=...)")
    flags.add_nproc(p, 1, "local processes (1 under torchrun/TorchX, which start the processes)")
    flags.add_json(p, "print the whole summary as JSON (it is always in RUN_DIR/metrics.json)")
    p.add_argument("--max-restarts", type=flags.nonnegative_int, default=0, help="restarts of the local job on failure")
    p.add_argument(
        "--plan",
        default=None,
        metavar="PLAN.json",
        help="shard with this plan of `mlet plan` instead of planning (short for run.plan=...)",
    )
    p.set_defaults(func=_cmd_train)
