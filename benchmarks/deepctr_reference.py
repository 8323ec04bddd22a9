"""The DeepCTR-Torch side of ``benchmarks/deepctr_compare.py``: runs only inside ``benchmarks/.venv-deepctr``.

    benchmarks/.venv-deepctr/bin/python benchmarks/deepctr_reference.py SETUP.json < runs.jsonl

SETUP names a Parquet data set of this project (``data_pipes/schema.py``) and the shared settings (d,
threads, lr, batch size, epochs). The data is read once; then every stdin line ``{impl, model, seed,
kwargs}`` trains that DeepCTR-Torch model with its own ``fit`` and answers one JSON line on stdout:
test AUC / LogLoss (scikit-learn) and training samples/s (rows / seconds of ``fit``). DeepCTR's own
prints go to stderr, so stdout carries only answers.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import requests
import torch


class _NoReply:
    status_code = 0  # not requests.codes.ok: deepctr_torch's check_version then stays silent


# deepctr_torch (0.3.0) asks PyPI for its latest version in a thread on import; keep the benchmark offline
requests.get = lambda *args, **kwargs: _NoReply()

from deepctr_torch.inputs import DenseFeat, SparseFeat  # noqa: E402
from deepctr_torch.models import DCN, NFM, WDL, AutoInt, DeepFM, xDeepFM  # noqa: E402
from sklearn.metrics import log_loss, roc_auc_score  # noqa: E402

MODELS = {"dcn": DCN, "deepfm": DeepFM, "wdl": WDL, "nfm": NFM, "autoint": AutoInt, "xdeepfm": xDeepFM}


def load_split(root: str, meta: dict, split: str) -> dict[str, np.ndarray]:
    tables = [pq.read_table(os.path.join(root, f)) for f in meta["splits"][split]]
    names = [meta["label"], *meta["dense"], *(s["name"] for s in meta["sparse"])]
    return {n: np.concatenate([t.column(n).to_numpy() for t in tables]) for n in names}


def main(setup_path: str) -> None:
    job = json.loads(open(setup_path).read())
    root = job["data"]
    meta = json.loads(open(os.path.join(root, "metadata.json")).read())
    bags = [s["name"] for s in meta["sparse"] if s.get("multi_hot")]
    if bags:
        raise SystemExit(f"multi-hot features {bags} are not supported by this comparison (use single-id data)")
    torch.set_num_threads(job["threads"])
    train, test = load_split(root, meta, "train"), load_split(root, meta, "test")
    columns = [SparseFeat(s["name"], vocabulary_size=s["cardinality"], embedding_dim=job["d"]) for s in meta["sparse"]]
    columns += [DenseFeat(n, 1) for n in meta["dense"]]
    x_train = {c.name: train[c.name] for c in columns}
    x_test = {c.name: test[c.name] for c in columns}
    y_train, y_test = train[meta["label"]].astype(np.float32), test[meta["label"]].astype(np.float64)
    for line in sys.stdin:
        if not line.strip():
            continue
        run = json.loads(line)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # fit() prints the device and a banner
            np.random.seed(run["seed"])
            model = MODELS[run["model"]](columns, columns, seed=run["seed"], device="cpu", **run["kwargs"])
            model.compile(torch.optim.Adagrad(model.parameters(), lr=job["lr"], eps=job["eps"]), "binary_crossentropy")
            t1 = time.perf_counter()
            model.fit(x_train, y_train, batch_size=job["batch_size"], epochs=job["epochs"], verbose=0, shuffle=True)
            fit_seconds = time.perf_counter() - t1
            probs = model.predict(x_test, batch_size=job["eval_batch_size"]).reshape(-1).astype(np.float64)
        finite = bool(np.isfinite(probs).all())
        probs = np.clip(np.nan_to_num(probs, nan=0.5), 1e-7, 1 - 1e-7)
        rows = len(y_train) * job["epochs"]
        print(
            json.dumps(
                {
                    **run,
                    "test_auc": float(roc_auc_score(y_test, probs)),
                    "test_logloss": float(log_loss(y_test, probs)),
                    "train_rows": rows,
                    "train_seconds": fit_seconds,
                    "samples_per_second": rows / fit_seconds,
                    "wall_seconds": time.perf_counter() - t0,
                    "finite": finite and math.isfinite(fit_seconds),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1])
