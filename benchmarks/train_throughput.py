"""Training throughput, side by side in one run: MLET vs single-layer, pipelined vs plain, 2 ranks vs 1.

Cells, at each global batch size (all MLET cells k=64, d=16, unless given otherwise):

* ``baseline``: single-layer d=16 tables, TorchRec's pipeline (``train.pipeline=auto``), ``--nproc`` ranks;
* ``mlet``: the same with MLET;
* ``mlet_plain``: MLET in the plain loop (``train.pipeline=none``);
* ``mlet_1rank``: MLET, pipelined, on one rank.

Runs alternate cell by cell (baseline, mlet, mlet_plain, mlet_1rank, baseline, ...) on the same data so
machine noise hits every cell; each figure is the median samples/s over ``--repeats`` runs and each ratio
a ratio of medians. The load average is printed next to the figures: on a shared machine rerun when it
is low. Target: MLET keeps >= 90% of the baseline's throughput at batch 2048.

    python benchmarks/train_throughput.py --batch-size 2048 --repeats 3 --out benchmarks/results/train_throughput.json

``--profile N`` instead profiles N steps of the baseline and of MLET in this process (1 rank, plain loop,
torch.profiler, after 5 warm-up steps) and prints where each spends its self CPU time, op by op.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import yaml

from data_pipes.schema import METADATA_FILE
from data_pipes.synth import SynthConfig, generate
from mlet_torchrec.config import load_config
from mlet_torchrec.training.launcher import train_local

REPO = Path(__file__).resolve().parents[1]

RATIOS = {  # name -> (numerator cell, denominator cell)
    "mlet_over_baseline": ("mlet", "baseline"),
    "pipelined_over_plain": ("mlet", "mlet_plain"),
    "two_ranks_over_one": ("mlet", "mlet_1rank"),
}


def cells(k: int, nproc: int) -> list[tuple[str, str, str, int]]:
    """(name, embedding.k, train.pipeline, ranks) of every cell."""
    return [
        ("baseline", "null", "auto", nproc),
        ("mlet", str(k), "auto", nproc),
        ("mlet_plain", str(k), "none", nproc),
        ("mlet_1rank", str(k), "auto", 1),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "data" / "demo", help="data set (generated if absent)")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[2048], help="global batch sizes to measure")
    ap.add_argument("--steps", type=int, default=100, help="training steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--cells", nargs="+", default=None, help="measure only these cells (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile N steps instead (see above)")
    args = ap.parse_args()

    if not (args.data / METADATA_FILE).is_file():
        cfg = SynthConfig.model_validate(yaml.safe_load((REPO / "configs/synth/demo.yaml").read_text()))
        generate(cfg, args.data)

    if args.profile:
        profile(args)
        return
    plan = [c for c in cells(args.k, args.nproc) if args.cells is None or c[0] in args.cells]
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch_size:
            sps: dict[str, list[float]] = {name: [] for name, *_ in plan}
            loads: list[float] = []
            for rep in range(args.repeats):
                for name, k, pipeline, nproc in plan:
                    cfg = load_config(
                        REPO / "configs/demo.yaml",
                        [
                            f"data.path={args.data}",
                            f"run.dir={tmp}/{name}-{batch}-{rep}",
                            f"embedding.d={args.d}",
                            f"embedding.k={k}",
                            f"train.batch_size={batch}",
                            f"train.max_steps={args.steps}",
                            f"train.pipeline={pipeline}",
                            "train.progress=false",
                            "train.eval_batch_size=65536",
                            f"train.log_every={args.steps}",
                        ],
                    )
                    sps[name].append(train_local(cfg, nproc)["samples_per_second"])
                    loads.append(os.getloadavg()[0])
                    print(
                        f"batch {batch} {name} run {rep}: {sps[name][-1]:,.0f} samples/s "
                        f"(load average {loads[-1]:.1f})",
                        flush=True,
                    )
            median = {name: statistics.median(v) for name, v in sps.items()}
            ratios = {r: median[a] / median[b] for r, (a, b) in RATIOS.items() if a in median and b in median}
            results[str(batch)] = {
                "samples_per_s": sps,
                "median_samples_per_s": median,
                "ratios": ratios,
                "load_average_1min": loads,
                "cpu_count": os.cpu_count(),
                "steps": args.steps,
            }
            print(f"batch {batch}: " + ", ".join(f"{n} {v:,.0f} samples/s" for n, v in median.items()), flush=True)
            print(
                f"batch {batch}: "
                + ", ".join(f"{r} {v:.3f}" for r, v in ratios.items())
                + f" (load average {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores)",
                flush=True,
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def profile(args: argparse.Namespace) -> None:
    """Self CPU time per op, baseline vs MLET, over ``args.profile`` steps of one process."""
    import torch
    from torch.profiler import ProfilerActivity, schedule

    from mlet_torchrec.training.train import train

    warm = 5
    table: dict[str, dict[str, float]] = {}
    per_step: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, k in (("baseline", "null"), ("mlet", str(args.k))):
            cfg = load_config(
                REPO / "configs/demo.yaml",
                [
                    f"data.path={args.data}",
                    f"run.dir={tmp}/{name}",
                    f"embedding.d={args.d}",
                    f"embedding.k={k}",
                    f"train.batch_size={args.batch_size[0]}",
                    f"train.max_steps={warm + args.profile + 1}",
                    "train.pipeline=none",
                    "train.progress=false",
                    "train.eval_batch_size=65536",
                ],
            )
            prof = torch.profiler.profile(
                activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=warm, active=args.profile, repeat=1)
            )
            with prof:
                train(cfg, hooks=[lambda ev, p=prof: p.step()])
            for e in prof.key_averages():
                table.setdefault(e.key, {})[name] = e.self_cpu_time_total / 1e3 / args.profile
            per_step[name] = sum(v.get(name, 0.0) for v in table.values())
    print(
        f"self CPU ms per step over {args.profile} steps, batch {args.batch_size[0]}, 1 process: "
        f"baseline {per_step['baseline']:.1f}, MLET k={args.k} {per_step['mlet']:.1f}"
    )
    rows = sorted(table.items(), key=lambda kv: -(kv[1].get("mlet", 0.0) - kv[1].get("baseline", 0.0)))
    print(f"{'op':<60} {'baseline':>9} {'mlet':>9} {'extra':>9}")
    for key, v in rows[:15]:
        b, m = v.get("baseline", 0.0), v.get("mlet", 0.0)
        print(f"{key[:60]:<60} {b:9.2f} {m:9.2f} {m - b:9.2f}")


if __name__ == "__main__":
    main()
