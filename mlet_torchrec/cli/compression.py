"""``mlet compression hash|study``: the papers' compression studies (appendix A.4), from the command line.

    mlet compression hash --input data/synth --output data/synth_h4 C3=0.25 C4=1000   # a hashed copy
    mlet compression study --input runs/a/collapsed --svd-ranks 2 4                   # INT8 and SVD variants

The numbers are :mod:`mlet_torchrec.experiments.compression`'s; a bad spec or path is one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from functools import partial

from mlet_torchrec.cli import flags
from mlet_torchrec.cli.entry import on_ranks
from mlet_torchrec.cli.flags import existing


def parse_spec(items: Sequence[str]) -> dict[str, int | float]:
    """``FEATURE=FRACTION`` (a float) or ``FEATURE=ROWS`` (an int) items as a hashing spec.

    >>> parse_spec(["C3=0.25", "C4=1000"])
    {'C3': 0.25, 'C4': 1000}
    """
    spec: dict[str, int | float] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise flags.UsageError(f"{item!r}: expected FEATURE=FRACTION or FEATURE=ROWS")
        try:
            spec[key] = int(raw) if raw.strip().isdigit() else float(raw)
        except ValueError:
            raise flags.UsageError(f"{item!r}: {raw!r} is neither a fraction nor a row count") from None
    return spec


def _cmd_hash(args: argparse.Namespace) -> int:
    spec = parse_spec(args.spec)
    source = existing(args.input)
    from mlet_torchrec.experiments.hashing import write_hashed_dataset

    meta = write_hashed_dataset(source, args.output, spec, args.overwrite)
    print(json.dumps({"cardinalities": meta.cardinalities(), "hashing": meta.source["hashing"]}, indent=2))
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    source = existing(args.input)
    from mlet_torchrec.experiments.compression import compression_study

    rows = on_ranks(args, partial(compression_study, source, args.split, args.svd_ranks, max_rows=args.max_rows))
    for r in rows:
        print(f"{r['method']:<24} size {r['table_size']:8.3f}  AUC {r['auc']:.5f}  LogLoss {r['logloss']:.5f}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``compression`` (with ``hash`` and ``study``) to the ``mlet`` subcommands."""
    p = flags.subparser(
        sub,
        "compression",
        "the papers' compression studies (appendix A.4): hashed data sets, INT8 and SVD variants",
        "mlet compression hash --input data/synth --output data/synth_h4 C3=0.25",
        "mlet compression study --input runs/a/collapsed --svd-ranks 2",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="{hash,study}")
    q = flags.subparser(
        actions,
        "hash",
        "write a copy of a data set with hashed (modulo) ids",
        "mlet compression hash --input data/synth --output data/synth_h4 C3=0.25 C4=1000",
    )
    flags.add_input(q, "data set directory")
    flags.add_output(q, "directory of the hashed copy")
    q.add_argument("spec", nargs="+", metavar="FEATURE=FRACTION|ROWS", help="features to hash and their rows")
    flags.add_overwrite(q)
    q.set_defaults(func=_cmd_hash)
    q = flags.subparser(
        actions,
        "study",
        "INT8 (max-abs vs grid-searched scale) and SVD variants of a collapsed model",
        "mlet compression study --input runs/a/collapsed --svd-ranks 2 4",
    )
    flags.add_input(q, "output directory of `mlet collapse`")
    q.add_argument("--split", default="test", help="split the variants are scored on")
    q.add_argument("--svd-ranks", type=int, nargs="*", default=[], help="ranks of the low-rank SVD variants")
    q.add_argument("--max-rows", type=int, default=None, help="score at most this many rows")
    flags.add_nproc(q, 1, "local processes, each scoring its slice of the split")
    q.set_defaults(func=_cmd_study)
