"""Training throughput of MLET (k=64, d=16) vs single-layer d=16, 2 ranks, side by side in one run.

Runs alternate (baseline, MLET, baseline, MLET, ...) on the same data so machine noise hits both;
the figure is the ratio of median samples/s. Target: MLET keeps >= 85% of the baseline's throughput.

    python benchmarks/train_throughput.py --batch-size 2048 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import yaml

from data_pipes.schema import METADATA_FILE
from data_pipes.synth import SynthConfig, generate
from mlet_torchrec.config import load_config
from mlet_torchrec.training.launcher import train_local

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO / "data" / "demo", help="data set (generated if absent)")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[128, 2048], help="global batch sizes to measure")
    ap.add_argument("--steps", type=int, default=150, help="training steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    if not (args.data / METADATA_FILE).is_file():
        cfg = SynthConfig.model_validate(yaml.safe_load((REPO / "configs/synth/demo.yaml").read_text()))
        generate(cfg, args.data)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch_size:
            sps = {"baseline": [], "mlet": []}
            for rep in range(args.repeats):
                for name, k in (("baseline", "null"), ("mlet", str(args.k))):
                    cfg = load_config(REPO / "configs/demo.yaml", [
                        f"data.path={args.data}", f"run.dir={tmp}/{name}-{batch}-{rep}", f"embedding.d={args.d}",
                        f"embedding.k={k}", f"train.batch_size={batch}", f"train.max_steps={args.steps}",
                        "train.progress=false", "train.eval_batch_size=65536",
                    ])
                    sps[name].append(train_local(cfg, args.nproc)["samples_per_second"])
                    print(f"batch {batch} {name} run {rep}: {sps[name][-1]:,.0f} samples/s", flush=True)
            base, mlet = statistics.median(sps["baseline"]), statistics.median(sps["mlet"])
            results[batch] = {"baseline_samples_per_s": sps["baseline"], "mlet_samples_per_s": sps["mlet"],
                              "ratio_mlet_over_baseline": mlet / base}
            print(f"batch {batch}: baseline {base:,.0f} samples/s, MLET k={args.k} {mlet:,.0f} samples/s, "
                  f"ratio {mlet / base:.3f} (cost {100 * (1 - mlet / base):.1f}%)", flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
