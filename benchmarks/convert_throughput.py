"""Converter throughput: ``mlet convert criteo --jobs 1`` vs ``--jobs 2``, side by side, same input.

Generates synthetic Criteo-format text (``convert_memory.generate_criteo_text``: 13 dense, 26
categorical columns shaped like the real ones, default 2M rows) and converts it in vocabulary mode
(``--min-count 10``: both passes) with 1 and 2 processes, alternating, ``--repeats`` times each; the
figures are median rows/s and their ratio ``jobs_2_over_1``, and the CPU seconds of all processes
(what the second process costs in work, whatever else loads the machine). Each conversion of the pair is checked
to give the same data set (metadata and every Parquet file's row groups and content digest), so the
speed-up is for the same output.

    python benchmarks/convert_throughput.py --json            # one JSON line
    python benchmarks/convert_throughput.py --rows 500000 --repeats 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):  # runnable without `pip install -e .`
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import pyarrow.parquet as pq  # noqa: E402
from convert_memory import generate_criteo_text  # noqa: E402

from data_pipes.convert.criteo import convert_criteo  # noqa: E402
from data_pipes.schema import DatasetMeta  # noqa: E402


def digest(root: Path) -> str:
    """A digest of a data set: metadata (inputs' rows and options) and each file's row groups and data."""
    meta = DatasetMeta.load(root)
    h = hashlib.sha256(json.dumps([meta.rows, meta.splits, meta.cardinalities()], sort_keys=True).encode())
    for split in meta.splits:
        for path in meta.files(root, split):
            pf = pq.ParquetFile(path)
            h.update(str([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]).encode())
            for g in range(pf.num_row_groups):
                for col in pf.read_row_group(g).columns:
                    for chunk in col.chunks:
                        for buf in chunk.buffers():
                            if buf is not None:
                                h.update(buf)
    return h.hexdigest()


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the conversion's workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def convert(text: Path, out: Path, jobs: int, min_count: int) -> tuple[float, float]:
    """Rows/s and CPU seconds (all processes) of one conversion (the output is left at ``out``)."""
    shutil.rmtree(out, ignore_errors=True)
    start, cpu = time.perf_counter(), cpu_seconds()
    result = convert_criteo(text, out, min_count=min_count, jobs=jobs, progress=False)
    return result.rows_read / (time.perf_counter() - start), cpu_seconds() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-count", type=int, default=10)
    ap.add_argument("--json", action="store_true", help="print only one JSON line of the figures on stdout")
    args = ap.parse_args()
    say = print if not args.json else lambda *a, **k: print(*a, **k, file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "train.txt"
        generate_criteo_text(text, args.rows)
        say(f"{args.rows:,} rows of Criteo text, {text.stat().st_size / 2**20:.0f} MiB", flush=True)
        samples: dict[int, list[float]] = {1: [], 2: []}
        cpu: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(args.repeats):
            digests = set()
            for jobs in samples:
                rate, seconds = convert(text, Path(tmp) / f"out{jobs}", jobs, args.min_count)
                samples[jobs].append(rate)
                cpu[jobs].append(seconds)
                digests.add(digest(Path(tmp) / f"out{jobs}"))
                say(f"--jobs {jobs}: {rate:,.0f} rows/s, {seconds:.1f} CPU s", flush=True)
            if len(digests) != 1:
                raise SystemExit("--jobs 2 wrote another data set than --jobs 1")
    med = {j: statistics.median(v) for j, v in samples.items()}
    figures = {
        "rows": args.rows,
        "min_count": args.min_count,
        "jobs_1_rows_per_s": round(med[1]),
        "jobs_2_rows_per_s": round(med[2]),
        "jobs_2_over_1": round(med[2] / med[1], 3),
        "jobs_1_cpu_s": round(statistics.median(cpu[1]), 2),
        "jobs_2_cpu_s": round(statistics.median(cpu[2]), 2),
        "same_output": True,
        "samples": {f"jobs_{j}": [round(x) for x in v] for j, v in samples.items()},
    }
    say(f"--jobs 2 / --jobs 1: {figures['jobs_2_over_1']:.2f}x (target >= 1.6)")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
