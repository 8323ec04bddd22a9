"""Incremental training: ``run.init_from`` starts a run from another run's model and optimizer state (bit for bit),
reads its own data set from the start and continues the step count and learning-rate schedule."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from test_transform import _criteo_raw

from data_pipes.convert import convert_criteo
from mlet_torchrec.config import ConfigError, load_config
from mlet_torchrec.serving.artifact import load_artifact
from mlet_torchrec.training.train import train


def _config(data: Path, run: Path, *more: str):
    base = [
        f"data.path={data}",
        f"run.dir={run}",
        "data.shuffle=false",  # every epoch reads the rows in one order: epoch 1 of a run == epoch 0 of a warm start
        "sparse_optimizer.name=adagrad",  # state that moves the weights: loaded or not shows in them
        "dense_optimizer.name=adam",
        "train.log_every=1000",
    ]
    return load_config("tiny", [*base, *more])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_artifact(run).materialize().state_dict()


@pytest.mark.slow
def test_warm_start_continues_bit_for_bit_and_refuses_other_transforms(tmp_path):
    _criteo_raw(tmp_path / "day0.tsv", 700, random.Random(5))
    data = tmp_path / "day0"
    convert_criteo(tmp_path / "day0.tsv", data, min_count=1, progress=False)
    # a warmup longer than both epochs: each step's learning rate depends on its number, so a warm start that
    # counted its steps from 0 again would train with other rates (a resume may change train.epochs under it)
    warmup = "train.warmup_steps=64"
    first = train(_config(data, tmp_path / "a", "train.epochs=1", warmup))
    n = first.steps
    assert n > 3

    # a new run started from the first one's state, one epoch of the data from its start ...
    warm = train(_config(data, tmp_path / "b", "train.epochs=1", warmup, f"run.init_from={tmp_path / 'a'}"))
    # ... trains exactly what the first run does in its second epoch, resumed in place
    resumed = train(_config(data, tmp_path / "a", "train.epochs=2", warmup))
    assert warm.steps == resumed.steps == 2 * n < 64 and warm.start_step == n
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # tomorrow's rows, converted with the first run's transform: accepted; a fresh conversion: refused
    _criteo_raw(tmp_path / "day1.tsv", 300, random.Random(6))
    convert_criteo(tmp_path / "day1.tsv", tmp_path / "day1", features_from=data, split_name="train", progress=False)
    more = train(
        _config(tmp_path / "day1", tmp_path / "c", "train.max_steps=2", warmup, f"run.init_from={tmp_path / 'a'}")
    )
    assert more.steps == 2 * n + 2
    convert_criteo(tmp_path / "day1.tsv", tmp_path / "fresh", min_count=1, progress=False)
    with pytest.raises(ConfigError, match="its feature transform .* is not the one the checkpoint was trained with"):
        train(_config(tmp_path / "fresh", tmp_path / "d", f"run.init_from={tmp_path / 'a'}"))
    with pytest.raises(ConfigError, match=r"embedding.k: 16 in the checkpoint, 32 now"):
        train(_config(data, tmp_path / "e", "embedding.k=32", f"run.init_from={tmp_path / 'a'}"))


@pytest.mark.slow
def test_a_stopped_warm_start_resumes_to_the_same_state_as_an_uninterrupted_one(synth_dataset, tmp_path):
    """The step a warm start began at is resume state (``TrainState.first_step``): a warm-started run
    stopped after 2 steps and resumed with ``train.max_steps=4`` ends where one that ran 4 steps ends
    (a constant learning rate: a decay's length follows ``train.max_steps``)."""
    data = synth_dataset()
    n = train(_config(data, tmp_path / "a", "train.epochs=1")).steps
    start = [f"run.init_from={tmp_path / 'a'}", "train.checkpoint_every=1", "train.lr_decay=none"]
    stopped = train(_config(data, tmp_path / "b", *start, "train.max_steps=2"))
    assert stopped.steps == n + 2
    resumed = train(_config(data, tmp_path / "b", *start, "train.max_steps=4"))
    assert (resumed.start_step, resumed.steps) == (n + 2, n + 4)
    straight = train(_config(data, tmp_path / "c", *start, "train.max_steps=4"))
    assert straight.steps == n + 4
    a, b = _weights(tmp_path / "b"), _weights(tmp_path / "c")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
