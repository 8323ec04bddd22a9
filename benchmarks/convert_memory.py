"""Peak memory and speed of ``mlet convert criteo`` as the input grows: it should not grow with the rows.

Generates synthetic Criteo-format text (label, I1..I13, C1..C26; tab separated; empty fields) of N rows
for each N (default 1M and 10M), converts each in a fresh child process, and reports the child's peak
RSS (``os.wait4`` rusage, i.e. the kernel's high-water mark) and rows/s, then the ratio of the peak RSS
of the largest to the smallest input.

Categorical values are drawn (skewed, Zipf-like) from fixed per-column pools shaped like the real
Criteo columns (3 to ``--max-cardinality`` values), so the vocabularies, which grow with the number of
*distinct* values (16 bytes each while counting; see data_pipes/convert/vocab.py), stay comparable
between sizes, as they do on real logs once the common values have been seen. ``--mode hash`` skips
vocabularies altogether (constant memory by construction).

    python benchmarks/convert_memory.py                      # 1M and 10M rows (10M: ~2.4 GiB of text)
    python benchmarks/convert_memory.py --rows 200000 1000000 --mode both

Measured on 2 shared CPU cores (default 4 MiB blocks; vocab = --min-count 10, hash = --hash-buckets 1000000):

    rows   mode   seconds  rows/s   peak RSS  (distinct values counted)
    1M     vocab     6.2   160,495  238 MiB   1,319,975
    1M     hash      3.1   320,529  234 MiB
    10M    vocab    67.0   149,267  285 MiB   1,483,127
    10M    hash     31.7   315,687  239 MiB
    peak RSS 10M / 1M: vocab 1.20x, hash 1.02x (input 10x)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable without `pip install -e .`
from mlet_torchrec.io import is_ours  # noqa: E402

# distinct values per column of the real Kaggle set (capped by --max-cardinality)
CRITEO_CARDINALITIES = [
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
]
MISSING = [
    0.0,
    0.03,
    0.03,
    0.03,
    0.0,
    0.12,
    0.0,
    0.0,
    0.0,
    0.0,
    0.0,
    0.03,
    0.0,
    0.0,
    0.0,
    0.03,
    0.0,
    0.0,
    0.44,
    0.44,
    0.03,
    0.0,
    0.0,
    0.03,
    0.44,
    0.03,
]


def generate_criteo_text(
    path: Path, rows: int, seed: int = 0, max_cardinality: int = 200_000, chunk: int = 250_000
) -> None:
    """Write ``rows`` synthetic Criteo rows to ``path`` (vectorised: ~1M rows/s)."""
    rng = np.random.default_rng(seed)
    pools = []
    for card in CRITEO_CARDINALITIES:
        card = min(card, max_cardinality)
        vals = rng.choice(1 << 32, size=card, replace=False).astype(np.uint32)
        pools.append(pa.array(np.char.mod("%08x", vals)))
    names = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
    opts = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    tmp = path.with_name(path.name + ".part")
    with pa.OSFile(str(tmp), "wb") as f:
        written = 0
        while written < rows:
            n = min(chunk, rows - written)
            cols = [pa.array((rng.random(n) < 0.25).astype(np.int64))]
            for i in range(13):
                x = np.floor(rng.lognormal(1.0 + 0.3 * i, 1.5, n)).astype(np.int64) - (i == 1)
                cols.append(pa.array(x, mask=rng.random(n) < (0.04 + 0.03 * (i % 5))))
            for pool, miss in zip(pools, MISSING, strict=True):
                idx = np.minimum((len(pool) * rng.random(n) ** 3).astype(np.int64), len(pool) - 1)
                col = pool.take(pa.array(idx))
                if miss:
                    col = pc.if_else(pa.array(rng.random(n) < miss), pa.scalar(None, pa.string()), col)
                cols.append(col)
            pcsv.write_csv(pa.Table.from_arrays(cols, names=names), f, write_options=opts)
            written += n
    os.replace(tmp, path)


def run_child_measured(text: Path, out: Path, extra: list) -> dict:
    """Convert ``text`` in a child process; its own peak RSS comes from ``os.wait4`` (RUSAGE_CHILDREN
    would be the maximum over every child so far)."""
    # --overwrite replaces only an earlier output of mlet (never foreign files: mlet_torchrec.io)
    cmd = [
        sys.executable,
        "-m",
        "mlet_torchrec.cli.convert",
        "criteo",
        "--input",
        str(text),
        "--output",
        str(out),
        "--overwrite",
        "--no-progress",
        *extra,
    ]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=so, stderr=se, env=_env())
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read().decode(), se.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"conversion failed ({proc.returncode}): {stderr[-2000:]}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024, "summary": stdout.strip()}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000], help="input sizes")
    ap.add_argument(
        "--mode",
        choices=["vocab", "hash", "both"],
        default="vocab",
        help="vocab: --min-count 10 vocabularies (default); hash: --hash-buckets 1000000",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mlet_convert_bench"))
    ap.add_argument("--max-cardinality", type=int, default=200_000, help="largest per-column value pool")
    ap.add_argument("--keep", action="store_true", help="keep the generated text and outputs")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    modes = ["vocab", "hash"] if args.mode == "both" else [args.mode]
    extra = {"vocab": ["--min-count", "10"], "hash": ["--hash-buckets", "1000000"]}
    results = []
    for rows in sorted(args.rows):
        text = args.workdir / f"criteo_{rows}.tsv"
        generated = not text.exists()
        if generated:
            t0 = time.perf_counter()
            generate_criteo_text(text, rows, max_cardinality=args.max_cardinality)
            print(
                f"generated {rows:,} rows ({text.stat().st_size / 2**20:,.0f} MiB) in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
        for mode in modes:
            out = args.workdir / f"out_{rows}_{mode}"
            r = run_child_measured(text, out, extra[mode])
            meta = json.loads((out / "metadata.json").read_text())
            distinct = sum(f.get("distinct_in_train", 0) for f in meta["source"]["features"].values())
            r.update(
                rows=rows,
                mode=mode,
                input_mib=text.stat().st_size / 2**20,
                rows_per_s=rows / r["seconds"],
                output_mib=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20,
                distinct_values=distinct,
                vocab_counts_mib=16 * distinct / 2**20,
            )
            results.append(r)
            vocab = f"  ({distinct:,} distinct values: {r['vocab_counts_mib']:,.0f} MiB of counts)" if distinct else ""
            print(
                f"{mode:5s} {rows:>11,} rows  {r['input_mib']:8,.0f} MiB in  {r['seconds']:7.1f} s  "
                f"{r['rows_per_s']:>9,.0f} rows/s  peak RSS {r['peak_rss_mib']:7,.0f} MiB{vocab}",
                flush=True,
            )
            if not args.keep and is_ours(out):  # only what this run wrote
                shutil.rmtree(out)
        if not args.keep and generated:
            text.unlink()
    for mode in modes:
        rs = [r for r in results if r["mode"] == mode]
        if len(rs) >= 2:
            small, big = rs[0], rs[-1]
            print(
                f"{mode}: peak RSS {big['rows']:,} rows / {small['rows']:,} rows = "
                f"{big['peak_rss_mib']:,.0f} / {small['peak_rss_mib']:,.0f} MiB = "
                f"{big['peak_rss_mib'] / small['peak_rss_mib']:.2f}x (input {big['rows'] / small['rows']:.0f}x)"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
