"""``mlet sweep --config FILE_OR_NAME --grid "d=[4,8] k=[none,64] seed=[0,1,2]" --output STORE.jsonl``.

Runs a grid of trainings into a resumable results store (JSON lines); see
:mod:`mlet_torchrec.experiments.sweep`. Exits 1 when a cell failed.
"""

from __future__ import annotations

import argparse

from mlet_torchrec.cli import flags
from mlet_torchrec.config import read_config_text


def _cmd_sweep(args: argparse.Namespace) -> int:
    from mlet_torchrec.experiments.grid import parse_grid
    from mlet_torchrec.experiments.sweep import SweepSettings, run_sweep

    if args.tune and args.tune_baseline:
        raise flags.UsageError("give --tune (every method) or --tune-baseline (the baseline only), not both")
    if args.in_process and (args.nproc_per_node != 1 or args.parallel != 1):
        raise flags.UsageError("--in-process needs --nproc-per-node 1 and --parallel 1")
    if args.config is not None:
        read_config_text(args.config)  # a missing config fails here, in one line, before any cell starts
    counts = run_sweep(
        SweepSettings(
            config=None if args.config is None else str(args.config),
            grid=parse_grid(args.grid),
            tune=parse_grid(args.tune or args.tune_baseline or ""),
            tune_mlet=bool(args.tune),
            results=str(args.output),
            base_overrides=([f"data.path={args.input}"] if args.input is not None else []) + list(args.overrides),
            nproc=args.nproc_per_node,
            parallel=args.parallel,
            runs_dir=args.runs_dir,
            freq_features=args.freq_features,
            keep_runs=args.keep_runs,
            dataset=args.dataset,
            dry_run=args.dry_run,
            in_process=args.in_process,
            compression=not args.no_compression,
            tune_seeds=args.tune_seeds,
            extend=args.extend_grid,
        )
    )
    return 1 if counts["failed"] else 0


def _add_tuning(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tune-baseline",
        default="",
        metavar="AXES",
        help='extra axes run for the k=null cells only, e.g. "sparse_optimizer.lr=[0.2,0.8]"; the '
        "report picks the best on validation AUC",
    )
    p.add_argument(
        "--tune",
        default="",
        metavar="AXES",
        help='extra axes run for every cell, baseline and MLET alike, e.g. "sparse_optimizer.lr=[0.8,3.2]"; '
        "the report picks each method's best on validation AUC (replaces --tune-baseline)",
    )
    p.add_argument(
        "--tune-seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="SEED",
        help="run the tuning axes on these seeds only; every other seed runs once, at the values its cell's "
        "tuning seeds chose on validation AUC (a second pass, planned from the store)",
    )
    p.add_argument(
        "--extend-grid",
        type=flags.nonnegative_int,
        default=0,
        metavar="STEPS",
        help="while a cell's best value of a numeric tuning axis is the lowest (highest) tried, run one more "
        "value past it (the grid's own end ratio), at most STEPS past each end (default 0: the grid as given)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sweep`` to the ``mlet`` subcommands."""
    p = flags.subparser(
        sub,
        "sweep",
        "run a grid of trainings into a resumable results store (JSON lines)",
        'mlet sweep --config tiny --grid "d=[4] k=[none,16] seed=[0,1]" --output runs/sweep.jsonl --nproc-per-node 1',
    )
    flags.add_config(p, "base YAML config file, or the name of a packaged one")
    p.add_argument(
        "--grid",
        required=True,
        help='axes "key=[v1,v2] ..." (YAML values, none=null; seed/d/k/lr/dense_lr are short for train.seed, '
        "embedding.d, embedding.k, sparse_optimizer.lr, dense_optimizer.lr; kd=[none,1,4] sets k to that "
        "multiple of d)",
    )
    _add_tuning(p)
    flags.add_input(p, "data set directory of every cell (short for data.path=...)", required=False)
    flags.add_output(p, "results store (JSON lines; appended, resumable)")
    flags.add_nproc(p, 1, "training processes per cell")
    p.add_argument("--parallel", type=flags.positive_int, default=1, help="cells at once (default 1)")
    p.add_argument(
        "--in-process",
        action="store_true",
        help="with --nproc-per-node 1: train in the sweep process instead of a child per cell",
    )
    p.add_argument("--runs-dir", default=None, help="where cells' run directories go (default runs/sweep/NAME)")
    p.add_argument(
        "--freq-features",
        nargs="+",
        default=None,
        help="features whose train counts rank test rows for the frequency splits (default: all)",
    )
    p.add_argument("--keep-runs", action="store_true", help="keep each cell's run directory (checkpoints)")
    p.add_argument("--dataset", default=None, help="data set name recorded in the results (default: data dir name)")
    p.add_argument("--dry-run", action="store_true", help="list the cells still to run and stop")
    p.add_argument(
        "--no-compression",
        action="store_true",
        help="skip the INT8/SVD measurements (mlet_torchrec.experiments.compression)",
    )
    p.set_defaults(func=_cmd_sweep)
