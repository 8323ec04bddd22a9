"""The ``mlet`` command: thin subcommands, each parsing its arguments and calling one function.

    mlet train --config FILE [key.sub=value ...] [--nproc-per-node N]
    mlet collapse --checkpoint DIR --output DIR
    mlet evaluate --checkpoint DIR [--split test]
    mlet synth --output DIR [key=value ...]
    mlet convert criteo|avazu|movielens --input ... --output DIR
    mlet demo
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from data_pipes.errors import DataError
from mlet_torchrec.config import ConfigError, apply_overrides, load_config
from mlet_torchrec.logs import configure_logging

# Errors that are the user's input, printed as one line without a traceback.
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, FileExistsError, ValueError)


def _cmd_train(args: argparse.Namespace) -> int:
    from mlet_torchrec.launcher import in_distributed_job, train_local

    config = load_config(args.config, args.overrides)
    if args.nproc_per_node > 1 and not in_distributed_job():
        summary = train_local(config, args.nproc_per_node, max_restarts=args.max_restarts, verbose=args.verbose)
    else:
        from mlet_torchrec.train import train

        summary = train(config).summary()
    _print_summary(summary)
    return 0


def _print_summary(summary: Dict) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2, default=str))


def _cmd_collapse(args: argparse.Namespace) -> int:
    from mlet_torchrec.collapse import collapse

    split = None if args.check_split == "none" else args.check_split
    report = collapse(args.checkpoint, args.output, split, args.max_check_rows, args.tolerance, args.overwrite)
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


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from mlet_torchrec.evaluate import evaluate_path

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
    from mlet_torchrec.demo import run_demo

    run_demo(Path(args.workdir), Path(args.data), nproc_per_node=args.nproc_per_node, overrides=args.overrides)
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
    p.set_defaults(func=_cmd_collapse)

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

    try:
        from data_pipes.convert.cli import register
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
