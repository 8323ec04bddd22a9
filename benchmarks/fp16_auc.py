"""The AUC cost of FP16 W1: MLET d=4 k=64 trained with fp32 vs fp16 W1 tables, same seeds, same data.

One process per run (world size 1), runs in seed order, fp32 then fp16, appended to a JSON-lines store so an
interrupted study resumes; ``--summary`` writes the Markdown table (mean over seeds and the paired difference).

    python benchmarks/fp16_auc.py --data movielens=data/exp_ml synth1m=data/exp_synth1m \
        --results docs/results/fp16/results.jsonl --summary docs/results/fp16/README.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"movielens": "configs/experiments/movielens_dlrm.yaml", "synth1m": "configs/experiments/synth1m_dlrm.yaml"}


def run_all(data: dict[str, str], seeds: list[int], results: Path, k: int) -> None:
    from mlet_torchrec.config import load_config
    from mlet_torchrec.training.train import train

    done = set()
    if results.exists():
        done = {(r["dataset"], r["seed"], r["w1_dtype"]) for r in map(json.loads, results.read_text().splitlines())}
    for name, path in data.items():
        for seed in seeds:
            for dtype in ("fp32", "fp16"):
                if (name, seed, dtype) in done:
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = load_config(
                        REPO / CONFIGS[name],
                        [
                            f"data.path={path}",
                            f"run.dir={tmp}/run",
                            f"embedding.k={k}",
                            f"embedding.w1_dtype={dtype}",
                            f"train.seed={seed}",
                            "run.device=cpu",
                            "train.progress=false",
                        ],
                    )
                    res = train(cfg)
                row = {
                    "dataset": name,
                    "seed": seed,
                    "w1_dtype": dtype,
                    "d": cfg.embedding.d,
                    "k": k,
                    "test_auc": res.test.auc,
                    "test_logloss": res.test.logloss,
                    "valid_auc": res.valid.auc if res.valid else None,
                    "steps": res.steps,
                    "samples_per_second": res.samples_per_second,
                }
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


def _sd(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def summary(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    header = (
        "| data set | seeds | test AUC fp32 W1 | test AUC fp16 W1 | fp16 - fp32 AUC (paired, per seed) | "
        "test LogLoss fp32 / fp16 |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        by = {(r["seed"], r["w1_dtype"]): r for r in rows if r["dataset"] == name}
        seeds = sorted({s for s, _ in by if (s, "fp32") in by and (s, "fp16") in by})
        if not seeds:
            continue
        a32 = [by[s, "fp32"]["test_auc"] for s in seeds]
        a16 = [by[s, "fp16"]["test_auc"] for s in seeds]
        diffs = [b - a for a, b in zip(a32, a16, strict=True)]
        l32 = statistics.mean(by[s, "fp32"]["test_logloss"] for s in seeds)
        l16 = statistics.mean(by[s, "fp16"]["test_logloss"] for s in seeds)
        lines.append(
            f"| {name} | {len(seeds)} | {statistics.mean(a32):.4f} ± {_sd(a32):.4f} | "
            f"{statistics.mean(a16):.4f} ± {_sd(a16):.4f} | {statistics.mean(diffs):+.4f} "
            f"({', '.join(f'{x:+.4f}' for x in diffs)}) | {l32:.4f} / {l16:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=[], metavar="NAME=PATH", help=f"data sets ({', '.join(CONFIGS)})")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--summary", type=Path, default=None, help="print (and with a path, write) the table")
    args = ap.parse_args()
    data = dict(item.split("=", 1) for item in args.data)
    if data:
        run_all(data, args.seeds, args.results, args.k)
    table = summary(args.results)
    print(table)
    if args.summary is not None:
        from mlet_torchrec.io import atomic_write_text

        atomic_write_text(args.summary, table)


if __name__ == "__main__":
    main()
