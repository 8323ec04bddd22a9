"""``mlet serve --input EXPORT [--host 127.0.0.1] [--port 8080] [--precision int8|fp32]``.

An export over HTTP: ``POST /v1/predict`` (raw rows -> probabilities), ``GET /healthz`` (see
:mod:`mlet_torchrec.serving.server`). Runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse

from mlet_torchrec.cli import flags
from mlet_torchrec.cli.flags import existing


def _cmd_serve(args: argparse.Namespace) -> int:
    source = existing(args.input)
    from mlet_torchrec.serving.server import ServeLimits, serve

    if args.max_rows < 1 or args.max_body_bytes < 1:
        raise flags.UsageError("--max-rows and --max-body-bytes must be >= 1")
    if not 0 <= args.port <= 65535:
        raise flags.UsageError(f"--port {args.port} is not a TCP port (0-65535; 0: any free port)")
    limits = ServeLimits(max_rows=args.max_rows, max_body_bytes=args.max_body_bytes)
    serve(source, args.host, args.port, args.precision, limits)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` to the ``mlet`` subcommands."""
    p = flags.subparser(
        sub,
        "serve",
        "serve an export over HTTP: raw rows in, probabilities out (dynamic batching)",
        "mlet serve --input runs/demo/export --port 8080",
        """curl -s localhost:8080/v1/predict -H 'Content-Type: application/json' -d '{"rows": [{"I1": "5"}]}'""",
    )
    flags.add_input(p, "output directory of `mlet export`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port, printed at start)")
    flags.add_precision(p)
    p.add_argument("--max-rows", type=int, default=4096, help="rows per request (more: 413)")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="bytes per request body (more: 413)")
    p.set_defaults(func=_cmd_serve)
