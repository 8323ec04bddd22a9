"""Our DeepCTR-style models vs DeepCTR-Torch itself: test AUC and training samples/s on the same Parquet data.

    .venv/bin/python benchmarks/deepctr_compare.py                      # the default run (~15 min on 2 cores)
    .venv/bin/python benchmarks/deepctr_compare.py --models deepfm --seeds 0 1 2 --epochs 2

What runs (everything is recorded in the results file, with this command):

- Data: planted synthetic Parquet (``data_pipes.synth``), by default 100k rows, 8 sparse features of
  10..1000 ids, 4 dense; generated once into ``data/deepctr_compare``. Both sides read these files.
- DeepCTR-Torch (``deepctr-torch`` 0.3.0, torch 2.13.0) in its own virtual environment
  ``benchmarks/.venv-deepctr``, created on first use from ``benchmarks/requirements-deepctr.txt`` (exact
  pins) and driven by ``benchmarks/deepctr_reference.py``, which trains each model with its ``fit``.
- Ours: the product's ``mlet_torchrec.training.train.train`` (TorchRec DMP, fused sparse optimizer, Parquet
  reader in the timed loop), single-layer baseline (``embedding.k=null``) and MLET (``embedding.k=--k``),
  in one process by default (``--ours-nproc 2`` runs 2 ranks through ``train_local``).
- Matched: d, every model hyper-parameter (our ``ModelConfig`` defaults are DeepCTR-Torch's, passed to
  both sides), Adagrad lr 0.02 / eps 1e-10 for every parameter, batch size, epochs, intra-op threads
  (``--threads``, both sides; ``init_distributed`` would give a lone process every core). DeepCTR's
  ``l2_reg_*`` are set to 0 because ours has no such penalty. Initialisation too: ours runs with
  ``embedding.init=normal embedding.init_std=1e-4``, DeepCTR-Torch's N(0, 1e-4^2) for every table.
- Runs interleave (DeepCTR, ours baseline, ours MLET for one model and seed, then the next), so the noise
  of a shared machine hits every implementation alike. samples/s is training rows over the seconds of the
  training loop (DeepCTR: ``fit``; ours: ``TrainResult.samples_per_second``), reported as the median.

``--max-cardinality`` sets the largest table (default 1,000 rows); the committed results have 1,000 and
1,000,000 (``--data data/deepctr_compare_vocab1m --out benchmarks/results/deepctr_compare_vocab1m``).
``--threads 2 --ours-nproc 2`` compares on two cores: DeepCTR with 2 intra-op threads, ours on 2 ranks.

``--init-diagnostic`` adds our two variants once more with ``embedding.init=uniform`` (TorchRec's and
DLRM's U(+-1/sqrt(n)) for every table): with it, single-layer DeepFM and NFM lose 0.014-0.018 AUC to
DeepCTR-Torch, which is why the DeepCTR-style configs use the normal init.

Writes ``benchmarks/results/deepctr_compare.json`` and ``.md``. DLRM and DLRM-DCN are not compared:
DeepCTR-Torch has neither (its DCNMix is a different model).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipes.schema import METADATA_FILE, DatasetMeta  # noqa: E402
from data_pipes.synth import SynthConfig, generate  # noqa: E402
from mlet_torchrec.config import load_config  # noqa: E402
from mlet_torchrec.models.configs import ModelConfig  # noqa: E402

VENV = REPO / "benchmarks" / ".venv-deepctr"
REQUIREMENTS = REPO / "benchmarks" / "requirements-deepctr.txt"
WORKER = REPO / "benchmarks" / "deepctr_reference.py"
COMPARED = ["dcn", "deepfm", "wdl", "nfm", "autoint", "xdeepfm"]
NO_L2 = {"l2_reg_linear": 0.0, "l2_reg_embedding": 0.0, "l2_reg_dnn": 0.0}


def deepctr_kwargs(name: str, cfg: ModelConfig) -> dict[str, Any]:
    """DeepCTR-Torch constructor arguments equal to our model config (same keys, same meaning)."""
    dnn = {"dnn_hidden_units": cfg.dnn_units(), "dnn_dropout": cfg.dnn_dropout}
    if name == "dcn":
        return {
            **dnn,
            **NO_L2,
            "l2_reg_cross": 0.0,
            "cross_num": cfg.cross_num,
            "cross_parameterization": cfg.cross_parameterization,
        }
    if name in ("deepfm", "wdl"):
        return {**dnn, **NO_L2}
    if name == "nfm":
        return {**dnn, **NO_L2, "bi_dropout": cfg.bi_dropout}
    if name == "autoint":  # DeepCTR's AutoInt fixes l2_reg_linear=0 itself
        return {
            **dnn,
            "l2_reg_embedding": 0.0,
            "l2_reg_dnn": 0.0,
            "att_layer_num": cfg.att_layer_num,
            "att_head_num": cfg.att_head_num,
            "att_res": cfg.att_res,
        }
    if name == "xdeepfm":
        return {
            **dnn,
            **NO_L2,
            "l2_reg_cin": 0.0,
            "cin_layer_size": cfg.cin_layer_size,
            "cin_split_half": cfg.cin_split_half,
        }
    raise ValueError(f"{name} has no DeepCTR-Torch counterpart here; compared: {COMPARED}")


def ensure_venv(log: Path) -> dict[str, str]:
    """Create/refresh benchmarks/.venv-deepctr from the pinned requirements; return its package versions."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = VENV / ".requirements.sha256"
    python = VENV / "bin" / "python"
    if not (stamp.is_file() and stamp.read_text() == digest and python.exists()):
        print(f"creating {VENV.relative_to(REPO)} from {REQUIREMENTS.relative_to(REPO)} (once)", flush=True)
        with open(log, "a") as out:
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True, stdout=out, stderr=out)
            proc = subprocess.run(
                [str(python), "-m", "pip", "install", "-r", str(REQUIREMENTS)], stdout=out, stderr=out
            )
        if proc.returncode != 0:
            raise RuntimeError(
                f"pip could not install {REQUIREMENTS.name} into {VENV} (exit {proc.returncode}); "
                f"see {log}:\n" + "".join(log.read_text().splitlines(True)[-15:])
            )
        stamp.write_text(digest)
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    return dict(line.split("==", 1) for line in freeze.split() if "==" in line)


