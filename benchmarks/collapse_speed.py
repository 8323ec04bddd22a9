"""Speed of the collapse product against the memory-bound limit, measured in one run.

    .venv/bin/python benchmarks/collapse_speed.py                    # 4M x 64 -> 16, FP32
    .venv/bin/python benchmarks/collapse_speed.py --rows 1000000 --k 128 --d 32 --json out.json

W = W1 @ W2 on a tall table reads W1 (n x k) once and writes W (n x d), so its floor is a pass over
W1. Every variant is timed in the same process, interleaved over the repetitions (best of N), and
reported as a ratio to a plain copy of the same W1 into a preallocated buffer (read n x k, write
n x k: a generous yardstick, the product writes only n x d):

* ``naive``: ``W1 @ W2`` in one call (what a straightforward collapse does),
* ``blocked``: :func:`mlet_torchrec.modules.product.mlet_product` (row blocks, FP32), the collapse's kernel,
* ``blocked-fp64``: the same with float64 accumulation (``mlet collapse --accumulate float64``),
* ``engine``: :func:`mlet_torchrec.serving.sharded_product.collapse_boxes` on one box (the whole per-table path,
  including allocating and first-touching its n x d output, which the copy yardstick does not pay).

More yardsticks: reading W1 once (a sum), cloning it into a fresh buffer (page faults included),
and first-touching a fresh n x d buffer (``torch.empty(n, d).fill_(0)``: what the engine pays on top of
the kernel for its output, since a collapse must produce a new table). ``engine - first touch``
is the engine's own cost next to the kernel's. On a shared machine, run it when the cores are idle: with
other processes on the cores, multi-threaded BLAS calls stall at every parallel region (compare
``--threads 1``).

Target: blocked <= 3x the copy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlet_torchrec.modules.product import mlet_product  # noqa: E402
from mlet_torchrec.options import BLOCK_ROWS  # noqa: E402
from mlet_torchrec.serving.layout import Box  # noqa: E402
from mlet_torchrec.serving.sharded_product import collapse_boxes  # noqa: E402


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=4_000_000)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--block-rows", type=int, nargs="*", default=[4096, BLOCK_ROWS, 65536])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(args.rows, args.k, generator=g)
    w2 = torch.randn(args.k, args.d, generator=g) * 0.25
    copy_dst = torch.empty_like(w1)
    out = torch.empty(args.rows, args.d)
    box_in, box_out = Box(0, 0, args.rows, args.k, 0), Box(0, 0, args.rows, args.d, 0)

    methods: dict[str, Callable[[], object]] = {
        "copy W1": lambda: copy_dst.copy_(w1),
        "read W1 (sum)": lambda: w1.sum(),
        "clone W1 (fresh buffer)": lambda: w1.clone(),
        "first touch n x d (fresh)": lambda: torch.empty(args.rows, args.d).fill_(0.0),
        "naive W1 @ W2": lambda: w1 @ w2,
        "naive mm(out=)": lambda: torch.mm(w1, w2, out=out),
    }
    for b in args.block_rows:
        methods[f"blocked {b}"] = lambda b=b: mlet_product(w1, w2, out=out, block_rows=b)
    methods[f"blocked-fp64 {BLOCK_ROWS}"] = lambda: mlet_product(
        w1, w2, out=out, block_rows=BLOCK_ROWS, accumulate=torch.float64
    )
    methods["engine (collapse_boxes)"] = lambda: collapse_boxes({box_in: w1}, [box_in], [box_out], w2, rank=0)

    best = {name: float("inf") for name in methods}
    for fn in methods.values():  # warm-up: page faults, BLAS init
        fn()
    for _ in range(args.repeat):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)

    ref = (w1[:1000].double() @ w2.double()).float()
    mlet_product(w1, w2, out=out, block_rows=BLOCK_ROWS)
    assert torch.allclose(out[:1000], ref, atol=1e-4, rtol=1e-4)

    copy = best["copy W1"]
    gib = w1.numel() * 4 / 2**30
    print(
        f"W1 {args.rows:,} x {args.k} (FP32, {gib:.2f} GiB) @ W2 {args.k} x {args.d}; "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    )
    print(f"{'variant':<28}{'seconds':>10}{'x copy':>10}{'GiB/s of W1':>14}")
    for name, t in best.items():
        print(f"{name:<28}{t:>10.4f}{t / copy:>10.2f}{gib / t:>14.1f}")
    blocked = min(t for n, t in best.items() if n.startswith("blocked ") and not n.startswith("blocked-fp64"))
    verdict = "meets" if blocked / copy <= 3 else "misses"
    engine, touch = best["engine (collapse_boxes)"], best["first touch n x d (fresh)"]
    print(
        f"best blocked / copy = {blocked / copy:.2f} ({verdict} the <= 3x target); "
        f"naive / copy = {best['naive W1 @ W2'] / copy:.2f}; engine / copy = {engine / copy:.2f}, of which "
        f"first-touching the fresh output = {touch / copy:.2f}; engine / clone W1 = "
        f"{engine / best['clone W1 (fresh buffer)']:.2f}"
    )
    result = {
        "rows": args.rows,
        "k": args.k,
        "d": args.d,
        "threads": torch.get_num_threads(),
        "seconds": best,
        "ratio_to_copy": {n: t / copy for n, t in best.items()},
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
