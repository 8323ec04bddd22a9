"""``mlet synth --output DIR [--config FILE_OR_NAME] [key=value ...]``: planted synthetic Criteo-shaped data.

The settings are :class:`data_pipes.synth.SynthConfig`'s; a packaged YAML (``synth/demo``) or overrides.
"""

from __future__ import annotations

import argparse
from typing import Any

from mlet_torchrec.cli import flags
from mlet_torchrec.config import ConfigError, apply_overrides, format_validation_error, read_config_mapping


def _cmd_synth(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from data_pipes.synth import SynthConfig, generate

    raw: dict[str, Any] = {} if args.config is None else read_config_mapping(args.config)[0]
    raw = apply_overrides(raw, list(args.overrides) + ([f"seed={args.seed}"] if args.seed is not None else []))
    try:
        cfg = SynthConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "synth settings")) from None
    meta = generate(cfg, args.output, overwrite=args.overwrite)
    print(f"wrote {sum(meta.rows.values())} rows to {args.output} ({meta.rows})")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``synth`` to the ``mlet`` subcommands."""
    p = flags.subparser(
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
