"""``mlet advise --input STORE.jsonl [--json]``: does MLET help on your own sweep? One verdict, in plain words.

    mlet advise --input runs/sweep.jsonl          # per cell: baseline and MLET AUC, Δ [95%], p, mark; verdict
    mlet advise --input runs/sweep.jsonl --json   # the same as one JSON object, for scripts

Any store of ``mlet sweep`` (any config, model or optimizer) with single-layer (k null) and MLET runs; the
numbers are :mod:`mlet_torchrec.experiments.advise`'s. A missing or empty store, or one without a single-layer
run, is one error line and exit 2.
"""

from __future__ import annotations

import argparse

from mlet_torchrec.cli import flags
from mlet_torchrec.cli.flags import existing


def _cmd_advise(args: argparse.Namespace) -> int:
    store = existing(args.input)  # before the imports: a typo fails in a second
    from mlet_torchrec.experiments.advise import advise, as_json, format_text, load_store

    records, path = load_store(store)
    advice = advise(records, str(path))
    print(as_json(advice) if args.json else format_text(advice).rstrip("\n"))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``advise`` to the ``mlet`` subcommands."""
    summary = "does MLET beat a tuned baseline on your sweep? per-cell marks, pooled estimate, what to run next"
    p = flags.subparser(
        sub, "advise", summary, "mlet advise --input runs/sweep.jsonl", "mlet advise --input runs/sweep.jsonl --json"
    )
    flags.add_input(p, "results store of `mlet sweep` (JSON lines), or a directory holding results.jsonl")
    flags.add_json(p, "print cells, pooled estimate and verdict as JSON")
    p.set_defaults(func=_cmd_advise)
