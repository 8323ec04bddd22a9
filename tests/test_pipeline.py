"""The pipelined training loop on real gloo processes (2 ranks).

TrainPipelineSparseDist pipelines the MLET model's sharded W1 (row-wise here; W2 stays replicated) and
trains exactly what the plain loop trains: the same loss at every step and the same test metrics.
A checkpoint written (in the background) while two batches were in flight resumes exactly: the resumed
run reads the batches the uninterrupted one read and ends at its metrics.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from mlet_torchrec.config import ExperimentConfig, load_config
from mlet_torchrec.training.launcher import run_local

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 14


def worker(config: dict[str, Any], out: str) -> dict[str, Any]:
    """Train on this rank, tracing every step: loss, the batch's ids and how W1 and W2 are held."""
    import os
    import zlib

    from mlet_torchrec.training.train import train

    rank = int(os.environ.get("RANK", "0"))
    trace = open(Path(out) / f"trace.rank{rank}.jsonl", "a")

    def hook(ev) -> None:  # type: ignore[no-untyped-def]
        mlet = ev.model.module.net.sparse_arch.embedding_bag_collection
        kjt = ev.batch.sparse_features
        trace.write(
            json.dumps(
                {
                    "step": ev.step,
                    "loss": ev.loss,
                    "ids": zlib.crc32(kjt.values().numpy().tobytes()) ^ zlib.crc32(kjt.lengths().numpy().tobytes()),
                    "w1": type(mlet.w1).__name__,
                    "w1_forward": type(mlet.w1.forward).__name__,
                    "w2": {n: list(p.shape) for n, p in mlet.w2.items()},
                }
            )
            + "\n"
        )
        trace.flush()

    try:
        return train(ExperimentConfig.model_validate(config), hooks=[hook]).summary()
    finally:
        trace.close()


def _config(dataset: Path, run_dir: Path, *extra: str) -> ExperimentConfig:
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={dataset}",
            f"run.dir={run_dir}",
            "embedding.sharding=row_wise",
            "embedding.k=8",
            "sparse_optimizer.name=rowwise_adagrad",
            "sparse_optimizer.lr=0.05",
            "dense_optimizer.name=adam",
            "dense_optimizer.lr=0.01",
            "train.batch_size=64",
            f"train.max_steps={STEPS}",
            "train.checkpoint_every=4",
            "train.eval_every=6",
            "train.log_every=5",
            "train.keep_checkpoints=5",
            "train.seed=3",
            *extra,
        ],
    )


def _launch(cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    return run_local(2, partial(worker, cfg.model_dump(mode="json"), str(out)))


def _trace(out: Path, rank: int) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in map(json.loads, (out / f"trace.rank{rank}.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(synth_dataset, tmp_path_factory) -> dict[str, Any]:
    data = synth_dataset()
    base = tmp_path_factory.mktemp("pipeline")
    got: dict[str, Any] = {}
    for kind in ("none", "sparse_dist"):
        extra = ["train.async_checkpoint=true"] if kind == "sparse_dist" else []
        summary = _launch(_config(data, base / kind, f"train.pipeline={kind}", *extra), base / f"out_{kind}")
        got[kind] = {"summary": summary, "run": base / kind, "out": base / f"out_{kind}"}
    got["data"], got["base"] = data, base
    return got


def test_sparse_dist_pipelines_sharded_w1_and_trains_what_the_plain_loop_trains(runs):
    for rank in (0, 1):
        plain, piped = _trace(runs["none"]["out"], rank), _trace(runs["sparse_dist"]["out"], rank)
        assert sorted(piped) == list(range(1, STEPS + 1))
        for step in piped:
            assert piped[step]["w1"] == "ShardedEmbeddingBagCollection"
            assert piped[step]["w1_forward"] == "PipelinedForward"  # the pipeline feeds W1's lookup
            assert plain[step]["w1_forward"] == "method"
            assert piped[step]["w2"] and all(shape == [8, 4] for shape in piped[step]["w2"].values())  # whole
            assert piped[step]["ids"] == plain[step]["ids"]
            assert piped[step]["loss"] == pytest.approx(plain[step]["loss"], rel=1e-5, abs=1e-7)
    a, b = runs["none"]["summary"]["test"], runs["sparse_dist"]["summary"]["test"]
    assert b["auc"] == pytest.approx(a["auc"], abs=1e-6) and b["logloss"] == pytest.approx(a["logloss"], abs=1e-6)


def test_resume_from_a_checkpoint_written_with_batches_in_flight_is_exact(runs):
    whole = runs["sparse_dist"]
    resumed_dir = runs["base"] / "resumed"
    shutil.copytree(whole["run"], resumed_dir)
    # keep step 8 (written in the background while batches 9 and 10 were fetched) as the newest
    for later in ("step_00000012", "step_00000014"):
        shutil.rmtree(resumed_dir / "checkpoints" / later)
    (resumed_dir / "checkpoints" / "LATEST").unlink()
    summary = _launch(_config(runs["data"], resumed_dir, "train.pipeline=sparse_dist"), runs["base"] / "out_resumed")
    assert summary["start_step"] == 8 and summary["steps"] == STEPS
    for rank in (0, 1):
        ref, got = _trace(whole["out"], rank), _trace(runs["base"] / "out_resumed", rank)
        assert sorted(got) == list(range(9, STEPS + 1))
        assert all(
            got[s]["ids"] == ref[s]["ids"] and got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=1e-6) for s in got
        )
    assert summary["test"]["auc"] == pytest.approx(whole["summary"]["test"]["auc"], abs=1e-6)
