"""How every ``mlet`` front end ends: a user's mistake in one line (exit 2), a bug with its traceback (exit 1).

>>> import argparse
>>> parser = argparse.ArgumentParser(prog="mlet doc")
>>> def fail(args):
...     raise UserError("data/x: no metadata.json")
>>> parser.set_defaults(func=fail)
>>> run(parser, [], lambda args: "mlet doc")    # doctest: +SKIP
mlet doc: error: data/x: no metadata.json
2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mlet_torchrec.errors import EXIT_INTERRUPTED, UserError
from mlet_torchrec.logs import configure_logging

T = TypeVar("T")


def run(parser: argparse.ArgumentParser, argv: list[str] | None, name: Callable[[argparse.Namespace], str]) -> int:
    """Parse ``argv``, configure logging, run the subcommand; a ``UserError`` -> one line on stderr, exit 2
    (130 for :class:`~mlet_torchrec.errors.Interrupted`, and for a Ctrl-C anywhere else)."""
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "log_level", "INFO"))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as e:
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the source wrote
        print(f"{name(args)}: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{name(args)}: error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def print_once(text: str) -> None:
    """Print a command's result once: on rank 0 of a torchrun/TorchX job (every rank computes the same), or here."""
    if os.environ.get("RANK", "0") == "0":
        print(text)


def print_summary(summary: dict[str, Any], lines: list[str], as_json: bool) -> None:
    """Print a command's result once (:func:`print_once`): ``lines`` for a person, or the whole ``summary`` as
    JSON (``--json``)."""
    print_once(json.dumps(summary, indent=2, default=str) if as_json else "\n".join(lines))


def on_ranks(args: argparse.Namespace, call: Callable[[], T], fresh_dir: Path | str | None = None) -> T:
    """``call()`` on ``--nproc-per-node`` local processes (rank 0's result), or in this process when that is 1
    or when this process is already one rank of a torchrun/TorchX job: how every verb runs on N ranks.

    ``call`` is a library function written for every rank of a group, bound to its arguments with
    ``functools.partial``; see :func:`mlet_torchrec.training.launcher.run_local` (``fresh_dir`` too).
    """
    from mlet_torchrec.ranks import in_distributed_job
    from mlet_torchrec.training.distributed import check_launch_env
    from mlet_torchrec.training.launcher import run_local

    check_launch_env(args.nproc_per_node)
    if args.nproc_per_node > 1 and not in_distributed_job():
        log_level = getattr(args, "log_level", "INFO")
        return run_local(args.nproc_per_node, call, log_level, getattr(args, "max_restarts", 0), fresh_dir)
    return call()
