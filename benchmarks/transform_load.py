"""Size, load time and lookup speed of a feature transform's memory-mapped vocabulary (data_pipes/transform.py).

Builds one vocabulary of N random 64-bit value hashes (ids a permutation of 1..N), saves the transform, and
times ``FeatureTransform.load`` without and with the sha256 check of its files, then one million lookups (half
of them hits) on the loaded, memory-mapped vocabulary; the load-with-check / load-without ratio is printed last.

    python benchmarks/transform_load.py                # 10M values
    python benchmarks/transform_load.py --values 30000000 --json

Measured on 2 CPU cores shared with other jobs (files in the page cache), 10M values, two runs:

    120,000,256 bytes on disk (12.0 per value); save 0.87 s; load 0.003 s (no check), 0.331 s (sha256 checked);
    1M lookups 0.44 s
    120,000,256 bytes on disk (12.0 per value); save 0.70 s; load 0.005 s (no check), 1.112 s (sha256 checked);
    1M lookups 1.06 s; checked / unchecked load 216x
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from data_pipes.convert.vocab import Vocabulary
from data_pipes.transform import FeatureTransform, LabelSpec, RawColumn, SparseSource


def measure(values: int, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 2**63, size=values, dtype=np.uint64))
    vocab = Vocabulary(keys=keys, ids=rng.permutation(len(keys)).astype(np.int64) + 1, distinct=len(keys))
    transform = FeatureTransform.from_encoders(
        "criteo",
        [RawColumn(name="C1", type="token")],
        LabelSpec(column="label", rule="0 or 1"),
        [],
        [(SparseSource("C1", "C1"), vocab)],
    )
    out: dict[str, float] = {"values": float(len(keys))}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        transform.save(d)
        out["save_s"] = time.perf_counter() - t0
        out["bytes"] = float(sum(p.stat().st_size for p in (Path(d) / "vocab").iterdir()))
        for verify in (False, True):
            t0 = time.perf_counter()
            loaded = FeatureTransform.load(d, verify=verify)
            out[f"load_{'checked' if verify else 'unchecked'}_s"] = time.perf_counter() - t0
        queries = rng.integers(0, 2**63, size=1_000_000, dtype=np.uint64)
        queries[:500_000] = keys[rng.integers(0, len(keys), 500_000)]
        t0 = time.perf_counter()
        loaded.encoders["C1"].lookup(queries)
        out["lookup_1m_s"] = time.perf_counter() - t0
    out["checked_over_unchecked"] = out["load_checked_s"] / max(out["load_unchecked_s"], 1e-9)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--values", type=int, default=10_000_000)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    r = measure(args.values)
    if args.json:
        print(json.dumps(r))
        return
    print(
        f"{r['bytes']:,.0f} bytes on disk ({r['bytes'] / r['values']:.1f} per value); save {r['save_s']:.2f} s; "
        f"load {r['load_unchecked_s']:.3f} s (no check), {r['load_checked_s']:.3f} s (sha256 checked); "
        f"1M lookups {r['lookup_1m_s']:.2f} s; checked / unchecked load {r['checked_over_unchecked']:.0f}x"
    )


if __name__ == "__main__":
    main()
