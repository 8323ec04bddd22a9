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
from typing import Any

from mlet_torchrec.errors import EXIT_USER_ERROR, UserError
from mlet_torchrec.logs import configure_logging


def run(parser: argparse.ArgumentParser, argv: list[str] | None, name: Callable[[argparse.Namespace], str]) -> int:
    """Parse ``argv``, configure logging, run the subcommand; a ``UserError`` -> one line on stderr, exit 2."""
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "log_level", "INFO"))
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as e:
        message = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the source wrote
        print(f"{name(args)}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


def print_summary(summary: dict[str, Any]) -> None:
    """Print a command's result as JSON, once: on rank 0 (every rank of a job computes the same)."""
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2, default=str))
