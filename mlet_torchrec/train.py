"""``train(config)``: the training loop every entry point calls (CLI, TorchX, tests, demo).

Run it in each process of a torchrun/TorchX/elastic_launch job, or directly for one process.
Outputs land in ``config.run.dir``: the resolved ``config.yaml``, ``plan.json``,
``metrics.jsonl`` (one line per log/eval), ``metrics.json`` (final), ``tensorboard/`` and
``checkpoints/``.

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
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data_pipes.reader import ParquetBatchReader, make_dataloader
from data_pipes.schema import DatasetMeta, table_name
from mlet_torchrec.checkpoint import save_checkpoint
from mlet_torchrec.config import ConfigError, ExperimentConfig
from mlet_torchrec.distributed import DistContext, init_distributed, plan_summary, shard_model
from mlet_torchrec.evaluate import evaluate
from mlet_torchrec.metrics import CTRMetrics
from mlet_torchrec.models import build_model
from mlet_torchrec.modules.table_init import init_tables

log = logging.getLogger("mlet.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    train_seconds: float
    samples_per_second: float
    valid: Optional[CTRMetrics]
    test: Optional[CTRMetrics]

    def summary(self) -> Dict[str, Any]:
        out = asdict(self)
        out["run_dir"], out["checkpoint"] = str(self.run_dir), str(self.checkpoint)
        return out


def table_bytes(meta: DatasetMeta, config: ExperimentConfig) -> Dict[str, int]:
    """FP32 bytes of the tables at serving (n x d) and while training (n x k, plus W2)."""
    d = config.embedding.d
    serving = sum(f.cardinality * d * 4 for f in meta.sparse)
    training = 0
    for f in meta.sparse:
        k = config.embedding.k_for(f.name)
        training += f.cardinality * (k or d) * 4 + (k * d * 4 if k else 0)
    return {"serving_table_bytes": serving, "training_table_bytes": training}


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


class _RunLog:
    """Rank 0's outputs: metrics.jsonl, TensorBoard scalars and one concise line per event."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if enabled:
            self._jsonl = open(run_dir / "metrics.jsonl", "a")
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def record(self, step: int, kind: str, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self._jsonl.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def train(config: ExperimentConfig) -> TrainResult:
    """Train ``config`` on every rank of the current job; returns the same result on every rank."""
    ctx = init_distributed(config.run.device)
    run_dir = Path(config.run.dir)
    meta = DatasetMeta.load(config.data.path)
    _check_config_against_data(config, meta, ctx)
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
    dist.barrier()

    _seed_everything(config.train.seed)
    features = meta.sparse_names()
    net = build_model(config.model, config.embedding, meta, device=torch.device("meta"))
    sharded = shard_model(
        net,
        config.embedding,
        features,
        {f: table_name(f) for f in features},
        config.sparse_optimizer,
        config.dense_optimizer,
        ctx,
    )
    model, optimizer = sharded.model, sharded.optimizer
    init_tables(model, config.train.seed)
    plan = plan_summary(sharded.plan)
    if ctx.is_main:
        (run_dir / "plan.json").write_text(json.dumps(plan, indent=2))

    local_batch = config.train.batch_size // ctx.world_size
    reader = ParquetBatchReader(
        config.data.path,
        "train",
        local_batch,
        rank=ctx.rank,
        world_size=ctx.world_size,
        drop_last=True,
        shuffle=config.data.shuffle,
        seed=config.train.seed,
        validate=config.data.validate_ids,
    )
    # Every rank must take the same number of steps (the embedding all-to-alls are collective), and
    # with shuffling a rank's share of row groups, hence its batch count, changes from epoch to epoch.
    local_steps = torch.tensor(
        [reader.num_batches(config.data.num_workers, epoch=e) for e in range(config.train.epochs)],
        dtype=torch.int64, device=ctx.device,
    )
    dist.all_reduce(local_steps, op=dist.ReduceOp.MIN)
    epoch_steps = [int(n) for n in local_steps.tolist()]
    if min(epoch_steps) == 0:
        raise ConfigError(
            f"the train split of {config.data.path} has fewer rows per rank than one batch "
            f"(train.batch_size={config.train.batch_size} over {ctx.world_size} ranks)"
        )
    total_steps = sum(epoch_steps)
    if config.train.max_steps is not None:
        total_steps = min(total_steps, config.train.max_steps)

    eval_local_batch = max(1, math.ceil(config.train.eval_batch_size / ctx.world_size))

    def run_eval(split: str) -> Optional[CTRMetrics]:
        if split not in meta.splits:
            return None
        eval_reader = ParquetBatchReader(
            config.data.path, split, eval_local_batch, rank=ctx.rank, world_size=ctx.world_size,
            drop_last=False, shuffle=False, validate=config.data.validate_ids,
        )
        return evaluate(
            model, iter(eval_reader), eval_reader.num_batches(), eval_local_batch,
            features, len(meta.dense), ctx.device,
        )

    runlog = _RunLog(run_dir, ctx.is_main)
    info = {"data": config.data.path, "plan": plan, **table_bytes(meta, config)}
    bar = tqdm(total=total_steps, desc="train", unit="step", disable=not (ctx.is_main and config.train.progress),
               dynamic_ncols=True)
    step, train_seconds, loss_window, window_rows = 0, 0.0, 0.0, 0
    valid_metrics: Optional[CTRMetrics] = None
    model.train()
    for epoch in range(config.train.epochs):
        if step >= total_steps:
            break
        reader.set_epoch(epoch)
        batches = iter(make_dataloader(reader, config.data.num_workers))
        for _ in range(min(epoch_steps[epoch], total_steps - step)):
            t0 = time.perf_counter()
            batch = next(batches).to(ctx.device)
            logits = model(batch.dense_features, batch.sparse_features)
            loss_sum = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="sum")
            (loss_sum / batch.labels.shape[0]).backward()  # local mean: see distributed.py
            optimizer.step()
            optimizer.zero_grad()
            loss_value = float(loss_sum.detach())
            train_seconds += time.perf_counter() - t0
            if not math.isfinite(loss_value):
                raise TrainingDiverged(
                    f"training loss became {loss_value} at step {step + 1} on rank {ctx.rank}; "
                    "lower the learning rates (sparse_optimizer.lr, dense_optimizer.lr)"
                )
            step += 1
            loss_window += loss_value
            window_rows += batch.labels.shape[0]
            bar.update(1)
            if step % config.train.log_every == 0 or step == total_steps:
                stats = torch.tensor([loss_window, float(window_rows)], dtype=torch.float64, device=ctx.device)
                dist.all_reduce(stats)
                sps = step * config.train.batch_size / max(train_seconds, 1e-9)
                record = {"loss": stats[0].item() / max(stats[1].item(), 1.0), "samples_per_second": sps,
                          "epoch": epoch, "sparse_lr": config.sparse_optimizer.lr,
                          "dense_lr": config.dense_optimizer.lr}
                runlog.record(step, "train", record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{sps:,.0f}")
                loss_window, window_rows = 0.0, 0
            if config.train.eval_every and step % config.train.eval_every == 0 and step < total_steps:
                valid_metrics = run_eval("valid")
                if valid_metrics is not None:
                    runlog.record(step, "valid", valid_metrics.as_dict())
                    if ctx.is_main:
                        bar.write(f"step {step}: valid AUC {valid_metrics.auc:.4f} LogLoss {valid_metrics.logloss:.4f}")
            if config.train.checkpoint_every and step % config.train.checkpoint_every == 0 and step < total_steps:
                save_checkpoint(run_dir, step, model, config, {**info, "epoch": epoch}, optimizer)
    bar.close()

    valid_metrics = run_eval("valid")
    test_metrics = run_eval("test")
    for name, m in (("valid", valid_metrics), ("test", test_metrics)):
        if m is not None:
            runlog.record(step, name, m.as_dict())
    sps = step * config.train.batch_size / max(train_seconds, 1e-9)
    final_info = {**info, "valid": valid_metrics and valid_metrics.as_dict(),
                  "test": test_metrics and test_metrics.as_dict()}
    checkpoint = save_checkpoint(run_dir, step, model, config, final_info, optimizer)
    result = TrainResult(run_dir, checkpoint, step, train_seconds, sps, valid_metrics, test_metrics)
    if ctx.is_main:
        summary = {**result.summary(), **table_bytes(meta, config), "world_size": ctx.world_size}
        (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        log.info("done: %s", json.dumps({k: summary[k] for k in ("steps", "samples_per_second")}))
    runlog.close()
    return result
