"""Latency and throughput of ``mlet serve`` next to calling the scripted model in-process.

Converts the Criteo sample (../shared/data/criteo_kaggle), trains the tiny DLRM on it for a few steps, collapses
and exports it (``--int8``), then measures, in one run on the same machine:

- in-process: the export's dict-signature module called on already encoded rows (the model alone), and called on
  raw rows encoded by the export's transform in every call (encode + model, no HTTP);
- ``mlet serve`` (its own process, 127.0.0.1, a free port): raw rows as JSON over HTTP/1.1 keep-alive, from 1
  and 8 concurrent client threads;

at 1, 16 and 256 rows per request (call): p50/p99 latency and rows/s, and serve's rows/s as a ratio of each
in-process rows/s at the same rows per call (target at 256 rows: >= 0.7 of the model alone). Every loop is
bounded in requests (``--requests``) and in seconds (``--seconds``); the server is stopped at the end.

    python benchmarks/serve_latency.py                        # table; --json for the figures
    python benchmarks/serve_latency.py --precision fp32 --seconds 5
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "criteo_kaggle"
SIZES = (1, 16, 256)
CLIENTS = (1, 8)


def _columns() -> list[str]:
    from data_pipes.convert.criteo import COLUMNS

    return list(COLUMNS)


def build_export(root: Path, data: Path) -> Path:
    """Criteo sample -> data set -> tiny DLRM (20 steps) -> collapse -> INT8 export."""
    from data_pipes.convert.criteo import convert_criteo
    from mlet_torchrec.config import load_config
    from mlet_torchrec.serving.collapse import collapse
    from mlet_torchrec.serving.export import export
    from mlet_torchrec.training.train import train

    convert_criteo(data / "train.tsv", root / "data", progress=False)
    cfg = load_config("tiny", [f"data.path={root / 'data'}", f"run.dir={root / 'run'}", "train.max_steps=20"])
    train(cfg)
    collapse(root / "run", root / "collapsed", check_split=None)
    export(root / "collapsed", root / "export", int8=True, check=False)
    return root / "export"


def raw_rows(data: Path, n: int) -> list[dict[str, str]]:
    """``n`` raw rows of the sample's valid file (cycled), as a client sends them: empty fields left out."""
    names = _columns()
    with open(data / "valid.tsv", newline="") as f:
        rows = [
            {k: v for k, v in zip(names, line, strict=True) if v != "" and k != "label"}
            for line in csv.reader(f, delimiter="\t")
        ]
    return [rows[i % len(rows)] for i in range(n)]


def _stats(latencies: list[float], rows: int, seconds: float) -> dict[str, float]:
    lat = np.array(latencies) * 1e3
    return {
        "requests": len(latencies),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "rows_per_s": rows / seconds,
    }


def in_process(
    export_dir: Path, rows: list[dict[str, str]], precision: str, requests: int, seconds: float, encode: bool
) -> dict[str, float]:
    """The scripted module called in this process, one call after another: on rows encoded once (``encode``
    False: the model alone) or encoding the raw rows with the export's transform in every call (what a caller
    scoring raw rows in its own process does)."""
    from data_pipes.transform import FeatureTransform
    from mlet_torchrec.serving.server import RowScorer

    scorer = RowScorer(export_dir, precision)
    transform = FeatureTransform.load(export_dir)
    batch = scorer.batch(transform.encode(rows))
    latencies: list[float] = []
    start = time.perf_counter()
    with torch.inference_mode():
        while len(latencies) < requests and time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            scorer.module(scorer.batch(transform.encode(rows)) if encode else batch)
            latencies.append(time.perf_counter() - t0)
    return _stats(latencies, len(rows) * len(latencies), time.perf_counter() - start)


def _client(port: int, body: bytes, stop_at: float, budget: int, out: list[float]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        while len(out) < budget and time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise RuntimeError(f"mlet serve answered {resp.status}")
            out.append(time.perf_counter() - t0)
    finally:
        conn.close()


def over_http(port: int, rows: list[dict[str, str]], clients: int, requests: int, seconds: float) -> dict[str, float]:
    """``clients`` threads, each with one keep-alive connection, sending requests of ``rows``."""
    size = len(rows)
    body = json.dumps({"rows": rows}).encode()
    per_client: list[list[float]] = [[] for _ in range(clients)]
    start = time.perf_counter()
    threads = [
        threading.Thread(target=_client, args=(port, body, start + seconds, max(1, requests // clients), out))
        for out in per_client
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    latencies = [x for out in per_client for x in out]
    return _stats(latencies, size * len(latencies), time.perf_counter() - start)


def start_server(export_dir: Path, precision: str) -> tuple[subprocess.Popen[str], int]:
    cmd = [sys.executable, "-m", "mlet_torchrec.cli", "serve", "--input", str(export_dir), "--port", "0"]
    proc = subprocess.Popen([*cmd, "--precision", precision], stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stderr is not None
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr or []], daemon=True).start()
    found = re.search(r"on http://127\.0\.0\.1:(\d+)", lines.get(timeout=300))
    if not found:
        proc.kill()
        raise RuntimeError("mlet serve did not start")
    return proc, int(found.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="int8", choices=["int8", "fp32"])
    p.add_argument("--requests", type=int, default=2000, help="requests per measurement, at most")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per measurement, at most")
    p.add_argument("--data", type=Path, default=DATA, help="the Criteo sample (train.tsv, valid.tsv)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        export_dir = build_export(Path(d), args.data)
        rows = {size: raw_rows(args.data, size) for size in SIZES}
        for size in SIZES:
            for encode in (False, True):
                key = f"inprocess_{'encode_' if encode else ''}{size}"
                results[key] = in_process(export_dir, rows[size], args.precision, args.requests, args.seconds, encode)
        proc, port = start_server(export_dir, args.precision)
        try:
            for size in SIZES:
                for clients in CLIENTS:
                    r = over_http(port, rows[size], clients, args.requests, args.seconds)
                    r["ratio_to_inprocess"] = r["rows_per_s"] / results[f"inprocess_{size}"]["rows_per_s"]
                    r["ratio_to_inprocess_encode"] = r["rows_per_s"] / results[f"inprocess_encode_{size}"]["rows_per_s"]
                    results[f"serve_{size}_{clients}"] = r
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    if args.json:
        print(json.dumps({"precision": args.precision, "results": results}, indent=2))
        return
    print(f"{'':24} {'p50 ms':>8} {'p99 ms':>8} {'rows/s':>10} {'/ model':>8} {'/ encode+model':>14}")
    for key, r in results.items():
        a = f"{r['ratio_to_inprocess']:.2f}x" if "ratio_to_inprocess" in r else ""
        b = f"{r['ratio_to_inprocess_encode']:.2f}x" if "ratio_to_inprocess_encode" in r else ""
        print(f"{key:24} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['rows_per_s']:10,.0f} {a:>8} {b:>14}")


if __name__ == "__main__":
    main()
