"""Peak memory of ``mlet predict`` as the split grows: it should not grow with the rows.

Generates one synthetic data set per size (``--rows``, all but 1% in the test split), trains the tiny model
for a few steps on the smallest, and scores each test split with ``mlet predict`` in a fresh child process,
reporting the child's peak RSS (``os.wait4``'s high-water mark) and rows/s, then the ratio of the peak RSS of
the largest to the smallest split. Every rank holds one batch; rank 0 assembles the file through memory-mapped
columns on disk, a million rows at a time.

    python benchmarks/predict_memory.py                      # 100K and 1M rows
    python benchmarks/predict_memory.py --rows 100000 2000000 --json

Measured on 2 CPU cores shared with other jobs (tiny config, 4 dense and 4 sparse features, 1 process):

       100,000 rows    42.8 s      2,316 rows/s  peak RSS 456 MiB
     1,000,000 rows   328.2 s      3,017 rows/s  peak RSS 541 MiB
    peak RSS 1,000,000 / 100,000 rows: 1.19x
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_pipes.synth import SynthConfig, generate


def _data(root: Path, rows: int) -> Path:
    out = root / f"data{rows}"
    cfg = SynthConfig(
        rows=rows,
        num_dense=4,
        num_sparse=4,
        max_cardinality=1000,
        train_fraction=0.01,
        valid_fraction=0.0,
        test_fraction=0.99,
        seed=1,
    )
    generate(cfg, out, progress=False)
    return out


def _train(root: Path, data: Path) -> Path:
    from mlet_torchrec.config import load_config
    from mlet_torchrec.training.train import train

    run = root / "run"
    train(load_config("tiny", [f"data.path={data}", f"run.dir={run}", "train.max_steps=5", "train.log_every=1000"]))
    return run


def _predict(run: Path, data: Path, out: Path) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "mlet_torchrec.cli", "predict", "--input", str(run), "--data", str(data)]
    cmd += ["--output", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"mlet predict failed: {proc.stderr.read().decode() if proc.stderr else status}")
    return usage.ru_maxrss / 1024, seconds  # KiB -> MiB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        sets = [(n, _data(root, n)) for n in sorted(args.rows)]
        run = _train(root, sets[0][1])
        for n, data in sets:
            peak, seconds = _predict(run, data, root / f"p{n}.parquet")
            results.append({"rows": n, "peak_rss_mib": peak, "seconds": seconds, "rows_per_s": 0.99 * n / seconds})
    ratio = results[-1]["peak_rss_mib"] / results[0]["peak_rss_mib"]
    if args.json:
        print(json.dumps({"runs": results, "peak_ratio": ratio}))
        return
    for r in results:
        rate, peak = r["rows_per_s"], r["peak_rss_mib"]
        print(f"{r['rows']:>10,} rows  {r['seconds']:6.1f} s  {rate:>9,.0f} rows/s  peak RSS {peak:.0f} MiB")
    print(f"peak RSS {results[-1]['rows']:,} / {results[0]['rows']:,} rows: {ratio:.2f}x")


if __name__ == "__main__":
    main()
