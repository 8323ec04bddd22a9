"""``make gpu-check``: everything a GPU machine must show, in one command of at most 8 minutes on one GPU.

1. the CUDA-marked tests (``pytest -m cuda``);
2. a tiny train -> collapse -> evaluate on nccl (one process, one GPU);
3. training throughput at global batch 8192, single-layer d=16 vs MLET k=64 (alternating runs, median).

It prints a short table and writes it (Markdown, with the machine) to ``--output``. Without CUDA it prints one
line saying so and exits 0: nothing to check on this machine.

    python benchmarks/gpu_check.py --output benchmarks/results/gpu_check.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 480


def _mlet(args: list[str], timeout: float) -> tuple[int, str, float]:
    """Run ``mlet ARGS`` in a child process: (exit status, last lines of its output, seconds)."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mlet_torchrec.cli", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=max(1.0, timeout),
            check=False,
        )
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        return proc.returncode, tail, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s", time.perf_counter() - t0


class Check:
    """The rows of the table, and how much of the budget is left."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.perf_counter() + budget_s
        self.rows: list[tuple[str, str, str]] = []

    def left(self) -> float:
        return self.end - time.perf_counter()

    def add(self, what: str, result: str, detail: str) -> None:
        self.rows.append((what, result, detail))
        print(f"{what}: {result} ({detail})", flush=True)


def cuda_tests(check: Check) -> None:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=min(180.0, check.left()),
            check=False,
        )
        last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        result = {0: "pass", 5: "none collected"}.get(proc.returncode, "FAIL")
    except subprocess.TimeoutExpired:
        last, result = "timed out", "FAIL"
    check.add("CUDA-marked tests", result, f"{last}; {time.perf_counter() - t0:.0f} s")


def pipeline(check: Check, tmp: Path) -> None:
    """synth -> train (nccl) -> collapse -> evaluate, each step a real `mlet` command."""
    data, run, collapsed = tmp / "tiny", tmp / "run", tmp / "collapsed"
    steps = [
        (
            "synth",
            ["synth", "--output", str(data), "rows=8000", "num_sparse=4", "max_cardinality=200", "row_group_size=512"],
        ),
        ("train", ["train", "--config", "tiny", "--input", str(data), "--output", str(run), "run.device=cuda"]),
        ("collapse", ["collapse", "--input", str(run), "--output", str(collapsed)]),
        ("evaluate", ["evaluate", "--input", str(collapsed)]),
    ]
    for name, args in steps:
        rc, tail, _ = _mlet(args, min(120.0, check.left()))
        if rc != 0:
            check.add(f"tiny {name} on nccl", "FAIL", f"exit {rc}: {tail[-300:]}")
            return
    metrics = json.loads((run / "metrics.json").read_text())
    auc = (metrics.get("test") or {}).get("auc")
    check.add(
        "tiny train -> collapse -> evaluate on nccl",
        "pass",
        f"test AUC {auc:.4f}" if auc is not None else "no test split",
    )


def throughput(check: Check, tmp: Path, batch: int, steps: int, repeats: int) -> dict[str, list[float]]:
    data = tmp / "bench"
    rc, tail, _ = _mlet(
        ["synth", "--output", str(data), "rows=200000", "num_sparse=26", "num_dense=13", "max_cardinality=100000"],
        min(180.0, check.left()),
    )
    if rc != 0:
        check.add("throughput data", "FAIL", tail[-300:])
        return {}
    sps: dict[str, list[float]] = {"single-layer d=16": [], "MLET d=16 k=64": []}
    for rep in range(repeats):
        for name, k in (("single-layer d=16", "null"), ("MLET d=16 k=64", "64")):
            if check.left() < 60:
                break
            run = tmp / f"tp-{k}-{rep}"
            rc, tail, _ = _mlet(
                [
                    "train",
                    "--config",
                    "demo",
                    "--input",
                    str(data),
                    "--output",
                    str(run),
                    "embedding.d=16",
                    f"embedding.k={k}",
                    f"train.batch_size={batch}",
                    "train.epochs=20",
                    f"train.max_steps={steps}",
                    "train.progress=false",
                    "run.device=cuda",
                    "train.eval_batch_size=65536",
                ],
                min(150.0, check.left()),
            )
            if rc != 0:
                check.add(f"throughput {name}", "FAIL", tail[-300:])
                return sps
            sps[name].append(json.loads((run / "metrics.json").read_text())["samples_per_second"])
    for name, values in sps.items():
        if values:
            check.add(
                f"throughput {name}, batch {batch}",
                f"{statistics.median(values):,.0f} samples/s",
                f"median of {len(values)} run(s) of {steps} steps, warm-up included",
            )
    return sps


def table(check: Check, device: str) -> str:
    lines = [
        f"# gpu-check on {device}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {w} | {r} | {d.replace('|', '/')} |" for w, r, d in check.rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.md")
    ap.add_argument("--batch-size", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="stop starting new checks after this")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device is visible (torch " + torch.__version__ + "); nothing to check here")
        return 0
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    check = Check(args.budget_s)
    env_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one GPU, whatever the machine has
    try:
        cuda_tests(check)
        with tempfile.TemporaryDirectory(prefix="mlet-gpu-check-") as tmp:
            pipeline(check, Path(tmp))
            sps = throughput(check, Path(tmp), args.batch_size, args.steps, args.repeats)
    finally:
        if env_before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    base, mlet = sps.get("single-layer d=16"), sps.get("MLET d=16 k=64")
    if base and mlet:
        ratio = statistics.median(mlet) / statistics.median(base)
        check.add("MLET / single-layer throughput", f"{ratio:.2f}", f"batch {args.batch_size}")
    text = table(check, device)
    from mlet_torchrec.io import atomic_write_text

    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, text)
    print(text + f"wrote {args.output}")
    return 1 if any(r[1] == "FAIL" for r in check.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
