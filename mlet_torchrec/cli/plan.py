"""``mlet plan``: TorchRec's sharding planner on a cluster described by flags, before renting it.

    mlet plan --config configs/criteo_1tb_dlrm_mlet.yaml --input configs/shapes/criteo_1tb \\
        --world-size 32 --local-world-size 8 --device cuda --hbm-gb 80 --ddr-gb 128 --output plan.json

Prints per table the sharding type and kernel, per rank the HBM and DDR used and the MLET memory factor;
writes PLAN.json (complete or not at all) for ``mlet train --plan PLAN.json``. When the tables cannot fit,
exits 2 with one line naming the shortfall and the levers.
"""

from __future__ import annotations

import argparse

from mlet_torchrec.cli import flags


def _cmd_plan(args: argparse.Namespace) -> int:
    from data_pipes.schema import DatasetMeta
    from mlet_torchrec.config import load_config
    from mlet_torchrec.training.planning import Cluster, format_plan, make_plan, write_plan

    overrides = ([f"data.path={args.input}"] if args.input is not None else []) + list(args.overrides)
    config = load_config(args.config, overrides)
    meta = DatasetMeta.load(config.data.path)
    cluster = Cluster(
        world_size=args.world_size,
        local_world_size=args.local_world_size,
        device=args.device,
        hbm_gb=args.hbm_gb,
        ddr_gb=args.ddr_gb,
        batch_size=args.batch_size,
    )
    plan = make_plan(config, meta, cluster)
    print(format_plan(plan))
    if args.output is not None:
        print(f"wrote {write_plan(plan, args.output, overwrite=args.overwrite)}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``plan`` to the ``mlet`` subcommands."""
    summary = "plan the sharding of a config on a cluster you describe (no GPU needed): fits or not, and how"
    p = flags.subparser(
        sub,
        "plan",
        summary,
        "mlet plan --config configs/criteo_1tb_dlrm_mlet.yaml --input configs/shapes/criteo_1tb "
        "--world-size 32 --hbm-gb 80 --output plan.json",
        "mlet train --config tiny --nproc-per-node 2 --plan plan.json",
    )
    flags.add_config(p)
    flags.add_input(
        p,
        "data set directory, or a shape-only one holding just metadata.json (short for data.path=...)",
        required=False,
    )
    flags.add_output(p, "plan file to write (JSON); printed only when omitted", required=False)
    flags.add_overwrite(p)
    p.add_argument("--world-size", type=int, required=True, help="ranks (GPUs, or processes on CPU) in all")
    p.add_argument("--local-world-size", type=int, default=None, help="ranks per host (default min(world size, 8))")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="what the ranks run on (default cuda)")
    p.add_argument("--hbm-gb", type=float, default=80.0, help="GPU memory per rank, GiB (default 80)")
    p.add_argument("--ddr-gb", type=float, default=128.0, help="host memory per rank, GiB (default 128)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (default: train.batch_size)")
    p.set_defaults(func=_cmd_plan)
