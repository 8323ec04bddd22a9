"""``mlet predict --input RUN|COLLAPSED|EXPORT [--data DATASET] [--split S] --output FILE.parquet|FILE.csv``.

Batch scoring: the click probability of every row of a split (and its label), one row per row of the split
in its order, written atomically as Parquet or CSV (by the output's suffix; any other is refused);
``--nproc-per-node N`` shards the work over local processes.
"""

from __future__ import annotations

import argparse
from functools import partial

from mlet_torchrec.cli import flags
from mlet_torchrec.cli.entry import on_ranks, print_once
from mlet_torchrec.cli.flags import existing


def _cmd_predict(args: argparse.Namespace) -> int:
    source = existing(args.input)
    data = None if args.data is None else existing(args.data, "--data")
    from mlet_torchrec.serving.predict import output_format, predict

    output_format(args.output)  # before any process starts
    call = partial(predict, source, data, args.split, args.output, args.precision, args.overwrite)
    report = on_ranks(args, call)
    print_once(report.summary())
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``predict`` to the ``mlet`` subcommands."""
    p = flags.subparser(
        sub,
        "predict",
        "click probabilities of every row of a split, by a run, a collapse or an export -> Parquet or CSV",
        "mlet predict --input runs/tiny/export --data data/new --output scores.parquet",
        "mlet predict --input runs/tiny --split valid --output valid.csv --nproc-per-node 2",
    )
    flags.add_input(p, "training run (or checkpoint) directory, collapse output or export dir")
    flags.add_data(p, "data set to score; convert raw data with --features-from the model")
    flags.add_output(
        p,
        "file to write, columns probability, label: FILE.parquet (Parquet; also a name without a suffix) or "
        "FILE.csv (CSV with a header row); any other suffix is refused",
    )
    flags.add_precision(p)
    flags.add_overwrite(p)
    flags.add_nproc(
        p,
        1,
        "local processes, each scoring its slice of the split (1 under torchrun/TorchX, which start the processes)",
    )
    p.set_defaults(func=_cmd_predict)
