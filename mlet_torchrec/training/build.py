"""A run's parts from its config: the checks against the data and the job, the sharded model with its
optimizers, and this rank's train reader (what :class:`~mlet_torchrec.training.trainer.Trainer` builds on).

Example:
    >>> check_config(config, DatasetMeta.load(config.data.path), ctx)   # doctest: +SKIP
    >>> capacity = checked_capacity(meta, config, ctx.world_size, ctx.device)  # doctest: +SKIP
    >>> sharded = shard(config, meta, ctx, capacity)                     # doctest: +SKIP
    >>> reader = train_reader(config, ctx)                               # doctest: +SKIP
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torchrec.distributed.planner.types import PlannerError, PlannerErrorType

from data_pipes.reader import ParquetBatchReader
from data_pipes.schema import DatasetMeta, table_name
from mlet_torchrec.config import ConfigError, ExperimentConfig
from mlet_torchrec.models.registry import build_model
from mlet_torchrec.training.distributed import DistContext, ShardedModel, shard_model
from mlet_torchrec.training.guardrails import tables_do_not_fit
from mlet_torchrec.training.loop import TrainStep


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (the tables' draws and the dense layers' init)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_config(config: ExperimentConfig, meta: DatasetMeta, ctx: DistContext) -> None:
    """What the config asks that this data set or this job cannot give (the one batch-size check)."""
    unknown = set(config.embedding.tables) - set(meta.sparse_names())
    if unknown:
        raise ConfigError(
            f"embedding.tables names features {sorted(unknown)} that data set {config.data.path} does not have; "
            f"its sparse features are {meta.sparse_names()}"
        )
    if config.train.batch_size % ctx.world_size:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} is the global batch and must divide evenly over "
            f"{ctx.world_size} ranks"
        )
    if config.train.bf16_autocast and ctx.device.type != "cuda":
        raise ConfigError(
            "train.bf16_autocast=true needs CUDA (bf16 autocast of the forward); this run is on "
            f"{ctx.device.type}: set train.bf16_autocast=false"
        )


def shard(config: ExperimentConfig, meta: DatasetMeta, ctx: DistContext, capacity: dict[str, int]) -> ShardedModel:
    """The model built on the meta device, planned (or given ``run.plan``) for the memory ``capacity`` per rank
    (:func:`~mlet_torchrec.training.guardrails.checked_capacity`: the caller refuses sizes that cannot fit
    before anything is built), sharded, with its optimizers.

    The pipelines call the model with the batch alone; ``TrainStep`` holds only the model's net, so the
    checkpoint keys are the model's own."""
    net = TrainStep(
        build_model(config.model, config.embedding, meta, device=torch.device("meta")).net,
        bf16=config.train.bf16_autocast,
    )
    given_plan = None
    if config.run.plan is not None:  # `mlet plan`'s plan instead of planning again (refused if made for another run)
        from mlet_torchrec.training.planning import load_plan

        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        given_plan = load_plan(config.run.plan, config, meta, ctx.world_size, ctx.device.type, local_world)
    features = meta.sparse_names()
    try:
        return shard_model(
            net,
            config.embedding,
            features,
            {f: table_name(f) for f in features},
            config.sparse_optimizer,
            config.dense_optimizer,
            ctx,
            capacity=capacity,
            plan=given_plan,
        )
    except PlannerError as e:
        if e.error_type == PlannerErrorType.INSUFFICIENT_STORAGE:
            raise tables_do_not_fit(e, meta, config, ctx.world_size, capacity, ctx.device) from None
        raise


def train_reader(config: ExperimentConfig, ctx: DistContext) -> ParquetBatchReader:
    """This rank's share of the train split: the same global batches at every world size and epoch
    (data_pipes/order.py), so every rank takes the same number of steps, as the all-to-alls need."""
    return ParquetBatchReader(
        config.data.path,
        "train",
        config.train.batch_size // ctx.world_size,
        rank=ctx.rank,
        world_size=ctx.world_size,
        drop_last=True,
        shuffle=config.data.shuffle,
        seed=config.train.seed,
        validate=config.data.validate_ids,
    )
