"""The ``mlet`` command: thin subcommands, each parsing its arguments and calling one function.

    mlet train --config FILE [key.sub=value ...] [--nproc-per-node N]
    mlet collapse --checkpoint DIR --output DIR [--nproc-per-node N] [--output-sharding same]
    mlet export --collapsed DIR --output DIR [--int8] [--format safetensors|npy] [--no-check]
    mlet evaluate --checkpoint DIR [--split test]
    mlet synth --output DIR [key=value ...]
    mlet convert criteo|avazu|movielens --input ... --output DIR
    mlet demo
    mlet sweep --config FILE --grid "embedding.d=[4,8] embedding.k=[none,64] seed=[0,1,2]" --results FILE
    mlet report RESULTS --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from data_pipes.errors import DataError
from mlet_torchrec.training.checkpoint import CheckpointError
from mlet_torchrec.config import ConfigError, apply_overrides, load_config
from mlet_torchrec.logs import configure_logging

# Errors that are the user's input, printed as one line without a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError, FileExistsError, ValueError)


def _cmd_train(args: argparse.Namespace) -> int:
    from mlet_torchrec.training.launcher import in_distributed_job, train_local

    config = load_config(args.config, args.overrides)
    if args.nproc_per_node > 1 and not in_distributed_job():
        summary = train_local(config, args.nproc_per_node, max_restarts=args.max_restarts, verbose=args.verbose)
    else:
        from mlet_torchrec.training.train import train

        summary = train(config).summary()
    _print_summary(summary)
    return 0


def _print_summary(summary: Dict) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2, default=str))


def _cmd_collapse(args: argparse.Namespace) -> int:
    import os

    from mlet_torchrec.serving.collapse import collapse, collapse_local
    from mlet_torchrec.training.launcher import in_distributed_job

    split = None if args.check_split == "none" else args.check_split
    kwargs = dict(check_split=split, max_check_rows=args.max_check_rows, tolerance=args.tolerance,
                  overwrite=args.overwrite, output_sharding=args.output_sharding, block_rows=args.block_rows,
                  accumulate=args.accumulate)
    if args.nproc_per_node > 1 and not in_distributed_job():
        report = collapse_local(args.checkpoint, args.output, args.nproc_per_node, verbose=args.verbose, **kwargs)
    else:
        report = collapse(args.checkpoint, args.output, **kwargs)
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(
        f"collapsed {len(report.tables)} tables into {report.output} "
        f"({report.serving_table_bytes / 2**20:.1f} MiB at serving); "
        + (
            f"max |p_collapsed - p_factored| = {report.max_abs_diff:.2e} on {report.rows_checked} {split} rows "
            f"(tolerance {report.tolerance:g}); collapsed AUC {report.collapsed_metrics['auc']:.4f} "
            f"LogLoss {report.collapsed_metrics['logloss']:.4f}"
            if split
            else "prediction check skipped"
        )
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from mlet_torchrec.serving.export import export, format_report

    report = export(args.collapsed, args.output, int8=args.int8, formats=args.format, check=not args.no_check,
                    split=args.split, max_check_rows=args.max_check_rows, auc_tolerance=args.auc_tolerance,
                    overwrite=args.overwrite)
    print(format_report(report))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mlet_torchrec.serving.artifact import evaluate_path

    metrics = evaluate_path(args.checkpoint, args.split)
    print(json.dumps(metrics, indent=2))
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from data_pipes.synth import SynthConfig, generate

    raw = apply_overrides({}, args.overrides)
    try:
        cfg = SynthConfig.model_validate(raw)
    except Exception as e:  # pydantic's message names the key and the allowed values
        raise ConfigError(f"invalid synth settings: {e}") from None
    meta = generate(cfg, args.output, overwrite=args.overwrite)
    print(f"wrote {sum(meta.rows.values())} rows to {args.output} ({meta.rows})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mlet_torchrec.experiments.demo import run_demo

    run_demo(Path(args.workdir), Path(args.data), nproc_per_node=args.nproc_per_node, overrides=args.overrides)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from mlet_torchrec.experiments.sweep import SweepSettings, parse_grid, run_sweep

    if args.tune and args.tune_baseline:
        raise SystemExit("mlet sweep: give --tune (every method) or --tune-baseline (the baseline only), not both")
    counts = run_sweep(SweepSettings(
        config=None if args.config is None else str(args.config), grid=parse_grid(args.grid),
        tune=parse_grid(args.tune or args.tune_baseline or ""), tune_mlet=bool(args.tune),
        results=str(args.results), base_overrides=list(args.overrides),
        nproc=args.nproc, parallel=args.parallel, runs_dir=args.runs_dir, freq_features=args.freq_features,
        keep_runs=args.keep_runs, dataset=args.dataset, dry_run=args.dry_run, in_process=args.in_process,
        compression=not args.no_compression,
    ))
    return 1 if counts["failed"] else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mlet_torchrec.experiments.report import render_report

    out = render_report(args.results, args.out, title=args.title, budget_mb=args.budget_mb)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlet", description="MLET embeddings on sharded TorchRec")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (one process, or N with --nproc-per-node)")
    p.add_argument("--config", type=Path, help="YAML config (defaults when omitted)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--nproc-per-node", type=int, default=1, help="local processes (ignored under torchrun/TorchX)")
    p.add_argument("--max-restarts", type=int, default=0, help="restarts of the local job on failure")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("collapse", help="W = W1 @ W2: a trained checkpoint -> plain d-dim model")
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint or run directory")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--check-split", default="test", help="split to compare predictions on, or 'none'")
    p.add_argument("--max-check-rows", type=int, default=None)
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="local processes, each collapsing its own W1 shards (ignored under torchrun/TorchX)")
    p.add_argument("--output-sharding", default="same",
                   choices=["same", "auto", "table_wise", "row_wise", "column_wise", "table_row_wise"],
                   help="sharding of the output tables: 'same' mirrors the input, others ask TorchRec's planner")
    p.add_argument("--block-rows", type=int, default=16384, help="rows per block of the W1 @ W2 product")
    p.add_argument("--accumulate", default="float32", choices=["float32", "float64"],
                   help="precision of the product (rounded once to float32)")
    p.set_defaults(func=_cmd_collapse)

    p = sub.add_parser("export", help="a collapsed model -> TorchRec INT8 inference model and/or per-table files")
    p.add_argument("--collapsed", type=Path, required=True, help="output directory of `mlet collapse`")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--int8", action="store_true", help="TorchRec's quantized (INT8) inference model, TorchScript")
    p.add_argument("--format", action="append", default=[], choices=["safetensors", "npy"],
                   help="also write every table as plain float32 arrays (repeatable)")
    p.add_argument("--no-check", action="store_true", help="skip the INT8-vs-FP32 AUC check (needs the data set)")
    p.add_argument("--split", default="test", help="split of the INT8 quality check")
    p.add_argument("--max-check-rows", type=int, default=None)
    p.add_argument("--auc-tolerance", type=float, default=1e-3)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("evaluate", help="metrics of a checkpoint or collapsed model on one split")
    p.add_argument("--checkpoint", type=Path, required=True, help="training checkpoint/run dir, or collapse output")
    p.add_argument("--split", default="test")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("synth", help="generate planted synthetic Criteo-shaped data")
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="generator settings (see data_pipes/synth.py)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("demo", help="synthetic data -> baseline and MLET on 2 ranks -> collapse -> table")
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for both runs")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("sweep", help="run a grid of trainings into a resumable results store (JSON lines)")
    p.add_argument("--config", type=Path, help="base YAML config")
    p.add_argument("--grid", required=True,
                   help='axes "key=[v1,v2] ..." (YAML values, none=null; seed/d/k/lr are short for train.seed, '
                        'embedding.d, embedding.k, sparse_optimizer.lr)')
    p.add_argument("--tune-baseline", default="", metavar="AXES",
                   help='extra axes run for the k=null cells only, e.g. "sparse_optimizer.lr=[0.2,0.8]"; the '
                        "report picks the best on validation AUC")
    p.add_argument("--tune", default="", metavar="AXES",
                   help='extra axes run for every cell, baseline and MLET alike, e.g. "sparse_optimizer.lr=[0.8,3.2]"; '
                        "the report picks each method's best on validation AUC (replaces --tune-baseline)")
    p.add_argument("--results", type=Path, required=True, help="results store (JSON lines; appended, resumable)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for every cell")
    p.add_argument("--nproc", type=int, default=2, help="training processes per cell (default 2)")
    p.add_argument("--parallel", type=int, default=1, help="cells at once (default 1)")
    p.add_argument("--in-process", action="store_true",
                   help="with --nproc 1: train in the sweep process instead of a child per cell (faster start)")
    p.add_argument("--runs-dir", default=None, help="where cells' run directories go (default runs/sweep/NAME)")
    p.add_argument("--freq-features", nargs="+", default=None,
                   help="features whose train counts rank test rows for the frequency splits (default: all)")
    p.add_argument("--keep-runs", action="store_true", help="keep each cell's run directory (checkpoints)")
    p.add_argument("--dataset", default=None, help="data set name recorded in the results (default: data dir name)")
    p.add_argument("--dry-run", action="store_true", help="list the cells still to run and stop")
    p.add_argument("--no-compression", action="store_true",
                   help="skip the INT8/SVD measurements of mlet_torchrec.serving.compression (when present)")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("report", help="Markdown tables and PNG plots from a sweep's results store")
    p.add_argument("results", type=Path, nargs="+", help="results store(s) (JSON lines)")
    p.add_argument("--out", type=Path, required=True, help="output directory (report.md, plots/)")
    p.add_argument("--title", default=None)
    p.add_argument("--budget-mb", type=float, nargs="*", default=None,
                   help="serving memory budgets (MiB of FP32 tables) to recommend d and k for")
    p.set_defaults(func=_cmd_report)

    try:
        from mlet_torchrec.cli.convert import register
    except ImportError:  # converters are optional at import time of the CLI
        register = None
    if register is not None:
        register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    if args.verbose:
        return func(args)
    try:
        return func(args)
    except USER_ERRORS as e:
        print(f"mlet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
