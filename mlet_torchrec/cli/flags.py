"""The one flag vocabulary of every ``mlet`` subcommand, and the old spellings kept for one release.

``--config FILE_OR_NAME`` with ``key.sub=value`` overrides, ``--input``, ``--output``, ``--overwrite``,
``--nproc-per-node``, ``--seed``, ``--log-level``. An old spelling (``--checkpoint``, ``--collapsed``,
``--out``, ``--results``, ``--workdir``, ``--nproc``, ``-v/--verbose``) still works and prints one line:

    >>> p = argparse.ArgumentParser(prog="mlet collapse")
    >>> add_input(p, "a training run directory", old=("--checkpoint",))
    >>> p.parse_args(["--input", "runs/a"]).input
    PosixPath('runs/a')
    >>> p.parse_args(["--checkpoint", "runs/a"]).input     # also prints, on stderr:
    PosixPath('runs/a')

``mlet collapse: warning: --checkpoint is deprecated and goes in the next release; use --input``
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

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

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def example(*lines: str) -> str:
    """The epilog of a subcommand's help: ``example:`` and the command lines, indented."""
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's ``dest`` and warns once per parse."""

    def __init__(
        self, option_strings: Sequence[str], dest: str, new: str = "", value: Any = None, **kwargs: Any
    ) -> None:
        self.new = new
        self.value = value
        self.warned = False
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if not self.warned:
            self.warned = True
            print(
                f"{parser.prog}: warning: {option_string} is deprecated and goes in the next release; use {self.new}",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, self.value if self.nargs == 0 else values)


def add_alias(p: argparse.ArgumentParser, old: Sequence[str], new: str, dest: str, **kwargs: Any) -> None:
    """Accept each spelling of ``old`` as a deprecated alias of the flag ``new`` (same ``dest``)."""
    if old:
        p.add_argument(*old, action=DeprecatedAlias, new=new, dest=dest, default=argparse.SUPPRESS, **kwargs)


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
    """``--log-level`` (and the old ``-v/--verbose``); accepted before or after the subcommand."""
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=LEVELS,
        default=argparse.SUPPRESS,
        help="log level of mlet's own messages (default INFO); DEBUG also shows every library warning",
    )
    add_alias(p, ["-v", "--verbose"], "--log-level DEBUG", "log_level", nargs=0, value="DEBUG")


def common_parent() -> argparse.ArgumentParser:
    """A parent parser with the flags every subcommand takes (``--log-level``)."""
    parent = argparse.ArgumentParser(add_help=False)
    add_log_level(parent)
    return parent


def add_input(
    p: argparse.ArgumentParser, help: str, old: Sequence[str] = (), nargs: str | None = None, required: bool = True
) -> None:
    """``--input``; with old spellings argparse cannot require it: the command calls :func:`require`."""
    p.add_argument("--input", type=Path, required=required and not old, nargs=nargs, default=None, help=help)
    add_alias(p, old, "--input", "input", type=Path, nargs=nargs)


def add_output(
    p: argparse.ArgumentParser, help: str, old: Sequence[str] = (), required: bool = True, default: Any = None
) -> None:
    """``--output``; with old spellings argparse cannot require it: the command calls :func:`require`."""
    p.add_argument("--output", type=Path, required=required and not old, default=default, help=help)
    add_alias(p, old, "--output", "output", type=Path)


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


def add_nproc(p: argparse.ArgumentParser, default: int, help: str, old: Sequence[str] = ()) -> None:
    p.add_argument("--nproc-per-node", type=positive_int, default=default, help=f"{help} (default {default})")
    add_alias(p, old, "--nproc-per-node", "nproc_per_node", type=positive_int)


def add_seed(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--seed", type=int, default=None, help=help)


def add_config(
    p: argparse.ArgumentParser,
    help: str = "YAML config file, or the name of a packaged one "
    "(tiny, demo, models/deepfm, ...); defaults when omitted",
) -> None:
    p.add_argument("--config", default=None, metavar="FILE_OR_NAME", help=help)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, applied in order")


def require(args: argparse.Namespace, name: str, flag: str) -> Any:
    """The value of a required flag that has deprecated aliases (argparse cannot require one of them)."""
    value = getattr(args, name, None)
    if value is None:
        raise UsageError(f"the following arguments are required: {flag}")
    return value


def existing(path: Path, flag: str = "--input") -> Path:
    """``path`` if it exists, else a one-line ``InputNotFound`` naming the flag."""
    if not Path(path).exists():
        raise InputNotFound(f"{flag} {path} does not exist")
    return Path(path)


class UsageError(UserError, ValueError):
    """A flag value or combination argparse cannot check (a required flag given by an old spelling, exclusive
    flags, a feature named twice); still a ``ValueError`` for callers of the helpers that raise it."""
