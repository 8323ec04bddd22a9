"""Collapse checks its own work: the collapsed model's predictions against the factored model's.

Both models come from the artifact collapse already loaded (:class:`~mlet_torchrec.serving.artifact.Artifact`):
in one process they are materialized here, in a job they are sharded over the ranks (every rank predicts its
slice of the split; the max |diff| is reduced and the metrics combined with bounded memory, nothing gathered).

Example:
    >>> rows, max_diff, metrics = check_predictions(source, written, "test")   # doctest: +SKIP
    >>> max_diff <= 1e-5                                                       # doctest: +SKIP
    True
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mlet_torchrec import ranks
from mlet_torchrec.evaluation.evaluate import eval_device, score_split
from mlet_torchrec.evaluation.metrics import MetricAccumulator
from mlet_torchrec.serving.artifact import Artifact, shard_for_job


class CollapseMismatch(RuntimeError):
    """The collapsed model does not reproduce the factored model's predictions."""


def check_predictions(
    source: Artifact, written: Artifact, split: str | None, max_rows: int | None = None, distributed: bool = False
) -> tuple[int, float, dict[str, float]]:
    """(rows checked, max |p_factored - p_collapsed|, the collapsed model's metrics) on ``split``.

    Both models score each batch in one pass; nothing but the metrics' fixed-size state is kept.
    """
    if split is None:
        return 0, 0.0, {}
    config, meta = source.config, source.meta
    rank, world = 0, 1
    if distributed:
        rank, world = ranks.world()
        factored = shard_for_job(source, eval_device(), world)
        plain = shard_for_job(written, eval_device(), world)
    else:
        factored, plain = source.materialize(), written.materialize()
    acc = MetricAccumulator()
    worst = 0.0
    for out in score_split(
        [factored, plain], config.data.path, split, config.train.eval_batch_size, meta, max_rows, rank, world
    ):
        if out.labels.numel():
            diff = (torch.sigmoid(out.logits[0].double()) - torch.sigmoid(out.logits[1].double())).abs().max()
            worst = max(worst, float(diff))
        acc.update(out.logits[1], out.labels)
    metrics = acc.result()
    if distributed:
        stat = torch.tensor([worst], dtype=torch.float64, device=eval_device())
        dist.all_reduce(stat, op=dist.ReduceOp.MAX)
        worst = float(stat.item())
    return metrics.rows, worst, metrics.as_dict()