class DeepCTRWorker:
    """benchmarks/deepctr_reference.py in the DeepCTR venv: one JSON line in, one JSON line out per run."""

    def __init__(self, setup: dict[str, Any], workdir: Path, log: Path) -> None:
        (workdir / "deepctr_setup.json").write_text(json.dumps(setup))
        self._log = open(log, "a")
        self.proc = subprocess.Popen(
            [str(VENV / "bin" / "python"), str(WORKER), str(workdir / "deepctr_setup.json")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.log = log

    def run(self, run: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(run) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self._log.flush()
            tail = "".join(self.log.read_text().splitlines(True)[-20:])
            raise RuntimeError(
                f"the DeepCTR-Torch worker stopped (exit {self.proc.poll()}); its log {self.log}:\n{tail}"
            )
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self._log.close()


def pin_threads(threads: int) -> None:
    """Make our in-process runs use ``threads`` intra-op threads, as the DeepCTR side does."""
    import torch

    import mlet_torchrec.training.distributed as distributed_module

    original = distributed_module.init_distributed

    def init_distributed(device: str = "auto"):
        ctx = original(device)
        torch.set_num_threads(threads)
        return ctx

    # train() joins its group through distributed.process_group, which looks this name up at call time
    distributed_module.init_distributed = init_distributed


def run_ours(
    name: str, k: int | None, seed: int, args: argparse.Namespace, workdir: Path, init: str = "normal"
) -> dict[str, Any]:
    from mlet_torchrec.training.launcher import train_local
    from mlet_torchrec.training.train import train

    run_dir = workdir / f"{name}-{k}-{seed}-{init}"
    cfg = load_config(
        None,
        [
            f"data.path={args.data}",
            f"run.dir={run_dir}",
            "run.device=cpu",
            f"model.name={name}",
            f"embedding.d={args.d}",
            f"embedding.k={'null' if k is None else k}",
            f"embedding.sigma={args.sigma}",
            f"embedding.init={init}",
            "embedding.init_std=1e-4",
            "sparse_optimizer.name=adagrad",
            f"sparse_optimizer.lr={args.lr}",
            f"sparse_optimizer.eps={args.eps}",
            "dense_optimizer.name=adagrad",
            f"dense_optimizer.lr={args.lr}",
            f"dense_optimizer.eps={args.eps}",
            f"train.batch_size={args.batch_size}",
            f"train.epochs={args.epochs}",
            f"train.seed={seed}",
            f"train.eval_batch_size={args.eval_batch_size}",
            "train.progress=false",
            "train.log_every=1000000",
        ],
    )
    t0 = time.perf_counter()
    if args.ours_nproc == 1:
        result = train(cfg).summary()
    else:
        result = train_local(cfg, args.ours_nproc)
    test = result["test"]
    return {
        "impl": ("ours_mlet" if k is not None else "ours_baseline") + ("_uniform_init" if init == "uniform" else ""),
        "model": name,
        "seed": seed,
        "k": k,
        "test_auc": test["auc"],
        "test_logloss": test["logloss"],
        "train_rows": result["steps"] * args.batch_size,
        "train_seconds": result["train_seconds"],
        "samples_per_second": result["samples_per_second"],
        "wall_seconds": time.perf_counter() - t0,
        "finite": all(math.isfinite(test[m]) for m in ("auc", "logloss")),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        out[model] = {}
        for impl in dict.fromkeys(r["impl"] for r in runs):
            rs = [r for r in runs if r["model"] == model and r["impl"] == impl]
            if not rs:
                continue
            auc = [r["test_auc"] for r in rs]
            sps = [r["samples_per_second"] for r in rs]
            out[model][impl] = {
                "seeds": [r["seed"] for r in rs],
                "auc_mean": statistics.fmean(auc),
                "auc_std": statistics.stdev(auc) if len(auc) > 1 else 0.0,
                "logloss_mean": statistics.fmean(r["test_logloss"] for r in rs),
                "samples_per_second_median": statistics.median(sps),
                "samples_per_second_all": sps,
            }
        ref = out[model].get("deepctr")
        for impl, s in out[model].items():
            if ref is None or impl == "deepctr":
                continue
            noise = math.sqrt(s["auc_std"] ** 2 / len(s["seeds"]) + ref["auc_std"] ** 2 / len(ref["seeds"]))
            s["vs_deepctr"] = {
                "auc_delta": s["auc_mean"] - ref["auc_mean"],
                "auc_noise_2se": 2 * noise,
                "auc_no_worse_within_noise": s["auc_mean"] - ref["auc_mean"] >= -2 * noise,
                "speedup": s["samples_per_second_median"] / ref["samples_per_second_median"],
            }
    return out


IMPL_NAMES = {
    "deepctr": "DeepCTR-Torch",
    "ours_baseline": "ours, single-layer",
    "ours_mlet": "ours, MLET",
    "ours_baseline_uniform_init": "ours, single-layer, uniform init (diagnostic)",
    "ours_mlet_uniform_init": "ours, MLET, uniform init (diagnostic)",
}


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "# Our DeepCTR-style models vs DeepCTR-Torch",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Data: `{s['data']}` (rows: {s['data_rows']}; {s['features']}); oracle test AUC {s['oracle_test_auc']:.4f}. "
        f"d={s['d']}, MLET k={s['k']} (sigma {s['sigma']}), Adagrad lr {s['lr']} eps {s['eps']} on every parameter, "
        f"batch {s['batch_size']}, {s['epochs']} epoch(s), seeds {s['seeds']}, {s['threads']} intra-op thread(s) "
        f"per process, ours on {s['ours_nproc']} process(es). DeepCTR-Torch {s['deepctr_torch']} with torch "
        f"{s['deepctr_venv_torch']}; ours torch {s['torch']}, torchrec {s['torchrec']}. DeepCTR's l2_reg_* = 0 "
        "(ours has none); model hyper-parameters are DeepCTR-Torch's defaults on both sides.",
        "",
        f"Machine: {s['machine']}; load average {s['loadavg_start']} at the start, {s['loadavg_end']} at the end "
        "(shared machine: samples/s are medians of interleaved runs).",
        "",
        "| model | implementation | test AUC (mean ± std) | test LogLoss | train samples/s (median) "
        "| ΔAUC vs DeepCTR (2·SE) | speed vs DeepCTR |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, impls in results["summary"].items():
        for impl, v in impls.items():
            cmp = v.get("vs_deepctr")
            delta = f"{cmp['auc_delta']:+.4f} ({cmp['auc_noise_2se']:.4f})" if cmp else ""
            speed = f"{cmp['speedup']:.2f}x" if cmp else ""
            lines.append(
                f"| {model} | {IMPL_NAMES.get(impl, impl)} | {v['auc_mean']:.4f} ± {v['auc_std']:.4f} | "
                f"{v['logloss_mean']:.4f} | {v['samples_per_second_median']:,.0f} | {delta} | {speed} |"
            )
    if s.get("init_diagnostic"):
        lines += [
            "",
            "Diagnostic rows: ours with `embedding.init=uniform` (U(+-1/sqrt(n)), TorchRec's and DLRM's "
            "init) instead of DeepCTR-Torch's N(0, 1e-4^2).",
        ]
    lines += [
        "",
        "Why the speed depends on the vocabulary: DeepCTR-Torch's `BaseModel` builds every table as a dense "
        "`nn.Embedding(sparse=False)` trained by a dense optimizer, so each step writes every row of every "
        "table; ours (TorchRec, FBGEMM's fused optimizer) updates only the rows the batch looked up. With "
        "tables of <= 1,000 rows both are bound by per-step framework overhead; with 10^5-10^6-row tables, "
        "as in Criteo or Avazu, DeepCTR's step time grows with the table size and ours does not.",
    ]
    lines += ["", f"Per-run figures: `{results.get('json_name', 'deepctr_compare.json')}`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=COMPARED, choices=COMPARED)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--data", type=Path, default=REPO / "data" / "deepctr_compare")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--num-sparse", type=int, default=8)
    ap.add_argument("--num-dense", type=int, default=4)
    ap.add_argument("--max-cardinality", type=int, default=1000)
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--eps", type=float, default=1e-10)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--eval-batch-size", type=int, default=4096)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process, both sides")
    ap.add_argument("--ours-nproc", type=int, default=1, help="ranks for our runs (1: in this process)")
    ap.add_argument(
        "--init-diagnostic",
        action="store_true",
        help="also run ours with embedding.init=uniform (TorchRec's table initialisation)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "deepctr_compare")
    args = ap.parse_args()
    command = " ".join(
        shlex.quote(a) for a in [os.path.relpath(sys.executable, REPO), os.path.relpath(__file__, REPO), *sys.argv[1:]]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = args.out.with_suffix(".log")
    log.write_text(f"$ {command}\n")
    loadavg_start = [round(x, 2) for x in os.getloadavg()]

    synth = SynthConfig(
        rows=args.rows,
        num_dense=args.num_dense,
        num_sparse=args.num_sparse,
        min_cardinality=10,
        max_cardinality=args.max_cardinality,
        seed=0,
    )
    if (args.data / METADATA_FILE).is_file():
        if DatasetMeta.load(args.data).source.get("config") != synth.model_dump():
            raise SystemExit(f"{args.data} holds other data; remove it or pass --data")
    else:
        generate(synth, args.data, progress=False)
    meta = DatasetMeta.load(args.data)

    versions = ensure_venv(log)
    import torch
    import torchrec

    from mlet_torchrec.logs import configure_logging

    configure_logging(False)
    logging.getLogger("mlet").setLevel(logging.WARNING)
    if args.ours_nproc == 1:
        pin_threads(args.threads)

    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="deepctr_compare_") as tmp:
        workdir = Path(tmp)
        worker = DeepCTRWorker(
            {
                "data": str(args.data),
                "threads": args.threads,
                "d": args.d,
                "lr": args.lr,
                "eps": args.eps,
                "batch_size": args.batch_size,
                "epochs": args.epochs,
                "eval_batch_size": args.eval_batch_size,
            },
            workdir,
            log,
        )
        try:
            for seed in args.seeds:
                for name in args.models:
                    model_cfg = load_config(None, [f"model.name={name}"]).model
                    runs.append(
                        worker.run(
                            {"impl": "deepctr", "model": name, "seed": seed, "kwargs": deepctr_kwargs(name, model_cfg)}
                        )
                    )
                    variants = [
                        (k, init) for init in ("normal", "uniform")[: 1 + args.init_diagnostic] for k in (None, args.k)
                    ]
                    for k, init in variants:
                        with contextlib.redirect_stdout(sys.stderr):
                            runs.append(run_ours(name, k, seed, args, workdir, init))
                    for r in runs[-1 - len(variants) :]:
                        print(
                            f"seed {seed} {name:8s} {r['impl']:26s} AUC {r['test_auc']:.4f} "
                            f"LogLoss {r['test_logloss']:.4f} {r['samples_per_second']:9,.0f} samples/s",
                            flush=True,
                        )
        finally:
            worker.close()

    results = {
        "command": command,
        "settings": {
            "data": os.path.relpath(args.data, REPO),
            "data_rows": " / ".join(f"{split} {n:,}" for split, n in meta.rows.items()),
            "features": f"{len(meta.sparse)} sparse of {min(meta.cardinalities().values())}.."
            f"{max(meta.cardinalities().values())} ids, {len(meta.dense)} dense",
            "oracle_test_auc": meta.source["oracle"]["test"]["auc"],
            **{
                k: getattr(args, k)
                for k in (
                    "d",
                    "k",
                    "sigma",
                    "lr",
                    "eps",
                    "batch_size",
                    "epochs",
                    "seeds",
                    "threads",
                    "ours_nproc",
                    "models",
                    "init_diagnostic",
                )
            },
            "deepctr_torch": versions.get("deepctr-torch"),
            "deepctr_venv_torch": versions.get("torch"),
            "torch": torch.__version__,
            "torchrec": getattr(torchrec, "__version__", "?"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "loadavg_start": loadavg_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "deepctr_venv_packages": versions,
        },
        "json_name": args.out.with_suffix(".json").name,
        "summary": summarise(runs),
        "runs": runs,
    }
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
