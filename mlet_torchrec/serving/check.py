"""Collapse checks its own work: the collapsed model's predictions against the factored model's.

Both models come from the artifact collapse already loaded (:class:`~mlet_torchrec.serving.artifact.Artifact`):
in one process they are materialized here, in a job they are sharded over the ranks (every rank predicts its
slice of the split; the max |diff| is reduced, the predictions gathered for the metrics).

Example:
    >>> rows, max_diff, metrics = check_predictions(source, written, "test")   # doctest: +SKIP
    >>> max_diff <= 1e-5                                                       # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from mlet_torchrec.evaluation.evaluate import predict_split
from mlet_torchrec.evaluation.metrics import ctr_metrics, gather_predictions
from mlet_torchrec.serving.artifact import Artifact


class CollapseMismatch(RuntimeError):
    """The collapsed model does not reproduce the factored model's predictions."""


def check_predictions(source: Artifact, written: Artifact, split: Optional[str], max_rows: Optional[int] = None,
                      distributed: bool = False) -> Tuple[int, float, Dict[str, float]]:
    """(rows checked, max |p_factored - p_collapsed|, the collapsed model's metrics) on ``split``."""
    if split is None:
        return 0, 0.0, {}
    config, meta = source.config, source.meta
    batch = config.train.eval_batch_size
    if not distributed:
        p_factored, labels = predict_split(source.materialize(), config.data.path, split, batch, meta, max_rows)
        p_plain, _ = predict_split(written.materialize(), config.data.path, split, batch, meta, max_rows)
        diff = float((p_factored - p_plain).abs().max()) if labels.numel() else 0.0
        return int(labels.numel()), diff, ctr_metrics(p_plain, labels).as_dict()

    from data_pipes.schema import table_name
    from mlet_torchrec.training.distributed import init_distributed, sharding_constraints

    ctx = init_distributed(config.run.device)
    features = meta.sparse_names()
    constraints = sharding_constraints(config.embedding, features, {f: table_name(f) for f in features},
                                       ctx.world_size, ctx.device.type)
    factored = source.shard(constraints, ctx.device)
    plain = written.shard(constraints, ctx.device)
    p_factored, labels = predict_split(factored, config.data.path, split, batch, meta, max_rows, ctx.rank,
                                       ctx.world_size)
    p_plain, _ = predict_split(plain, config.data.path, split, batch, meta, max_rows, ctx.rank, ctx.world_size)
    local = float((p_factored - p_plain).abs().max()) if labels.numel() else 0.0
    stat = torch.tensor([local], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(stat, op=dist.ReduceOp.MAX)
    probs, all_labels = gather_predictions(p_plain, labels)
    return int(all_labels.numel()), float(stat.item()), ctr_metrics(probs, all_labels).as_dict()
