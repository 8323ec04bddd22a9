"""World-size-independent data order, end to end on real gloo processes.

A run handed from 2 ranks to 1, then to 3, then back to 2 (three resumes, one across an epoch
boundary) reads at every global step the rows the uninterrupted 1-process run reads, and ends at its
test AUC (within 1e-5). Row groups are 50 rows, never a multiple of a local batch (48, 24 or 16
rows), so no alignment makes this pass by luck.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from data_pipes.synth import SynthConfig, generate
from mlet_torchrec.config import ExperimentConfig, load_config
from mlet_torchrec.training.launcher import run_local

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BATCH = 48  # splits evenly over 1, 2 and 3 ranks
STEPS_PER_EPOCH = 25  # 1200 train rows // 48 (the last 0 rows dropped)
TOTAL = 2 * STEPS_PER_EPOCH


def worker(config: dict[str, Any], out: str) -> dict[str, Any]:
    """Train ``config`` on this rank, writing the rows (dense values) of every step's batch."""
    import os

    from mlet_torchrec.training.train import train

    rank = int(os.environ.get("RANK", "0"))
    trace = open(Path(out) / f"rows.rank{rank}.jsonl", "a")

    def hook(ev) -> None:  # type: ignore[no-untyped-def]
        trace.write(
            json.dumps(
                {
                    "step": ev.step,
                    "epoch": ev.epoch,
                    "batches": ev.batches_in_epoch,
                    "rows": ev.batch.dense_features.tolist(),
                }
            )
            + "\n"
        )
        trace.flush()

    try:
        return train(ExperimentConfig.model_validate(config), hooks=[hook]).summary()
    finally:
        trace.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("order") / "data"
    generate(
        SynthConfig(
            rows=1500,
            num_dense=3,
            num_sparse=4,
            min_cardinality=10,
            max_cardinality=300,
            multi_hot_features=1,
            row_group_size=50,
            row_groups_per_file=5,
            seed=3,
        ),
        out,
        progress=False,
    )
    return out


def _config(dataset: Path, run_dir: Path, *extra: str) -> ExperimentConfig:
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.path={dataset}",
            f"run.dir={run_dir}",
            "embedding.sharding=table_wise",
            "sparse_optimizer.name=rowwise_adagrad",
            "sparse_optimizer.lr=0.05",
            "dense_optimizer.name=adam",
            "dense_optimizer.lr=0.01",
            "data.shuffle=true",
            f"train.batch_size={BATCH}",
            "train.epochs=2",
            "train.checkpoint_every=5",
            "train.seed=4",
            *extra,
        ],
    )


def _launch(cfg: ExperimentConfig, nproc: int, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    return run_local(nproc, partial(worker, cfg.model_dump(mode="json"), str(out)))


def _global_rows(out: Path, nproc: int) -> dict[int, list[list[float]]]:
    """step -> the sorted rows every rank read at that step, checking each rank read BATCH / nproc."""
    steps: dict[int, list[list[float]]] = {}
    for rank in range(nproc):
        for line in (out / f"rows.rank{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            assert len(rec["rows"]) == BATCH // nproc
            epoch, before = divmod(rec["step"] - 1, STEPS_PER_EPOCH)
            assert (rec["epoch"], rec["batches"]) == (epoch, before + 1)
            steps.setdefault(rec["step"], []).extend(rec["rows"])
    return {s: sorted(rows) for s, rows in steps.items()}


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory) -> dict[str, Any]:
    """The whole run on 1 process: its summary and the rows of every step."""
    base = tmp_path_factory.mktemp("whole")
    summary = _launch(_config(dataset, base / "run"), 1, base / "out")
    assert summary["steps"] == TOTAL
    return {"summary": summary, "rows": _global_rows(base / "out", 1)}


@pytest.fixture(scope="module")
def handed_over(dataset, tmp_path_factory) -> list[dict[str, Any]]:
    """2 ranks to step 10, 1 rank to 30 (across the epoch boundary), 3 ranks to 40, 2 ranks to the end."""
    base = tmp_path_factory.mktemp("handed")
    legs, start = [], 0
    for i, (nproc, stop) in enumerate([(2, 10), (1, 30), (3, 40), (2, None)]):
        extra = [] if stop is None else [f"train.max_steps={stop}"]
        summary = _launch(_config(dataset, base / "run", *extra), nproc, base / f"out{i}")
        assert summary["start_step"] == start and summary["steps"] == (stop or TOTAL)
        legs.append({"nproc": nproc, "summary": summary, "rows": _global_rows(base / f"out{i}", nproc)})
        start = stop or TOTAL
    return legs


def test_one_two_and_three_ranks_read_the_same_rows_at_every_step(uninterrupted, handed_over):
    reference = uninterrupted["rows"]
    assert sorted(reference) == list(range(1, TOTAL + 1))
    epoch0 = [tuple(r) for s in range(1, STEPS_PER_EPOCH + 1) for r in reference[s]]
    epoch1 = [tuple(r) for s in range(STEPS_PER_EPOCH + 1, TOTAL + 1) for r in reference[s]]
    assert len(set(epoch0)) == len(epoch0) == STEPS_PER_EPOCH * BATCH  # every row once per epoch
    assert set(epoch0) == set(epoch1) and epoch0 != epoch1  # reshuffled
    steps = []
    for leg in handed_over:  # steps 1-10 and 41-50 on 2 ranks, 11-30 on 1, 31-40 on 3
        assert all(leg["rows"][s] == reference[s] for s in leg["rows"]), f"{leg['nproc']} ranks read other rows"
        steps += sorted(leg["rows"])
    assert steps == list(range(1, TOTAL + 1))


def test_resumes_across_world_sizes_reach_the_uninterrupted_auc(uninterrupted, handed_over):
    got, want = handed_over[-1]["summary"]["test"]["auc"], uninterrupted["summary"]["test"]["auc"]
    assert abs(got - want) < 1e-5, (got, want)
