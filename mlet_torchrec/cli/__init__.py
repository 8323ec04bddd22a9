"""``mlet``: argument parsing only; each subcommand calls one function of a lower layer."""

from mlet_torchrec.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
