"""The ``mlet`` command: thin subcommands, each parsing its arguments and calling one function.

    mlet train --config FILE_OR_NAME [key.sub=value ...] [--nproc-per-node N] [--seed S]
    mlet collapse --input RUN_DIR --output DIR [--nproc-per-node N] [--output-sharding same]
    mlet export --input COLLAPSED_DIR --output DIR [--int8] [--format safetensors|npy] [--no-check] [--nproc-per-node N]
    mlet evaluate --input RUN_OR_COLLAPSED_DIR [--split test] [--nproc-per-node N] [--auc histogram|exact]
    mlet synth --output DIR [--config FILE_OR_NAME] [key=value ...]
    mlet convert criteo|avazu|movielens --input ... --output DIR
    mlet demo [--output DIR]
    mlet sweep --config FILE_OR_NAME --grid "embedding.d=[4,8] embedding.k=[none,64] seed=[0,1,2]" --output FILE
    mlet report --input RESULTS --output DIR
    mlet advise --input RESULTS [--json]

Every subcommand takes ``--log-level``. A ``UserError`` (bad config, missing input, bad data...) prints
one line ``mlet CMD: error: MESSAGE`` and exits 2; anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from mlet_torchrec.cli import flags
from mlet_torchrec.cli.entry import run
from mlet_torchrec.cli.flags import example, existing, require
from mlet_torchrec.config import ConfigError, apply_overrides, load_config, read_config_mapping, read_config_text


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """``--input``/``--output``/``--seed`` of ``train`` are short for ``data.path``/``run.dir``/``train.seed``."""
    extra = [
        f"{key}={value}"
        for key, value in (
            ("data.path", args.input),
            ("run.dir", args.output),
            ("train.seed", args.seed),
            ("run.plan", getattr(args, "plan", None)),
        )
        if value is not None
    ]
    return extra + list(args.overrides)


def _cmd_train(args: argparse.Namespace) -> int:
    from mlet_torchrec.training.launcher import in_distributed_job, train_local

    config = load_config(args.config, _train_overrides(args))
    if args.nproc_per_node > 1 and not in_distributed_job():
        summary = train_local(config, args.nproc_per_node, max_restarts=args.max_restarts, verbose=_verbose(args))
    else:
        from mlet_torchrec.training.train import train

        summary = train(config).summary()
    _print_summary(summary)
    return 0


def _verbose(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "log_level", "INFO") == "DEBUG")


def _print_summary(summary: dict[str, Any]) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2, default=str))


def _cmd_collapse(args: argparse.Namespace) -> int:
    source = existing(require(args, "input", "--input"))  # before the imports: a typo fails in a second
    output = require(args, "output", "--output")
    from mlet_torchrec.serving.collapse import collapse, collapse_local
    from mlet_torchrec.training.launcher import in_distributed_job

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
    if args.nproc_per_node > 1 and not in_distributed_job():
        report = collapse_local(source, output, args.nproc_per_node, verbose=_verbose(args), **kwargs)
    else:
        report = collapse(source, output, **kwargs)
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
    if not args.int8 and not args.format:
        raise flags.UsageError("nothing to export: ask for --int8 and/or --format npy|safetensors")
    source = existing(require(args, "input", "--input"))
    from mlet_torchrec.serving.export import export, format_report

    report = export(
        source,
        args.output,
        int8=args.int8,
        formats=args.format,
        check=not args.no_check,
        split=args.split,
        max_check_rows=args.max_check_rows,
        auc_tolerance=args.auc_tolerance,
        overwrite=args.overwrite,
        nproc_per_node=args.nproc_per_node,
    )
    print(format_report(report))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    source = existing(require(args, "input", "--input"))
    from mlet_torchrec.serving.artifact import evaluate_local, evaluate_path
    from mlet_torchrec.training.launcher import in_distributed_job

    if args.nproc_per_node > 1 and not in_distributed_job():
        metrics = evaluate_local(source, args.nproc_per_node, args.split, args.auc, verbose=_verbose(args))
    else:
        metrics = evaluate_path(source, args.split, args.auc)
    _print_summary(metrics)
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from data_pipes.synth import SynthConfig, generate

    raw: dict[str, Any] = {} if args.config is None else read_config_mapping(args.config)[0]
    raw = apply_overrides(raw, list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else []))
    try:
        cfg = SynthConfig.model_validate(raw)
    except ValidationError as e:  # pydantic's message names the key and the allowed values
        raise ConfigError(f"invalid synth settings: {' '.join(str(e).split())}") from None
    meta = generate(cfg, args.output, overwrite=args.overwrite)
    print(f"wrote {sum(meta.rows.values())} rows to {args.output} ({meta.rows})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from mlet_torchrec.experiments.demo import run_demo

    overrides = list(args.overrides) + ([f"train.seed={args.seed}"] if args.seed is not None else [])
    run_demo(Path(args.output), Path(args.data), nproc_per_node=args.nproc_per_node, overrides=overrides)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from mlet_torchrec.experiments.sweep import SweepSettings, parse_grid, run_sweep

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
            results=str(require(args, "output", "--output")),
            base_overrides=list(args.overrides),
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
        )
    )
    return 1 if counts["failed"] else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from mlet_torchrec.experiments.report import render_report

    inputs = list(args.input or [])
    if args.results:
        print(
            f"mlet report: warning: results as positional arguments are deprecated and go in the next "
            f"release; use --input {' '.join(map(str, args.results))}",
            file=sys.stderr,
        )
        inputs += args.results
    if not inputs:
        raise flags.UsageError("the following arguments are required: --input")
    out = render_report(
        [existing(p) for p in inputs], require(args, "output", "--output"), title=args.title, budget_mb=args.budget_mb
    )
    print(f"wrote {out}")
    return 0


def _subparser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str, *examples: str
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=example(*examples),
        formatter_class=flags.EXAMPLE_FORMATTER,
        parents=[flags.common_parent()],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlet",
        description="MLET embeddings on sharded TorchRec",
        parents=[flags.common_parent()],
        formatter_class=flags.EXAMPLE_FORMATTER,
        epilog=example(
            "mlet synth --output data/tiny rows=8000 num_sparse=4",
            "mlet train --config tiny --nproc-per-node 2",
            "mlet <command> --help",
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _subparser(
        sub,
        "train",
        "train a model (one process, or N with --nproc-per-node)",
        "mlet train --config tiny --nproc-per-node 2 embedding.k=32 run.dir=runs/k32",
    )
    flags.add_config(p)
    flags.add_input(p, "data set directory (short for data.path=...)", required=False)
    flags.add_output(p, "run directory: checkpoints, config.yaml, metrics (short for run.dir=...)", required=False)
    flags.add_seed(p, "seed of initialisation and data order (short for train.seed=...)")
    flags.add_nproc(p, 1, "local processes (ignored under torchrun/TorchX)")
    p.add_argument("--max-restarts", type=int, default=0, help="restarts of the local job on failure")
    p.add_argument(
        "--plan",
        default=None,
        metavar="PLAN.json",
        help="shard with this plan of `mlet plan` instead of planning (short for run.plan=...)",
    )
    p.set_defaults(func=_cmd_train)

    p = _subparser(
        sub,
        "collapse",
        "W = W1 @ W2: a trained checkpoint -> plain d-dim model",
        "mlet collapse --input runs/tiny --output runs/tiny/collapsed --nproc-per-node 2",
    )
    flags.add_input(p, "training run directory or one of its checkpoints", old=["--checkpoint"])
    flags.add_output(p, "directory of the collapsed model")
    flags.add_overwrite(p)
    flags.add_nproc(p, 1, "local processes, each collapsing its own W1 shards (ignored under torchrun/TorchX)")
    p.add_argument("--check-split", default="test", help="split to compare predictions on, or 'none'")
    p.add_argument("--max-check-rows", type=int, default=None)
    p.add_argument("--tolerance", type=float, default=1e-5)
    p.add_argument(
        "--output-sharding",
        default="same",
        choices=["same", "auto", "table_wise", "row_wise", "column_wise", "table_row_wise"],
        help="sharding of the output tables: 'same' mirrors the input, others ask TorchRec's planner",
    )
    p.add_argument("--block-rows", type=int, default=16384, help="rows per block of the W1 @ W2 product")
    p.add_argument(
        "--accumulate",
        default="float32",
        choices=["float32", "float64"],
        help="precision of the product (rounded once to float32)",
    )
    p.set_defaults(func=_cmd_collapse)

    p = _subparser(
        sub,
        "export",
        "a collapsed model -> TorchRec INT8 inference model and/or per-table files",
        "mlet export --input runs/tiny/collapsed --output runs/tiny/serving --int8 --format npy",
    )
    flags.add_input(p, "output directory of `mlet collapse`", old=["--collapsed"])
    flags.add_output(p, "directory of the exported model")
    flags.add_overwrite(p)
    p.add_argument("--int8", action="store_true", help="TorchRec's quantized (INT8) inference model, TorchScript")
    p.add_argument(
        "--format",
        action="append",
        default=[],
        choices=["safetensors", "npy"],
        help="also write every table as plain float32 arrays (repeatable)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the INT8-vs-FP32 AUC check (needs the data set)")
    p.add_argument("--split", default="test", help="split of the INT8 quality check")
    p.add_argument("--max-check-rows", type=int, default=None)
    p.add_argument("--auc-tolerance", type=float, default=1e-3)
    flags.add_nproc(p, 1, "local processes of the INT8 check, each scoring its slice of the split")
    p.set_defaults(func=_cmd_export)

    p = _subparser(
        sub,
        "evaluate",
        "metrics of a checkpoint or collapsed model on one split",
        "mlet evaluate --input runs/tiny/collapsed --split valid --nproc-per-node 2",
    )
    flags.add_input(p, "training checkpoint/run directory, or a collapse output", old=["--checkpoint"])
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

    p = _subparser(
        sub,
        "synth",
        "generate planted synthetic Criteo-shaped data",
        "mlet synth --output data/tiny rows=8000 num_sparse=4 max_cardinality=200 row_group_size=512",
        "mlet synth --output data/demo --config synth/demo",
    )
    flags.add_output(p, "data set directory to create")
    flags.add_overwrite(p)
    flags.add_seed(p, "seed of the generator (short for seed=...)")
    p.add_argument(
        "--config", default=None, metavar="FILE_OR_NAME", help="YAML generator settings, or a packaged one (synth/demo)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="generator settings (see data_pipes/synth.py)")
    p.set_defaults(func=_cmd_synth)

    p = _subparser(
        sub,
        "demo",
        "synthetic data -> baseline and MLET on 2 ranks -> collapse -> table",
        "mlet demo --output runs/demo --nproc-per-node 2",
    )
    flags.add_output(
        p, "work directory of the demo's runs", old=["--workdir"], required=False, default=Path("runs/demo")
    )
    p.add_argument("--data", default="data/demo", help="where the demo's synthetic data set goes (reused)")
    flags.add_seed(p, "training seed of every run (short for train.seed=...)")
    flags.add_nproc(p, 2, "local processes per run")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for both runs")
    p.set_defaults(func=_cmd_demo)

    p = _subparser(
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
    flags.add_output(p, "results store (JSON lines; appended, resumable)", old=["--results"])
    flags.add_nproc(p, 2, "training processes per cell", old=["--nproc"])
    p.add_argument("--parallel", type=int, default=1, help="cells at once (default 1)")
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
        help="skip the INT8/SVD measurements of mlet_torchrec.serving.compression (when present)",
    )
    p.set_defaults(func=_cmd_sweep)

    p = _subparser(
        sub,
        "report",
        "Markdown tables and PNG plots from a sweep's results store",
        "mlet report --input runs/sweep.jsonl --output runs/report --budget-mb 1 4",
    )
    flags.add_input(p, "results store(s) (JSON lines)", nargs="+", required=False)
    p.add_argument("results", type=Path, nargs="*", help=argparse.SUPPRESS)  # the old positional spelling
    flags.add_output(p, "output directory (report.md, plots/)", old=["--out"])
    p.add_argument("--title", default=None)
    p.add_argument(
        "--budget-mb",
        type=float,
        nargs="*",
        default=None,
        help="serving memory budgets (MiB of FP32 tables) to recommend d and k for",
    )
    p.set_defaults(func=_cmd_report)

    from mlet_torchrec.cli.advise import register as register_advise
    from mlet_torchrec.cli.convert import register
    from mlet_torchrec.cli.plan import register as register_plan
    from mlet_torchrec.cli.results import register as register_results

    register(sub)
    register_plan(sub)
    register_results(sub)
    register_advise(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv, lambda args: f"mlet {args.command}")


if __name__ == "__main__":
    sys.exit(main())
