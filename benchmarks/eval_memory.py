"""Peak memory of evaluation as the split grows 10x: it must stay flat (no prediction is gathered).

Generates one synthetic data set per size (the test split holds 90% of its rows), then evaluates a DLRM
(tiny config, d=16, random weights) on the test split in a fresh child process per (size, mode), and reports
the child's peak RSS (``ru_maxrss``, the kernel's high-water mark), its RSS just before evaluating (imports,
model, reader opened) and the growth between the two, side by side in one run. Modes:

* ``histogram``: ``evaluate_split`` with the 2^16-bin logit histogram (the default);
* ``exact``: ``evaluate_split --auc exact`` (scores kept to be ranked: grows by design, ~5 B/row here);
* ``held``: every prediction held in memory, then the metrics (what evaluation did before: reference).

    python benchmarks/eval_memory.py                         # 100k and 1M test rows
    python benchmarks/eval_memory.py --rows 20000 200000 --modes histogram

Measured on 2 shared CPU cores (heavily loaded: seconds are not comparable), default sizes:

     test rows      mode   RSS before  peak RSS   growth
        99,999 histogram      385 MiB   438 MiB    53 MiB
        99,999     exact      385 MiB   450 MiB    66 MiB
        99,999      held      384 MiB   448 MiB    64 MiB
       999,999 histogram      385 MiB   475 MiB    90 MiB
       999,999     exact      385 MiB   884 MiB   500 MiB
       999,999      held      385 MiB   683 MiB   299 MiB
    peak RSS 1M / 100k rows: histogram 1.09x, exact 1.96x, held 1.52x

The histogram mode's remaining +37 MiB is the Parquet reader's: reading the same test splits without a model
peaks at +25 MiB (100k rows) and +63 MiB (1M rows) over its start. (Exact mode was measured before its
second sort was dropped: the ranking step alone then took +190 MiB at 1M rows, now +137 MiB.)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(data: str, mode: str, batch: int) -> None:
    """One evaluation in this process; prints a JSON line."""
    import torch

    from data_pipes.schema import DatasetMeta
    from mlet_torchrec.config import load_config
    from mlet_torchrec.evaluation.evaluate import evaluate_split, predict_split
    from mlet_torchrec.evaluation.metrics import ctr_metrics
    from mlet_torchrec.models.registry import build_model

    torch.manual_seed(0)
    config = load_config("tiny", [f"data.path={data}", "embedding.d=16", "embedding.k=null"])
    meta = DatasetMeta.load(data)
    model = build_model(config.model, config.embedding, meta).eval()
    before = _rss_mib()
    start = time.perf_counter()
    if mode == "held":
        probs, labels = predict_split(model, data, "test", batch, meta)
        m = ctr_metrics(probs, labels)
    else:
        m = evaluate_split(model, data, "test", batch, meta, auc=mode)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "rows": m.rows,
                "mode": mode,
                "seconds": seconds,
                "rss_before_mib": before,
                "peak_rss_mib": peak,
                "growth_mib": peak - before,
                "auc": m.auc,
                "auc_error_bound": m.auc_error_bound,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000], help="test rows per size")
    ap.add_argument(
        "--modes", nargs="+", default=["histogram", "exact", "held"], choices=["histogram", "exact", "held"]
    )
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--row-group-size", type=int, default=512)
    ap.add_argument("--child", nargs=2, metavar=("DATA", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.batch)
        return

    from data_pipes.synth import SynthConfig, generate

    results = []
    with tempfile.TemporaryDirectory(prefix="eval-memory-") as tmp:
        for rows in args.rows:
            data = Path(tmp) / f"data{rows}"
            # one row-group size for every size, well under rows / 96 (the reader's virtual shards hold ~2 each)
            generate(
                SynthConfig(
                    rows=round(rows / 0.9),
                    num_dense=13,
                    num_sparse=8,
                    max_cardinality=100_000,
                    train_fraction=0.05,
                    valid_fraction=0.05,
                    test_fraction=0.9,
                    row_group_size=args.row_group_size,
                    seed=1,
                ),
                data,
                progress=False,
            )
            for mode in args.modes:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(data), mode, "--batch", str(args.batch)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results.append(res)
                print(json.dumps(res), flush=True)
    print(f"\n{'test rows':>10} {'mode':>9} {'seconds':>8} {'RSS before':>11} {'peak RSS':>9} {'growth':>8}")
    for r in results:
        print(
            f"{r['rows']:>10,} {r['mode']:>9} {r['seconds']:>8.1f} {r['rss_before_mib']:>8.0f} MiB "
            f"{r['peak_rss_mib']:>5.0f} MiB {r['growth_mib']:>4.0f} MiB"
        )
    small, large = min(args.rows), max(args.rows)
    for mode in args.modes:
        by = {r["rows"]: r for r in results if r["mode"] == mode}
        lo = next((v for k, v in by.items() if abs(k - small) <= small * 0.01), None)
        hi = next((v for k, v in by.items() if abs(k - large) <= large * 0.01), None)
        if lo and hi:
            print(
                f"{mode}: peak RSS {hi['peak_rss_mib'] / lo['peak_rss_mib']:.2f}x, growth "
                f"{lo['growth_mib']:.0f} -> {hi['growth_mib']:.0f} MiB for {large / small:.0f}x the rows"
            )


if __name__ == "__main__":
    main()
