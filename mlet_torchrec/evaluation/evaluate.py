"""Sharded evaluation of a (sharded or plain) CTR model on one split: every rank scores its own slice.

Sharded embedding lookups are collective: every rank must run the same number of forward passes
with the same batch size. Ranks therefore pad their last partial batch with empty rows and, once
their data is exhausted, run empty batches; padded rows never reach the metrics. Predictions are
never gathered: each rank streams its logits into a
:class:`~mlet_torchrec.evaluation.metrics.MetricAccumulator` (bounded memory) and the metrics are
combined once at the end.

Example:
    >>> metrics = evaluate_split(model, "data/tiny", "test", 1024, meta)   # doctest: +SKIP
    >>> metrics.auc, metrics.auc_error_bound                               # doctest: +SKIP
    (0.7312, 2.1e-06)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from data_pipes.reader import ParquetBatchReader
from data_pipes.schema import DatasetMeta
from mlet_torchrec import ranks
from mlet_torchrec.evaluation.metrics import CTRMetrics, MetricAccumulator


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
        dense_features=torch.cat(
            [batch.dense_features, batch.dense_features.new_zeros(pad, batch.dense_features.shape[1])]
        ),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(keys=keys, values=kjt.values(), lengths=lengths),
        labels=torch.cat([batch.labels, batch.labels.new_zeros(pad)]),
    )


def empty_batch(keys: list[str], num_dense: int, size: int) -> Batch:
    return Batch(
        dense_features=torch.zeros(size, num_dense),
        sparse_features=KeyedJaggedTensor.from_lengths_sync(
            keys=keys,
            values=torch.zeros(0, dtype=torch.int64),
            lengths=torch.zeros(len(keys) * size, dtype=torch.int64),
        ),
        labels=torch.zeros(size),
    )


def _steps_over_ranks(local_steps: int, device: torch.device) -> int:
    if ranks.world()[1] == 1:
        return local_steps
    t = torch.tensor([local_steps], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


@dataclass(frozen=True)
class Scored:
    """One batch of this rank's rows: each model's logits (float32, CPU), the labels and the batch itself."""

    logits: list[torch.Tensor]
    labels: torch.Tensor
    batch: Batch | None  # the rows as read (None for a rank whose data is exhausted)


@torch.no_grad()
def score(
    models: Sequence[nn.Module],
    batches: Iterator[Batch],
    local_steps: int,
    batch_size: int,
    keys: list[str],
    num_dense: int,
    device: torch.device,
    keep: Sequence[int] | None = None,
) -> Iterator[Scored]:
    """Every model's logits on this rank's batches, one batch at a time, running as many steps as the
    slowest rank needs. Collective: consume the whole iterator on every rank.

    ``keep[s]``: how many leading rows of step ``s`` count (a row budget); all of them when None.
    """
    steps = _steps_over_ranks(local_steps, device)
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    it = iter(batches)
    try:
        for s in range(steps):
            batch = next(it, None)
            valid = 0 if batch is None else batch.labels.shape[0]
            if keep is not None:
                valid = min(valid, keep[s] if s < len(keep) else 0)
            padded = empty_batch(keys, num_dense, batch_size) if batch is None else pad_batch(batch, batch_size)
            padded = padded.to(device)
            logits = [
                m(padded.dense_features, padded.sparse_features).reshape(-1)[:valid].float().cpu() for m in models
            ]
            yield Scored(logits, padded.labels[:valid].cpu(), batch)
    finally:
        for m, was in zip(models, was_training, strict=True):
            m.train(was)


def evaluate(
    model: nn.Module,
    batches: Iterator[Batch],
    local_steps: int,
    batch_size: int,
    keys: list[str],
    num_dense: int,
    device: torch.device,
    auc: str = "histogram",
) -> CTRMetrics:
    """Metrics of ``model`` over every rank's batches (all ranks return the same numbers), bounded memory."""
    acc = MetricAccumulator(auc)
    for out in score([model], batches, local_steps, batch_size, keys, num_dense, device):
        acc.update(out.logits[0], out.labels)
    return acc.result()


def eval_device() -> torch.device:
    """Where evaluation batches go: this rank's GPU under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def split_stream(
    data_path: str | Path,
    split: str,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_rows: int | None = None,
    validate: bool = True,
) -> tuple[ParquetBatchReader, int, int, list[int] | None]:
    """(reader, steps, local batch, rows kept per step) of this rank's slice of ``split``.

    ``batch_size`` is global (split over the ranks). ``max_rows`` keeps the first ``max_rows`` rows of
    the split's stream (rank ``r`` holds its rows ``t ≡ r mod world_size``), the same rows at any world size.
    """
    local_batch = max(1, -(-batch_size // world_size))
    reader = ParquetBatchReader(
        data_path,
        split,
        local_batch,
        rank=rank,
        world_size=world_size,
        drop_last=False,
        shuffle=False,
        validate=validate,
    )
    steps = reader.num_batches()
    keep = None
    if max_rows is not None:
        glob = local_batch * world_size
        steps = min(steps, max(1, -(-max_rows // glob)))
        # stream row of this rank's i-th row in step s: s * glob + rank + world_size * i
        keep = [max(0, min(local_batch, -(-(max_rows - s * glob - rank) // world_size))) for s in range(steps)]
    return reader, steps, local_batch, keep


def score_split(
    models: Sequence[nn.Module],
    data_path: str | Path,
    split: str,
    batch_size: int,
    meta: DatasetMeta,
    max_rows: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Scored]:
    """:func:`score` over this rank's slice of ``split`` (at most ``max_rows`` rows over all ranks).
    Collective when ``world_size > 1``: every rank consumes the whole iterator."""
    reader, steps, local_batch, keep = split_stream(data_path, split, batch_size, rank, world_size, max_rows)
    return score(models, iter(reader), steps, local_batch, meta.sparse_names(), len(meta.dense), eval_device(), keep)


def evaluate_split(
    model: nn.Module,
    data_path: str | Path,
    split: str,
    batch_size: int,
    meta: DatasetMeta,
    max_rows: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    auc: str = "histogram",
) -> CTRMetrics:
    """Metrics of ``model`` on ``split`` over every rank (collective when ``world_size > 1``)."""
    acc = MetricAccumulator(auc)
    for out in score_split([model], data_path, split, batch_size, meta, max_rows, rank, world_size):
        acc.update(out.logits[0], out.labels)
    return acc.result()


def predict_split(
    model: nn.Module,
    data_path: str | Path,
    split: str,
    batch_size: int,
    meta: DatasetMeta,
    max_rows: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (probabilities, labels) on ``split``, held in memory (tests and small checks only;
    metrics use :func:`evaluate_split`)."""
    probs, labels = [], []
    for out in score_split([model], data_path, split, batch_size, meta, max_rows, rank, world_size):
        probs.append(torch.sigmoid(out.logits[0]))
        labels.append(out.labels)
    if not probs:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat(probs), torch.cat(labels)
