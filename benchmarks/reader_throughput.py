"""Reader throughput: raw pyarrow row-group reads vs ParquetBatchReader -> Batch, in the training
process and through DataLoader workers, side by side.

All read the same row groups of the same split (warm page cache; passes alternate so machine noise
hits all of them); the figures are median rows/s (and the best pass of each, the least disturbed by
other load). Raw pyarrow and the in-process reader run on core 0
(like the training run they are compared with). With workers, the training process stays on core 0
and its workers may use every core (they are started unpinned; the main process is pinned again
after the first batch): that is what workers are for. The reader yields the training order as one
rank (96 virtual shards interleaved into every batch, data_pipes/order.py). It then trains DLRM with
MLET (k=64, d=16) on the same data for a few steps on core 0, so the reader's rate can be compared
with what training consumes (target: reader >= 5x the training rate at batch 2048).

By default a Criteo-shaped synthetic data set (13 dense, 26 sparse, 2M rows, row groups of 8192) is
generated into a temporary directory. With much fewer rows each of the 96 shards is shorter than a
row group, so the first window of batches decodes the whole split before a worker hands anything
over: a start-up cost that real data sets (Criteo: ~470K rows per shard) do not have.

    python benchmarks/reader_throughput.py --json                # one JSON line; ~3 min on a quiet machine
    python benchmarks/reader_throughput.py --data data/demo --batch-size 2048 --repeats 5

Each pass also records CPU time per row, in the training process and in its workers (``getrusage``),
which moves less with the machine's load than wall time: ``*_cpu_ns_per_row`` medians in the JSON.
``measure_reader(root, split, batch_size)`` is importable by other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable without `pip install -e .`
    sys.path.insert(0, str(REPO))

import pyarrow.parquet as pq  # noqa: E402

from data_pipes.reader import ParquetBatchReader, make_dataloader  # noqa: E402
from data_pipes.schema import METADATA_FILE, DatasetMeta  # noqa: E402


@dataclass(frozen=True)
class Pass:
    """One pass: wall-clock rows/s, and CPU ns per row in this process (all its threads) and in its
    worker processes (``getrusage`` of the reaped children). CPU per row moves less with the machine's
    load than wall time does."""

    rows_per_s: float
    main_cpu_ns_per_row: float
    worker_cpu_ns_per_row: float


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_reader(
    root: Path | str,
    split: str,
    batch_size: int,
    *,
    validate: bool = True,
    num_workers: int = 0,
    drop_last: bool = True,
) -> Pass:
    """One pass of ParquetBatchReader over ``split`` (Batches built, nothing else done), in this process
    on core 0, or with ``num_workers`` worker processes free to use every core."""

    reader = ParquetBatchReader(root, split, batch_size, drop_last=drop_last, validate=validate)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)) if num_workers else {0})
    start, cpu, children = time.perf_counter(), time.process_time(), _children_cpu_s()
    batches = iter(make_dataloader(reader, num_workers) if num_workers else reader)
    rows = next(batches).labels.shape[0]  # workers start unpinned on the first next()
    os.sched_setaffinity(0, {0})
    for batch in batches:
        rows += batch.labels.shape[0]
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return Pass(rows / wall, 1e9 * cpu / rows, 1e9 * (_children_cpu_s() - children) / rows)  # workers reaped


def measure_raw(root: Path | str, split: str) -> Pass:
    """``ParquetFile.read_row_group`` over every row group of ``split`` (Arrow tables only)."""
    meta = DatasetMeta.load(root)
    columns = [meta.label, *meta.dense, *meta.sparse_names()]
    rows = 0
    start, cpu = time.perf_counter(), time.process_time()
    for path in meta.files(root, split):
        with pq.ParquetFile(path) as pf:
            for g in range(pf.num_row_groups):
                rows += pf.read_row_group(g, columns=columns).num_rows
    return Pass(rows / (time.perf_counter() - start), 1e9 * (time.process_time() - cpu) / rows, 0.0)


def measure_training(root: Path | str, batch_size: int, steps: int, run_dir: Path, k: int = 64, d: int = 16) -> float:
    """Samples/s of `mlet train` (DLRM, MLET k x d, one process pinned to one core) on the same data."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "mlet_torchrec.cli",
        "train",
        "--config",
        str(REPO / "configs/demo.yaml"),
        f"data.path={root}",
        f"run.dir={run_dir}",
        f"train.batch_size={batch_size}",
        f"train.max_steps={steps}",
        f"embedding.k={k}",
        f"embedding.d={d}",
        "train.progress=false",
        "train.eval_batch_size=65536",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run(["taskset", "-c", "0", *cmd], check=True, env=env, capture_output=True, cwd=REPO)
    return json.loads((run_dir / "metrics.json").read_text())["samples_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="data set (default: generate a synthetic one)")
    ap.add_argument("--rows", type=int, default=2_000_000, help="rows of the generated data set")
    ap.add_argument("--multi-hot", type=int, default=0, help="multi-hot features of the generated data set")
    ap.add_argument("--split", default="train")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--workers", type=int, nargs="*", default=[1, 2], help="also measure with these DataLoader worker counts"
    )
    ap.add_argument(
        "--train-steps", type=int, default=40, help="steps of the training-throughput run to compare with (0: skip)"
    )
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--json", action="store_true", help="print only one JSON line of the figures on stdout")
    args = ap.parse_args()
    say = print if not args.json else lambda *a, **k: print(*a, **k, file=sys.stderr)

    os.sched_setaffinity(0, {0})  # one core, like the training run it is compared with

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data
        if root is None or not (root / METADATA_FILE).is_file():
            from data_pipes.synth import SynthConfig, generate

            root = root or Path(tmp) / "synth"
            cfg = SynthConfig(rows=args.rows, multi_hot_features=args.multi_hot)
            start = time.perf_counter()
            generate(cfg, root, progress=False)
            say(f"generated {cfg.rows:,} rows in {time.perf_counter() - start:.1f} s into {root}", flush=True)
        meta = DatasetMeta.load(root)
        say(
            f"{args.split}: {meta.rows.get(args.split, '?'):,} rows, {len(meta.dense)} dense, "
            f"{len(meta.sparse)} sparse ({sum(f.multi_hot for f in meta.sparse)} multi-hot), "
            f"batch {args.batch_size}",
            flush=True,
        )

        kinds = {
            "raw": lambda: measure_raw(root, args.split),
            "reader": lambda: measure_reader(root, args.split, args.batch_size),
            "reader_no_validate": lambda: measure_reader(root, args.split, args.batch_size, validate=False),
        }
        for w in args.workers:
            kinds[f"workers_{w}"] = lambda w=w: measure_reader(root, args.split, args.batch_size, num_workers=w)
        for fn in kinds.values():  # warm the page cache and lazy imports
            fn()
        passes: dict[str, list[Pass]] = {k: [] for k in kinds}
        for _ in range(args.repeats):
            for name, fn in kinds.items():
                passes[name].append(fn())
        samples = {k: [p.rows_per_s for p in v] for k, v in passes.items()}
        medians = {k: statistics.median(v) for k, v in samples.items()}
        cpu = {  # median CPU ns per row: this process, and (with workers) the worker processes
            f"{k}_{part}_cpu_ns_per_row": round(statistics.median(getattr(p, f"{part}_cpu_ns_per_row") for p in v))
            for k, v in passes.items()
            for part in ("main", "worker")
            if part == "main" or k.startswith("workers_")
        }
        train_sps = (
            measure_training(root, args.batch_size, args.train_steps, Path(tmp) / "train") if args.train_steps else None
        )
    raw = medians["raw"]
    for name, value in medians.items():
        say(
            f"{name:>24}: {value:>12,.0f} rows/s   ({value / raw:.2f} x raw, {value / medians['reader']:.2f} x reader)"
            f"   CPU ns/row: main {cpu[f'{name}_main_cpu_ns_per_row']}"
            + (f", workers {cpu[f'{name}_worker_cpu_ns_per_row']}" if name.startswith("workers_") else "")
        )
    if train_sps is not None:
        say(
            f"training (DLRM, MLET k=64 d=16, batch {args.batch_size}, 1 core): {train_sps:,.0f} samples/s; "
            f"reader / training = {medians['reader'] / train_sps:.1f}x (target >= 5x)"
        )
    best = {f"{k}_best_rows_per_s": round(max(v)) for k, v in samples.items()}  # the least disturbed pass
    figures = (
        {f"{k}_rows_per_s": round(v) for k, v in medians.items()}
        | best
        | cpu
        | {
            "reader_over_raw": round(medians["reader"] / raw, 3),
            **{f"workers_{w}_over_reader": round(medians[f"workers_{w}"] / medians["reader"], 3) for w in args.workers},
            "training_samples_per_s": train_sps,
            "rows": meta.rows.get(args.split),
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "samples": {k: [round(x) for x in v] for k, v in samples.items()},
            "load_average_1m": round(os.getloadavg()[0], 1),
        }
    )
    if args.json:
        print(json.dumps(figures))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
