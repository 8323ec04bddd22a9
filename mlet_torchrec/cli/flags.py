"""The one flag vocabulary of every ``mlet`` subcommand.

``--config FILE_OR_NAME`` with ``key.sub=value`` overrides, ``--input``, ``--output``, ``--overwrite``,
``--nproc-per-node``, ``--seed``, ``--log-level``; each subcommand's module declares its flags with these:

    >>> p = argparse.ArgumentParser(prog="mlet collapse")
    >>> add_input(p, "a training run directory")
    >>> p.parse_args(["--input", "runs/a"]).input
    PosixPath('runs/a')
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, NoReturn

from mlet_torchrec import options
from mlet_torchrec.errors import InputNotFound, UserError
from mlet_torchrec.logs import LEVELS

EXAMPLE_FORMATTER = argparse.RawDescriptionHelpFormatter
"""Keeps the line breaks of each subcommand's ``example:`` epilog."""


class Parser(argparse.ArgumentParser):
    """argparse's parser with its own errors on one line too, like every other user mistake (exit 2).

    Its subcommands' parsers are of this class as well (argparse makes them with the parent's class).

        >>> Parser(prog="mlet doc").parse_args(["--nope"])   # doctest: +SKIP
        mlet doc: error: unrecognized arguments: --nope (see mlet doc --help)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # one spelling per flag: `--out` is not `--output`
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def example(*lines: str) -> str:
    """The epilog of a subcommand's help: ``example:`` and the command lines, indented."""
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def subparser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str, *examples: str
) -> argparse.ArgumentParser:
    """A subcommand of ``sub`` with its one-line summary, its ``example:`` lines and the common flags.

    >>> sub = argparse.ArgumentParser(prog="mlet").add_subparsers()
    >>> subparser(sub, "doc", "print the docs", "mlet doc").prog
    'mlet doc'
    """
    return sub.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=example(*examples),
        formatter_class=EXAMPLE_FORMATTER,
        parents=[common_parent()],
    )


def add_log_level(p: argparse.ArgumentParser) -> None:
    """``--log-level``; accepted before or after the subcommand."""
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default=argparse.SUPPRESS,
        help="log level of mlet's own messages (default INFO); DEBUG also shows every library warning",
    )


def common_parent() -> argparse.ArgumentParser:
    """A parent parser with the flags every subcommand takes (``--log-level``)."""
    parent = argparse.ArgumentParser(add_help=False)
    add_log_level(parent)
    return parent


def add_input(p: argparse.ArgumentParser, help: str, nargs: str | None = None, required: bool = True) -> None:
    p.add_argument("--input", type=Path, required=required, nargs=nargs, default=None, help=help)


def add_output(p: argparse.ArgumentParser, help: str, required: bool = True, default: Any = None) -> None:
    p.add_argument("--output", type=Path, required=required, default=default, help=help)


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output that mlet wrote (refuses one holding other files)",
    )


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (processes, rows, cells at once).

    >>> positive_int("2")
    2
    >>> positive_int("0")
    Traceback (most recent call last):
    argparse.ArgumentTypeError: invalid positive integer: '0' (need an integer >= 1)
    """
    return int(_checked(text, int, 1, "positive integer", "an integer >= 1"))


def nonnegative_int(text: str) -> int:
    """An argparse ``type``: an integer >= 0 (restarts)."""
    return int(_checked(text, int, 0, "non-negative integer", "an integer >= 0"))


def nonnegative_float(text: str) -> float:
    """An argparse ``type``: a finite number >= 0 (tolerances)."""
    return float(_checked(text, float, 0.0, "non-negative number", "a finite number >= 0"))


def _checked(text: str, kind: type[int] | type[float], low: float, name: str, need: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low:
        raise argparse.ArgumentTypeError(f"invalid {name}: {text!r} (need {need})")
    return value


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--precision",
        choices=options.PRECISIONS,
        default=None,
        help="an export's INT8 model (default, when exported) or its FP32 one; runs and collapse outputs are FP32",
    )


def add_data(p: argparse.ArgumentParser, help: str) -> None:
    """``--data DATASET`` (default: the model's own) and ``--split NAME`` (default test)."""
    p.add_argument("--data", type=Path, default=None, help=f"{help} (default: the model's own)")
    p.add_argument("--split", default="test", help="split of the data set to score (default test)")


def add_nproc(p: argparse.ArgumentParser, default: int, help: str) -> None:
    p.add_argument("--nproc-per-node", type=positive_int, default=default, help=f"{help} (default {default})")


def add_json(
    p: argparse.ArgumentParser, help: str = "print the whole result as JSON instead of a short summary"
) -> None:
    p.add_argument("--json", action="store_true", help=help)


def add_seed(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--seed", type=int, default=None, help=help)


def add_config(
    p: argparse.ArgumentParser,
    help: str = "YAML config file, or the name of a packaged one "
    "(tiny, demo, models/deepfm, ...); defaults when omitted",
) -> None:
    p.add_argument("--config", default=None, metavar="FILE_OR_NAME", help=help)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, applied in order")


def existing(path: Path, flag: str = "--input") -> Path:
    """``path`` if it exists, else a one-line ``InputNotFound`` naming the flag."""
    if not Path(path).exists():
        raise InputNotFound(f"{flag} {path} does not exist")
    return Path(path)


class UsageError(UserError, ValueError):
    """A flag value or combination argparse cannot check (a required flag given by an old spelling, exclusive
    flags, a feature named twice); still a ``ValueError`` for callers of the helpers that raise it."""
