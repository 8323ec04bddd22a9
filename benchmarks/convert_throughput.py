"""Converter throughput: ``mlet convert criteo --jobs 1`` vs ``--jobs 2`` (and, with ``--ranks``, 2 ranks of a
torchrun job: the path of the TorchX ``convert`` component), side by side, same input.

Generates synthetic Criteo-format text (``convert_memory.generate_criteo_text``: 13 dense, 26
categorical columns shaped like the real ones, default 2M rows) and converts it in vocabulary mode
(``--min-count 10``: both passes) with 1 and 2 processes, alternating, ``--repeats`` times each; the
figures are median rows/s and their ratio ``jobs_2_over_1``, the CPU seconds of all processes
(what the second process costs in work, whatever else loads the machine), and ``*_cores``: CPU seconds
over wall seconds, the cores a conversion got (on a machine shared with other work, ``jobs_2`` can only
beat ``jobs_1`` by as much as it got more cores). Each conversion of the pair is checked
to give the same data set (metadata and every Parquet file's row groups and content digest), so the
speed-up is for the same output.

    python benchmarks/convert_throughput.py --json            # one JSON line
    python benchmarks/convert_throughput.py --rows 500000 --repeats 1 --ranks

``--ranks`` adds ``ranks_2_rows_per_s`` and ``ranks_2_over_1``: ``torchrun --nproc-per-node 2 -m mlet_torchrec.cli
convert criteo ...`` timed from start to exit (torchrun's and the ranks' start-up included, as a user sees it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
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


def convert(text: Path, out: Path, variant: str, min_count: int) -> tuple[float, float]:
    """Rows/s and CPU seconds (all processes) of one conversion (the output is left at ``out``):
    ``variant`` is ``jobs_N`` (in this process, N workers) or ``ranks_N`` (N ranks under torchrun)."""
    shutil.rmtree(out, ignore_errors=True)
    kind, n = variant.split("_")
    start, cpu = time.perf_counter(), cpu_seconds()
    if kind == "jobs":
        rows = convert_criteo(text, out, min_count=min_count, jobs=int(n), progress=False).rows_read
    else:
        torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", n, "-m", "mlet_torchrec.cli"]
        args = ["convert", "criteo", "--input", str(text), "--output", str(out), "--min-count", str(min_count)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "LOGLEVEL": "WARNING"}
        subprocess.run(torchrun + args, env=env, check=True, capture_output=True)
        rows = sum(i["rows"] for i in DatasetMeta.load(out).source["inputs"])
    return rows / (time.perf_counter() - start), cpu_seconds() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-count", type=int, default=10)
    ap.add_argument("--ranks", action="store_true", help="also 2 ranks under torchrun (the TorchX component's path)")
    ap.add_argument("--json", action="store_true", help="print only one JSON line of the figures on stdout")
    args = ap.parse_args()
    say = print if not args.json else lambda *a, **k: print(*a, **k, file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "train.txt"
        generate_criteo_text(text, args.rows)
        say(f"{args.rows:,} rows of Criteo text, {text.stat().st_size / 2**20:.0f} MiB", flush=True)
        variants = ["jobs_1", "jobs_2"] + (["ranks_2"] if args.ranks else [])
        samples: dict[str, list[float]] = {v: [] for v in variants}
        cpu: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            digests = set()
            for v in variants:
                rate, seconds = convert(text, Path(tmp) / v, v, args.min_count)
                samples[v].append(rate)
                cpu[v].append(seconds)
                digests.add(digest(Path(tmp) / v))
                say(f"{v}: {rate:,.0f} rows/s, {seconds:.1f} CPU s, {seconds * rate / args.rows:.2f} cores", flush=True)
            if len(digests) != 1:
                raise SystemExit(f"{', '.join(variants[1:])} wrote another data set than --jobs 1")
    med = {v: statistics.median(x) for v, x in samples.items()}
    figures: dict[str, object] = {"rows": args.rows, "min_count": args.min_count}
    for v in variants:
        figures[f"{v}_rows_per_s"] = round(med[v])
        if v != "jobs_1":
            figures[f"{v}_over_1"] = round(med[v] / med["jobs_1"], 3)
    for v in variants:
        figures[f"{v}_cpu_s"] = round(statistics.median(cpu[v]), 2)
    for v in variants:  # CPU seconds / wall seconds of each run (wall = rows / rate)
        cores = [c * r / args.rows for c, r in zip(cpu[v], samples[v], strict=True)]
        figures[f"{v}_cores"] = round(statistics.median(cores), 2)
    figures |= {"same_output": True, "samples": {v: [round(x) for x in samples[v]] for v in variants}}
    say(f"--jobs 2 / --jobs 1: {figures['jobs_2_over_1']:.2f}x (target >= 1.6)")
    if args.ranks:
        say(f"2 ranks / --jobs 1: {figures['ranks_2_over_1']:.2f}x")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
