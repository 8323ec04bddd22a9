"""Evaluation of a (sharded or plain) CTR model on one split, with metrics gathered over ranks.

Sharded embedding lookups are collective: every rank must run the same number of forward passes
with the same batch size. Ranks therefore pad their last partial batch with empty rows and, once
their data is exhausted, run empty batches; padded rows never reach the metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from data_pipes.reader import ParquetBatchReader
from data_pipes.schema import DatasetMeta
from mlet_torchrec.evaluation.metrics import CTRMetrics, ctr_metrics, gather_predictions


def pad_batch(batch: Batch, size: int) -> Batch:
    """Grow ``batch`` to ``size`` rows with empty bags, zero dense features and zero labels."""
    rows = batch.labels.shape[0]
    pad = size - rows
    if pad <= 0:
        return batch
    kjt = batch.sparse_features
    keys = kjt.keys()
    lengths = kjt.lengths().view(len(keys), rows)
    lengths = torch.cat([lengths, lengths.new_zeros(len(keys), pad)], dim=1).reshape(-1)
    return Batch(
        dense_features=torch.cat([batch.dense_features, batch.dense_features.new_zeros(pad, batch.dense_features.shape[1])]),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(keys=keys, values=kjt.values(), lengths=lengths),
        labels=torch.cat([batch.labels, batch.labels.new_zeros(pad)]),
    )


def empty_batch(keys: list[str], num_dense: int, size: int) -> Batch:
    return Batch(
        dense_features=torch.zeros(size, num_dense),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=keys, values=torch.zeros(0, dtype=torch.int64), lengths=torch.zeros(len(keys) * size, dtype=torch.int64)
        ),
        labels=torch.zeros(size),
    )


def _steps_over_ranks(local_steps: int, device: torch.device) -> int:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local_steps
    t = torch.tensor([local_steps], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterator[Batch],
    local_steps: int,
    batch_size: int,
    keys: list[str],
    num_dense: int,
    device: torch.device,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's (probabilities, labels), running as many steps as the slowest rank needs."""
    steps = _steps_over_ranks(local_steps, device)
    was_training = model.training
    model.eval()
    probs, labels = [], []
    it = iter(batches)
    for _ in range(steps):
        batch = next(it, None)
        valid = 0 if batch is None else batch.labels.shape[0]
        batch = empty_batch(keys, num_dense, batch_size) if batch is None else pad_batch(batch, batch_size)
        batch = batch.to(device)
        logits = model(batch.dense_features, batch.sparse_features)
        probs.append(torch.sigmoid(logits[:valid].float()).cpu())
        labels.append(batch.labels[:valid].cpu())
    model.train(was_training)
    if not probs:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(probs), torch.cat(labels)


def evaluate(
    model: nn.Module,
    batches: Iterator[Batch],
    local_steps: int,
    batch_size: int,
    keys: list[str],
    num_dense: int,
    device: torch.device,
) -> CTRMetrics:
    """Metrics of ``model`` over every rank's batches (all ranks return the same numbers)."""
    probs, labels = predict(model, batches, local_steps, batch_size, keys, num_dense, device)
    return ctr_metrics(*gather_predictions(probs, labels))


def predict_split(
    model: nn.Module,
    data_path: str | Path,
    split: str,
    batch_size: int,
    meta: DatasetMeta,
    max_rows: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's (probabilities, labels) on ``split``, at most ``max_rows`` rows over all ranks.

    ``batch_size`` is global (split over the ranks). Every rank must call it (sharded lookups are collective).
    """
    local_batch = max(1, -(-batch_size // world_size))
    reader = ParquetBatchReader(data_path, split, local_batch, rank=rank, world_size=world_size,
                                drop_last=False, shuffle=False)
    steps = reader.num_batches()
    if max_rows is not None:
        steps = min(steps, max(1, -(-max_rows // (local_batch * world_size))))
    device = torch.device("cpu")
    if world_size > 1 and dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    probs, labels = predict(model, iter(reader), steps, local_batch, meta.sparse_names(), len(meta.dense), device)
    if max_rows is not None:  # this rank's share of the sample
        share = -(-max_rows // world_size)
        probs, labels = probs[:share], labels[:share]
    return probs, labels
