"""The :class:`Trainer`: builds a run's parts, each owning its state and settings, and runs the loop.

The parts: the sharded model and its ``ScheduledOptimizer``, the ``StepDriver`` (pipeline), the train
reader, the ``LossWindow`` (on-device loss and NaN check), the ``RunLog``, and the
``CheckpointManager``, which saves the model, the optimizer and the three typed ``Stateful`` objects
of state.py (``TrainState``: step and seconds; ``DataPosition``; ``RngState``) together through DCP.
:meth:`Trainer.train` is the loop: epochs, runs of steps that end where evaluation needs the model,
and per step the log point, the checkpoint and the hooks.
What the parts are built from (the config checked against the data and the job, the sharded model, this
rank's train reader) is :mod:`mlet_torchrec.training.build`.

The run directory's ``lock`` is taken by ``train.train`` around the Trainer and acquired on rank 0 when
``run_dir.prepare_run_dir`` claims the directory. A rule for a changed ``train.epochs`` on resume goes
in :meth:`Trainer._resume`, where the loaded ``DataPosition`` and this run's ``epoch_steps`` are both
known (``state.check_resumable`` lists the keys that may change at all).

A warm start (``run.init_from``: another run's model and optimizer, new data from its start) is
:meth:`Trainer._warm_start`: ``self.checkpointer.load(path, names=("model", "optimizer"))`` in place of
``init_tables``, with a fresh ``DataPosition`` and ``RngState`` and the step count continued
(``TrainState.first_step``); resume, when the run directory has a checkpoint of its own, still wins.

Example:
    >>> with process_group("cpu") as ctx, RunDirLock(config.run.dir) as lock:    # doctest: +SKIP
    ...     result = Trainer(config, ctx, lock).train()
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torchrec.datasets.utils import Batch
from tqdm import tqdm

from data_pipes.reader import ParquetBatchReader, check_splits
from data_pipes.schema import DatasetMeta
from mlet_torchrec.config import ConfigError, ExperimentConfig, load_config
from mlet_torchrec.evaluation.evaluate import evaluate
from mlet_torchrec.evaluation.metrics import CTRMetrics
from mlet_torchrec.modules.table_init import init_tables
from mlet_torchrec.training.build import check_config, seed_everything, shard, train_reader
from mlet_torchrec.training.checkpoint import agree, read_checkpoint_info
from mlet_torchrec.training.checkpointer import CheckpointManager
from mlet_torchrec.training.distributed import DistContext, plan_summary
from mlet_torchrec.training.guardrails import TrainingDiverged, checked_capacity, nonfinite_weights
from mlet_torchrec.training.locks import RunDirLock
from mlet_torchrec.training.loop import LogitsView, LossWindow, StepDriver, StepOutput
from mlet_torchrec.training.optim import ScheduledOptimizer
from mlet_torchrec.training.results import StepEvent, StepHook, TrainResult, table_bytes
from mlet_torchrec.training.run_dir import METRICS_FILE, RunLog, prepare_run_dir
from mlet_torchrec.training.state import (
    DataPosition,
    RngState,
    TrainState,
    check_optimizer_layout,
    check_resumable,
    data_shape,
    dataloader,
    init_optimizer_state,
    log_data_order,
    warm_start_source,
)

log = logging.getLogger("mlet.train")


class Trainer:
    """One run of ``config`` on every rank of ``ctx``; :meth:`train` runs it and returns its result.

    Building it checks the config against the data, claims ``run.dir`` (and picks the checkpoint to
    resume from), shards the model and loads the checkpoint, or draws the tables for a fresh run.
    ``hooks`` are called on every rank after every step (after its checkpoint, if any).
    """

    def __init__(
        self, config: ExperimentConfig, ctx: DistContext, lock: RunDirLock, hooks: Sequence[StepHook] = ()
    ) -> None:
        self.config, self.ctx, self.hooks = config, ctx, tuple(hooks)
        self.run_dir = Path(config.run.dir)
        self.meta = DatasetMeta.load(config.data.path)
        check_config(config, self.meta, ctx)
        capacity = checked_capacity(self.meta, config, ctx.world_size, ctx.device)  # absurd sizes: refused first
        check_splits(config.data.path, config.data.validate_ids)  # footers, schema, row counts of every split
        self.resumed_from = prepare_run_dir(config, self.run_dir, ctx, lock)
        self.warm_from: Path | None = None  # run.init_from's checkpoint, when this run starts from another's state
        resume_info: dict[str, Any] = {}
        if self.resumed_from is not None:
            resume_info = self._check_resumable(self.resumed_from)
        elif config.run.init_from is not None:
            self.warm_from, resume_info = warm_start_source(config, self.meta)
        if ctx.is_main:
            config.save(self.run_dir / "config.yaml")
        dist.barrier()

        seed_everything(config.train.seed)
        sharded = shard(config, self.meta, ctx, capacity)
        self.model, self.optimizer, self.plan = sharded.model, sharded.optimizer, plan_summary(sharded.plan)
        if ctx.is_main:
            (self.run_dir / "plan.json").write_text(json.dumps(self.plan, indent=2))
        self.reader = train_reader(config, ctx)
        self.epoch_steps = [self.reader.num_batches()] * config.train.epochs

        self.state = TrainState()
        self.position = DataPosition(virtual_shards=self.reader.virtual_shards, epoch_steps=tuple(self.epoch_steps))
        self.rng = RngState(ctx.rank, ctx.device)
        rng_name = RngState.name(ctx.rank)
        states = {"model": self.model, "optimizer": self.optimizer, "train_state": self.state}
        states |= {"data_position": self.position, rng_name: self.rng}
        self.checkpointer = CheckpointManager(self.run_dir, config, states, optional={rng_name}, last=self.resumed_from)
        if self.resumed_from is not None:
            self._resume(self.resumed_from, resume_info)
        elif self.warm_from is not None:
            self._warm_start(self.warm_from, resume_info)
        else:
            init_tables(self.model, config.train.seed, config.embedding.init, config.embedding.init_std)
        self.start_step = self.state.step
        own_steps = sum(self.epoch_steps)  # a warm start's steps come after its source's
        if config.train.max_steps is not None:
            own_steps = min(own_steps, config.train.max_steps)
        self.total_steps = self.state.first_step + own_steps
        self._build_loop_parts()

    def _check_resumable(self, checkpoint: Path) -> dict[str, Any]:
        """The checkpoint's ``checkpoint.json``, once its config and data set shape match this run's."""
        info = read_checkpoint_info(checkpoint)
        try:
            saved = load_config(checkpoint / "config.yaml")
        except ConfigError as e:
            raise ConfigError(
                f"cannot resume from {checkpoint}: its config.yaml does not load ({e}); "
                "set run.resume=false or choose a new run.dir"
            ) from None
        check_resumable(str(checkpoint), saved, self.config, info, self.meta)
        return info

    def _resume(self, checkpoint: Path, info: dict[str, Any]) -> None:
        """Load every state of ``checkpoint``: weights, optimizer, step, data position and this rank's RNG."""
        check_optimizer_layout(str(checkpoint), info["plan"], self.plan, self.config.sparse_optimizer.name)
        init_optimizer_state(self.optimizer)
        if self.checkpointer.load(checkpoint):  # this rank's RNG states are missing: the world grew
            self.rng.reseed(self.config.train.seed, self.state.step)
        self.position.check_reader(str(checkpoint), self.reader)
        if self.ctx.is_main:
            log.info(
                "resuming from %s: step %d, epoch %d after %d batches (checkpoint of %d rank(s), now %d)",
                checkpoint,
                self.state.step,
                self.position.epoch,
                self.position.batches_in_epoch,
                info["world_size"],
                self.ctx.world_size,
            )

    def _warm_start(self, checkpoint: Path, info: dict[str, Any]) -> None:
        """``run.init_from``: the checkpoint's model and optimizer state (resharded), its step count
        continued; this data set from its start, the RNGs seeded from (seed, step, rank)."""
        check_optimizer_layout(str(checkpoint), info["plan"], self.plan, self.config.sparse_optimizer.name)
        init_optimizer_state(self.optimizer)
        self.checkpointer.load(checkpoint, names=("model", "optimizer"))
        self.state.step = self.state.first_step = int(info["step"])
        self.rng.reseed(self.config.train.seed, self.state.step)
        if self.ctx.is_main:
            step, data = self.state.step, self.config.data.path
            log.info("warm start from %s (step %d); reading %s from its start", checkpoint, step, data)

    def _build_loop_parts(self) -> None:
        """The parts the loop drives: data order log, optimizer schedule, pipeline, loss window, logs."""
        config, ctx = self.config, self.ctx
        if self.epoch_steps[0] == 0:
            raise ConfigError(
                f"the train split of {config.data.path} has {self.reader.num_rows()} rows, fewer than one "
                f"global batch (train.batch_size={config.train.batch_size})"
            )
        if ctx.is_main:
            log_data_order(self.reader)
        if self.start_step > self.total_steps:
            log.warning(
                "checkpoint %s is at step %d, past this run's %d steps: not training",
                self.resumed_from,
                self.start_step,
                self.total_steps,
            )
        self.checkpoint_info = {
            "data": config.data.path,
            "plan": self.plan,
            "data_shape": data_shape(self.meta),
            **table_bytes(self.meta, config),
            "epoch_steps": self.epoch_steps,
        }
        self.window = LossWindow(ctx.device)
        lrs = {"fused": config.sparse_optimizer.lr, "dense": config.dense_optimizer.lr}
        self.scheduled = ScheduledOptimizer(self.optimizer, config.train, self.total_steps, self.start_step, lrs)
        self.driver = StepDriver(config.train.pipeline, self.model, self.scheduled, ctx.device)
        if ctx.is_main:
            log.debug("training steps driven by %s (train.pipeline=%s)", self.driver.name, config.train.pipeline)
        self.runlog = RunLog(self.run_dir, ctx.is_main, self.start_step)
        self.bar = tqdm(
            total=self.total_steps,
            initial=min(self.start_step, self.total_steps),
            desc="train",
            unit="step",
            disable=None if ctx.is_main and config.train.progress else True,  # None: only on a terminal
            dynamic_ncols=True,
        )
        self._batches: Iterator[Batch] | None = None  # the epoch's DataLoader iterator
        self._clock = time.perf_counter()

    # ------------------------------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        """Run the steps left, evaluate on valid and test, save the final checkpoint; the same result on
        every rank. Everything the run started (DataLoader workers, writers, a background save) ends here."""
        epochs, eval_every = self.config.train.epochs, self.config.train.eval_every
        try:
            self.model.train()
            while self.state.step < self.total_steps and self.position.epoch < epochs:
                batches = self._epoch_batches()
                epoch_left = self.epoch_steps[self.position.epoch] - self.position.batches_in_epoch
                remaining = min(epoch_left, self.total_steps - self.state.step)
                while remaining > 0:
                    # a run of steps ends where evaluation needs the model to itself (the pipeline drains there)
                    steps = min(remaining, eval_every - self.state.step % eval_every) if eval_every else remaining
                    remaining -= steps
                    self._run_steps(batches, steps)
                    if eval_every and self.state.step % eval_every == 0 and self.state.step < self.total_steps:
                        self._record_eval("valid", announce=True)
                self._end_epoch_if_done()
            self.bar.close()
            valid, test = self._record_eval("valid"), self._record_eval("test")
            checkpoint = self._final_checkpoint(valid, test)
        finally:
            self._close()
        return self._result(checkpoint, valid, test)

    def _epoch_batches(self) -> Iterator[Batch]:
        """The DataLoader iterator of the current epoch, from the data position on."""
        self.reader.set_position(self.position.epoch, self.position.batches_in_epoch)
        pin_memory = self.ctx.device.type == "cuda"
        loader = dataloader(
            self.reader, self.config.data.num_workers, self.config.train.seed, self.position.epoch, pin_memory
        )
        self._batches = iter(loader)
        return self._batches

    def _run_steps(self, batches: Iterator[Batch], steps: int) -> None:
        """``steps`` training steps, each followed by its log point, checkpoint and hooks."""
        self._clock = time.perf_counter()
        for batch, out in self.driver.run(batches, steps):
            self.state.step += 1
            self.position.batches_in_epoch += 1
            self.window.add(out[0], out[1], self.state.step)
            self.bar.update(1)
            log_every = self.config.train.log_every
            if self.state.step % log_every == 0 or self.state.step == self.total_steps:
                self._log_train()
            else:
                self._tick()
            written = self._checkpoint() if self.checkpointer.due(self.state.step, self.total_steps) else None
            self._call_hooks(batch, out, written)
            self._clock = time.perf_counter()

    def _tick(self) -> None:
        """Count the time since the clock was last set as training time (checkpoints and hooks are not)."""
        self.state.train_seconds += time.perf_counter() - self._clock

    def _log_train(self) -> None:
        """The log point: the loop's only host sync (one all-reduce of the window), then the NaN check."""
        loss_all, rows_all, bad_step = self.window.read(self.ctx.world_size)
        self._tick()
        if bad_step is not None:
            raise self._diverged(loss_all, bad_step)
        step, train = self.state.step, self.config.train
        sps = (step - self.state.first_step) * train.batch_size / max(self.state.train_seconds, 1e-9)
        lrs = self.scheduled.lrs()
        record = {
            "loss": loss_all / max(rows_all, 1.0),
            "samples_per_second": sps,
            "epoch": self.position.epoch,
            "sparse_lr": lrs.get("fused", self.config.sparse_optimizer.lr),
            "dense_lr": lrs.get("dense", self.config.dense_optimizer.lr),
        }
        self.runlog.record(step, "train", record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{sps:,.0f}")

    def _call_hooks(self, batch: Batch, out: StepOutput, written: Path | None) -> None:
        if not self.hooks:
            return
        pos, ctx = self.position, self.ctx
        event = StepEvent(
            self.state.step,
            pos.epoch,
            pos.batches_in_epoch,
            batch,
            self.model,
            ctx.rank,
            ctx.world_size,
            written,
            (out[0], out[1]),
        )
        for hook in self.hooks:
            hook(event)

    def _end_epoch_if_done(self) -> None:
        if self.position.batches_in_epoch >= self.epoch_steps[self.position.epoch]:
            if self.ctx.is_main:
                log.info(
                    "epoch %d done at step %d: %d rows consumed",
                    self.position.epoch,
                    self.state.step,
                    self.reader.rows_per_epoch(),
                )
            self.position.epoch, self.position.batches_in_epoch = self.position.epoch + 1, 0

    # ------------------------------------------------------------------------------- evaluation, saving

    def _record_eval(self, split: str, announce: bool = False) -> CTRMetrics | None:
        """Evaluate on ``split`` (None if the data set has none) and record it at the current step."""
        metrics = self._evaluate(split)
        if metrics is not None:
            self.runlog.record(self.state.step, split, metrics.as_dict())
            if announce and self.ctx.is_main:
                self.bar.write(f"step {self.state.step}: {split} AUC {metrics.auc:.4f} LogLoss {metrics.logloss:.4f}")
        return metrics

    def _evaluate(self, split: str) -> CTRMetrics | None:
        if split not in self.meta.splits:
            return None
        config, ctx = self.config, self.ctx
        local_batch = max(1, math.ceil(config.train.eval_batch_size / ctx.world_size))
        reader = ParquetBatchReader(
            config.data.path,
            split,
            local_batch,
            rank=ctx.rank,
            world_size=ctx.world_size,
            drop_last=False,
            shuffle=False,
            validate=config.data.validate_ids,
        )
        with self.driver.plain_model() as plain:  # the pipeline is drained here: no batch is in flight
            features, dense = self.meta.sparse_names(), len(self.meta.dense)
            return evaluate(
                LogitsView(plain), iter(reader), reader.num_batches(), local_batch, features, dense, ctx.device
            )

    def _checkpoint(self, extra: dict[str, Any] | None = None, final: bool = False) -> Path | None:
        """Collective: check the loss and the weights are finite, then save (interval or final checkpoint).

        A background checkpoint taken before the loss went bad is whole and finite: it is committed."""
        self.checkpointer.commit_pending()
        loss_all, _, bad_step = self.window.peek(self.ctx.world_size)
        if bad_step is not None:
            raise self._diverged(loss_all, bad_step)
        bad = nonfinite_weights(self.model)
        err = agree(f"non-finite values in {', '.join(bad[:3])}" if bad else None)
        if err:
            raise TrainingDiverged(
                f"weights became non-finite by step {self.state.step} ({err}); not checkpointing them. "
                f"{self._last_good()} Lower the learning rates (sparse_optimizer.lr, dense_optimizer.lr)"
            )
        return self.checkpointer.save(self.state.step, {**self.checkpoint_info, **(extra or {})}, final=final)

    def _diverged(self, loss_all: float, bad_step: int) -> TrainingDiverged:
        """Collective (every rank read the same all-reduced values): commits a pending background save."""
        self.checkpointer.commit_pending()
        return TrainingDiverged(
            f"training loss became {loss_all} at step {bad_step} (epoch {self.position.epoch}; read at step "
            f"{self.state.step}, every train.log_every steps and before checkpoints); stopped without "
            f"checkpointing. {self._last_good()} Lower the learning rates (sparse_optimizer.lr, dense_optimizer.lr)"
        )

    def _last_good(self) -> str:
        last = self.checkpointer.last
        return "No checkpoint was written before." if last is None else f"The last good checkpoint, {last}, is intact."

    def _final_checkpoint(self, valid: CTRMetrics | None, test: CTRMetrics | None) -> Path:
        if self.resumed_from is not None and self.state.step == self.start_step:
            return self.resumed_from  # nothing trained since: that checkpoint is the final state
        metrics = {"valid": valid and valid.as_dict(), "test": test and test.as_dict(), "final": True}
        final = self._checkpoint(metrics, final=True)
        assert final is not None  # a final save is committed before it returns
        return final

    def _close(self) -> None:
        """Not collective: drop a background save the run did not commit, end the DataLoader workers (now,
        not at exit), tqdm's monitor thread and TensorBoard's writer thread."""
        self.checkpointer.abandon()
        self._batches = None
        self.bar.close()
        self.runlog.close()

    def _result(self, checkpoint: Path, valid: CTRMetrics | None, test: CTRMetrics | None) -> TrainResult:
        state, batch_size = self.state, self.config.train.batch_size
        sps = (state.step - state.first_step) * batch_size / max(state.train_seconds, 1e-9)
        result = TrainResult(
            self.run_dir,
            checkpoint,
            state.step,
            state.train_seconds,
            sps,
            valid,
            test,
            self.resumed_from,
            self.start_step,
        )
        if self.ctx.is_main:
            summary = {**result.summary(), **table_bytes(self.meta, self.config), "world_size": self.ctx.world_size}
            (self.run_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2))
        return result
