"""``train(config)``: the training loop every entry point calls (CLI, TorchX, tests, demo).

Run it in each process of a torchrun/TorchX/elastic_launch job, or directly for one process.
Outputs land in ``config.run.dir``: the resolved ``config.yaml``, ``plan.json``,
``metrics.jsonl`` (one line per log/eval), ``metrics.json`` (final), ``tensorboard/`` and
``checkpoints/``.

Resume (``run.resume``, on by default): a run whose ``run.dir`` holds a complete checkpoint
continues from the newest one: model, fused (W1) and dense optimizer state, data position
(epoch, batches consumed in it) and every rank's RNG states, so a run stopped at step s and
resumed ends with the same weights and metrics as an uninterrupted one. That is what a
torchrun/TorchX restart (``max_restarts``) relies on: the restarted workers run the same command in
the same ``run.dir``. The world size and sharding plan may differ from the checkpoint's (DCP
reshards weights and optimizer state); settings that change what is trained may not
(``train_state.check_resumable``). ``run.resume=false`` starts over and deletes the old checkpoints
(only those mlet marked). ``run.dir`` is claimed with mlet's output marker (``run_dir.py``): one that
holds foreign files, or is the data, the working directory, home or root, is refused in one line.

Steps: driven by TorchRec's ``TrainPipelineSparseDist`` by default (``train.pipeline``, loop.py), with
the lr schedule and dense gradient clipping of ``optim.py``. The loop never waits on the device
between log points: the loss, row counts and the NaN check accumulate there and are read every
``train.log_every`` steps and before every checkpoint.

Checkpoints: every ``train.checkpoint_every`` steps and at the end, atomically, the newest
``train.keep_checkpoints`` kept (checkpoint.py; in the background with ``train.async_checkpoint``). A
non-finite loss on any rank stops every rank at the next read with ``TrainingDiverged``, naming the
step where it first appeared; no checkpoint is ever written after it or from non-finite weights.

Lifecycle: ``train`` runs inside ``distributed.process_group``; on return or on error the group is
destroyed (after a barrier when all went well) and the progress bar, TensorBoard writer and DataLoader
workers are closed, so a finished job exits cleanly.

Example:
    >>> from mlet_torchrec.config import load_config
    >>> cfg = load_config("configs/tiny.yaml", ["run.dir=runs/doc"])   # doctest: +SKIP
    >>> result = train(cfg)                                             # doctest: +SKIP
    >>> result.test.auc                                                 # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.planner.types import PlannerError, PlannerErrorType
from tqdm import tqdm

from data_pipes.reader import ParquetBatchReader
from data_pipes.schema import DatasetMeta, table_name
from mlet_torchrec.config import ConfigError, ExperimentConfig, load_config
from mlet_torchrec.errors import UserError
from mlet_torchrec.evaluation.evaluate import evaluate
from mlet_torchrec.evaluation.metrics import CTRMetrics
from mlet_torchrec.models import build_model
from mlet_torchrec.modules.table_init import init_tables
from mlet_torchrec.training.checkpoint import (
    CheckpointError,
    PendingCheckpoint,
    agree,
    load_training_state,
    read_checkpoint_info,
    read_rank_state,
    start_checkpoint,
)
from mlet_torchrec.training.distributed import DistContext, plan_summary, process_group, shard_model
from mlet_torchrec.training.guardrails import (
    TablesDoNotFit,
    TrainingDiverged,
    memory_capacity,
    nonfinite_weights,
    tables_do_not_fit,
)
from mlet_torchrec.training.locks import RunDirLock
from mlet_torchrec.training.loop import LogitsView, LossWindow, StepDriver, TrainStep
from mlet_torchrec.training.optim import ScheduledOptimizer
from mlet_torchrec.training.results import StepEvent, StepHook, TrainResult, table_bytes
from mlet_torchrec.training.run_dir import METRICS_FILE, RunLog, discard_fresh_run_dir, interruptible, prepare_run_dir
from mlet_torchrec.training.state import (
    check_data_order,
    check_optimizer_layout,
    check_resumable,
    data_shape,
    dataloader,
    init_optimizer_state,
    load_warm_start,
    log_data_order,
    normalize_position,
    reseed,
    rng_state,
    set_rng_state,
    warm_start_source,
)

log = logging.getLogger("mlet.train")

__all__ = ["train", "TrainResult", "StepEvent", "TrainingDiverged", "TablesDoNotFit", "CheckpointError", "table_bytes"]


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_config_against_data(config: ExperimentConfig, meta: DatasetMeta, ctx: DistContext) -> None:
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


def _saved_config(checkpoint: Path) -> ExperimentConfig:
    try:
        return load_config(checkpoint / "config.yaml")
    except ConfigError as e:
        raise ConfigError(
            f"cannot resume from {checkpoint}: its config.yaml does not load ({e}); "
            "set run.resume=false or choose a new run.dir"
        ) from None


def train(config: ExperimentConfig, hooks: Sequence[StepHook] = ()) -> TrainResult:
    """Train ``config`` on every rank of the current job; returns the same result on every rank.

    ``hooks`` are called on every rank after every step (after its checkpoint, if any). The process
    group (and every thread and DataLoader worker of the run) is shut down before it returns or raises,
    unless the caller set the group up.
    """
    existed_before = Path(config.run.dir).exists()
    with process_group(config.run.device) as ctx, RunDirLock(config.run.dir) as lock:
        try:
            with interruptible(config.run.dir) as last:  # Ctrl-C: one line, exit 130, resumable
                return _train(config, [*hooks, last], ctx, lock)
        except UserError:
            # several ranks may fail at different steps: the local launcher's parent cleans up for them
            if ctx.world_size == 1:
                discard_fresh_run_dir(config.run.dir, existed_before)
            raise


def _train(config: ExperimentConfig, hooks: Sequence[StepHook], ctx: DistContext, lock: RunDirLock) -> TrainResult:
    run_dir = Path(config.run.dir)
    meta = DatasetMeta.load(config.data.path)
    _check_config_against_data(config, meta, ctx)
    resume_from = prepare_run_dir(config, run_dir, ctx, lock)
    resume_info: dict[str, Any] = {}
    warm_from = None  # run.init_from's checkpoint, when this run starts from another one's state
    if resume_from is not None:
        resume_info = read_checkpoint_info(resume_from)
        check_resumable(str(resume_from), _saved_config(resume_from), config, resume_info, meta)
    elif config.run.init_from is not None:
        warm_from, resume_info = warm_start_source(config, meta)
    if ctx.is_main:
        config.save(run_dir / "config.yaml")
    dist.barrier()

    if config.train.bf16_autocast and ctx.device.type != "cuda":
        raise ConfigError(
            "train.bf16_autocast=true needs CUDA (bf16 autocast of the forward); this run is on "
            f"{ctx.device.type}: set train.bf16_autocast=false"
        )
    _seed_everything(config.train.seed)
    features = meta.sparse_names()
    # the pipelines call the model with the batch alone; TrainStep holds only the model's net, so the
    # checkpoint keys are the model's own
    net = TrainStep(
        build_model(config.model, config.embedding, meta, device=torch.device("meta")).net,
        bf16=config.train.bf16_autocast,
    )
    capacity = memory_capacity(ctx.device)
    given_plan = None
    if config.run.plan is not None:  # `mlet plan`'s plan instead of planning again (refused if made for another run)
        from mlet_torchrec.training.planning import load_plan

        given_plan = load_plan(
            config.run.plan, config, meta, ctx.world_size, ctx.device.type, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        )
    try:
        sharded = shard_model(
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
    model, optimizer = sharded.model, sharded.optimizer
    plan = plan_summary(sharded.plan)
    if ctx.is_main:
        (run_dir / "plan.json").write_text(json.dumps(plan, indent=2))

    start_step, train_seconds = 0, 0.0
    position = (0, 0)
    if warm_from is not None:  # another run's model and optimizer state, this data set from its start
        start_step = load_warm_start(warm_from, resume_info, plan, model, optimizer, config, ctx.rank)
    elif resume_from is None:
        init_tables(model, config.train.seed, config.embedding.init, config.embedding.init_std)
    else:
        check_optimizer_layout(str(resume_from), resume_info.get("plan", {}), plan, config.sparse_optimizer.name)
        init_optimizer_state(optimizer)
        load_training_state(resume_from, model, optimizer)
        start_step = int(resume_info["step"])
        train_seconds = float(resume_info.get("train_seconds", 0.0))
        position = (int(resume_info["position"]["epoch"]), int(resume_info["position"]["batches_in_epoch"]))
        saved = read_rank_state(resume_from, ctx.rank)
        if saved is not None:
            set_rng_state(saved["rng"])
        else:
            reseed(config.train.seed, start_step, ctx.rank)
        if ctx.is_main:
            log.info(
                "resuming from %s: step %d, epoch %d after %d batches (checkpoint of %d rank(s), now %d)",
                resume_from,
                start_step,
                position[0],
                position[1],
                resume_info.get("world_size", 0),
                ctx.world_size,
            )

    num_workers = config.data.num_workers
    if config.train.batch_size % ctx.world_size:
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} does not split evenly over {ctx.world_size} "
            "ranks; choose a multiple of the world size"
        )
    reader = ParquetBatchReader(
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
    if resume_from is not None:
        check_data_order(str(resume_from), resume_info["position"], reader)
    # The same global batches at every world size and epoch (data_pipes/order.py): every rank takes
    # the same number of steps, as the collective embedding all-to-alls need.
    epoch_steps = [reader.num_batches()] * config.train.epochs
    if epoch_steps[0] == 0:
        raise ConfigError(
            f"the train split of {config.data.path} has {reader.num_rows()} rows, fewer than one global batch "
            f"(train.batch_size={config.train.batch_size})"
        )
    if ctx.is_main:
        log_data_order(reader)
    total_steps = sum(epoch_steps)
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)
    steps_before = start_step if warm_from is not None else 0  # a warm start's steps come after its source's
    total_steps += steps_before
    if start_step > total_steps:
        log.warning(
            "checkpoint %s is at step %d, past this run's %d steps: not training", resume_from, start_step, total_steps
        )

    eval_local_batch = max(1, math.ceil(config.train.eval_batch_size / ctx.world_size))

    def run_eval(split: str) -> CTRMetrics | None:
        if split not in meta.splits:
            return None
        eval_reader = ParquetBatchReader(
            config.data.path,
            split,
            eval_local_batch,
            rank=ctx.rank,
            world_size=ctx.world_size,
            drop_last=False,
            shuffle=False,
            validate=config.data.validate_ids,
        )
        with driver.plain_model() as plain:  # the pipeline is drained here: no batch is in flight
            return evaluate(
                LogitsView(plain),
                iter(eval_reader),
                eval_reader.num_batches(),
                eval_local_batch,
                features,
                len(meta.dense),
                ctx.device,
            )

    info = {
        "data": config.data.path,
        "plan": plan,
        "data_shape": data_shape(meta),
        **table_bytes(meta, config),
        "epoch_steps": epoch_steps,
    }
    last_checkpoint = resume_from
    window = LossWindow(ctx.device)
    scheduled = ScheduledOptimizer(
        optimizer,
        config.train,
        total_steps,
        start_step,
        {"fused": config.sparse_optimizer.lr, "dense": config.dense_optimizer.lr},
    )
    driver = StepDriver(config.train.pipeline, model, scheduled, ctx.device)
    if ctx.is_main:
        log.debug("training steps driven by %s (train.pipeline=%s)", driver.name, config.train.pipeline)
    # background checkpoint writes get their own group: their collectives must not interleave with training's
    async_group = dist.new_group(backend="gloo") if config.train.async_checkpoint else None
    pending: PendingCheckpoint | None = None

    def diverged(loss_all: float, bad_step: int, step: int, epoch: int) -> TrainingDiverged:
        # collective, as every rank decided this on the same all-reduced values: a background checkpoint
        # taken before the loss went bad is whole and finite, so it is committed, not dropped
        finish_pending()
        return TrainingDiverged(
            f"training loss became {loss_all} at step {bad_step} (epoch {epoch}; read at step {step}, every "
            f"train.log_every steps and before checkpoints); stopped without checkpointing. "
            f"{_last_good(last_checkpoint)} Lower the learning rates (sparse_optimizer.lr, dense_optimizer.lr)"
        )

    def finish_pending() -> None:
        nonlocal pending, last_checkpoint
        if pending is not None:
            done, pending = pending, None
            last_checkpoint = done.finish()

    def write_checkpoint(
        step: int, epoch: int, batches: int, extra: dict[str, Any], background: bool = False
    ) -> Path | None:
        nonlocal pending
        finish_pending()  # one background write at a time, committed in order
        loss_all, _, bad_step = window.peek(ctx.world_size)
        if bad_step is not None:
            raise diverged(loss_all, bad_step, step, epoch)
        bad = nonfinite_weights(model)
        err = agree(f"non-finite values in {', '.join(bad[:3])}" if bad else None)
        if err:
            raise TrainingDiverged(
                f"weights became non-finite by step {step} ({err}); not checkpointing them. "
                f"{_last_good(last_checkpoint)} Lower the learning rates (sparse_optimizer.lr, dense_optimizer.lr)"
            )
        # the position counts the batches the model consumed, not those the pipeline fetched ahead
        e, b = normalize_position(epoch, batches, epoch_steps)
        position_info = {
            "epoch": e,
            "batches_in_epoch": b,
            "global_batch_size": config.train.batch_size,
            "num_workers": num_workers,
            "world_size": ctx.world_size,
            "virtual_shards": reader.virtual_shards,
            "rows_per_epoch": reader.rows_per_epoch(),
        }
        started = start_checkpoint(
            run_dir,
            step,
            model,
            config,
            {**info, "position": position_info, "train_seconds": train_seconds, **extra},
            optimizer,
            rank_state={"rng": rng_state(), "step": step},
            keep=config.train.keep_checkpoints,
            async_group=async_group if background else None,
        )
        if background:
            pending = started
            return None
        return started.finish()

    runlog = RunLog(run_dir, ctx.is_main, start_step)
    bar = tqdm(
        total=total_steps,
        initial=min(start_step, total_steps),
        desc="train",
        unit="step",
        disable=None if ctx.is_main and config.train.progress else True,  # None: only on a terminal
        dynamic_ncols=True,
    )
    step = start_step
    it = None
    epoch, batches = normalize_position(*position, epoch_steps)
    valid_metrics: CTRMetrics | None = None
    log_every, eval_every, ckpt_every = config.train.log_every, config.train.eval_every, config.train.checkpoint_every
    try:
        model.train()
        while step < total_steps and epoch < config.train.epochs:
            reader.set_position(epoch, batches)
            it = iter(dataloader(reader, num_workers, config.train.seed, epoch, ctx.device.type == "cuda"))
            remaining = min(epoch_steps[epoch] - batches, total_steps - step)
            while remaining > 0:
                # a run of steps ends where evaluation needs the model to itself (the pipeline drains there)
                run = min(remaining, eval_every - step % eval_every) if eval_every else remaining
                remaining -= run
                t0 = time.perf_counter()
                for batch, (loss_sum, rows, _) in driver.run(it, run):
                    step, batches = step + 1, batches + 1
                    window.add(loss_sum, rows, step)
                    bar.update(1)
                    if step % log_every == 0 or step == total_steps:
                        loss_all, rows_all, bad_step = window.read(ctx.world_size)  # the only host sync
                        train_seconds += time.perf_counter() - t0
                        if bad_step is not None:
                            raise diverged(loss_all, bad_step, step, epoch)
                        sps = (step - steps_before) * config.train.batch_size / max(train_seconds, 1e-9)
                        lrs = scheduled.lrs()
                        record = {
                            "loss": loss_all / max(rows_all, 1.0),
                            "samples_per_second": sps,
                            "epoch": epoch,
                            "sparse_lr": lrs.get("fused", config.sparse_optimizer.lr),
                            "dense_lr": lrs.get("dense", config.dense_optimizer.lr),
                        }
                        runlog.record(step, "train", record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{sps:,.0f}")
                    else:
                        train_seconds += time.perf_counter() - t0
                    written = None
                    if ckpt_every and step % ckpt_every == 0 and step < total_steps:
                        written = write_checkpoint(step, epoch, batches, {}, background=config.train.async_checkpoint)
                        last_checkpoint = written or last_checkpoint
                    for hook in hooks:
                        hook(
                            StepEvent(
                                step, epoch, batches, batch, model, ctx.rank, ctx.world_size, written, (loss_sum, rows)
                            )
                        )
                    t0 = time.perf_counter()
                if eval_every and step % eval_every == 0 and step < total_steps:
                    valid_metrics = run_eval("valid")
                    if valid_metrics is not None:
                        runlog.record(step, "valid", valid_metrics.as_dict())
                        if ctx.is_main:
                            bar.write(
                                f"step {step}: valid AUC {valid_metrics.auc:.4f} LogLoss {valid_metrics.logloss:.4f}"
                            )
            if batches >= epoch_steps[epoch]:
                if ctx.is_main:
                    log.info("epoch %d done at step %d: %d rows consumed", epoch, step, reader.rows_per_epoch())
                epoch, batches = epoch + 1, 0
        bar.close()

        valid_metrics = run_eval("valid")
        test_metrics = run_eval("test")
        for name, m in (("valid", valid_metrics), ("test", test_metrics)):
            if m is not None:
                runlog.record(step, name, m.as_dict())
        sps = (step - steps_before) * config.train.batch_size / max(train_seconds, 1e-9)
        if resume_from is not None and step == start_step:
            checkpoint = resume_from  # nothing trained since: that checkpoint is the final state
        else:
            final_info = {
                "valid": valid_metrics and valid_metrics.as_dict(),
                "test": test_metrics and test_metrics.as_dict(),
                "final": True,
            }
            final = write_checkpoint(step, epoch, batches, final_info)  # not in the background: returns it
            assert final is not None
            checkpoint = final
        finish_pending()
    finally:
        if pending is not None:  # the run is failing: the background checkpoint never becomes visible
            pending.abandon()
        it = None  # the last epoch's DataLoader iterator: its worker processes end now, not at exit
        bar.close()  # also stops tqdm's monitor thread
        runlog.close()  # joins TensorBoard's writer thread
    result = TrainResult(
        run_dir, checkpoint, step, train_seconds, sps, valid_metrics, test_metrics, resume_from, start_step
    )
    if ctx.is_main:
        summary = {**result.summary(), **table_bytes(meta, config), "world_size": ctx.world_size}
        (run_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2))
    return result


def _last_good(checkpoint: Path | None) -> str:
    if checkpoint is None:
        return "No checkpoint was written before."
    return f"The last good checkpoint, {checkpoint}, is intact."
