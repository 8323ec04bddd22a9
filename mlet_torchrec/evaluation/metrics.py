"""CTR metrics with bounded memory over every rank's predictions: AUC, LogLoss, PR-AUC, calibration.

Each rank feeds its own rows to a :class:`MetricAccumulator`; :meth:`~MetricAccumulator.result` combines
the ranks (a collective when a process group of more than one rank is up). Nothing is gathered:

* LogLoss and calibration (mean prediction / positive rate) come from float64 sums, all-reduced;
* ``auc="histogram"`` (default): AUC and PR-AUC from a 2^16-bin logit histogram of integer counts,
  all-reduced (identical for any world size), with the AUC's error bound (``auc_error_bound``, see
  :mod:`~mlet_torchrec.evaluation.ranking`); memory O(2^16) per rank;
* ``auc="exact"``: every rank sorts its scores and streams them to rank 0 in fixed-size chunks; rank 0
  ranks them (memory O(rows) on rank 0 only) and broadcasts AUC and PR-AUC; the bound is 0.

Example:
    >>> import torch
    >>> acc = MetricAccumulator()
    >>> acc.update(torch.tensor([-2.0, 2.0, 1.5]), torch.tensor([0.0, 1.0, 0.0]))
    >>> m = acc.result()
    >>> m.auc, m.rows
    (1.0, 3)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from mlet_torchrec import ranks
from mlet_torchrec.evaluation.ranking import (
    BINS,
    add_to_histogram,
    auc_error_bound,
    auc_from_groups,
    average_precision_from_groups,
    exact_groups,
)
from mlet_torchrec.options import AUC_MODES

AucMode = Literal["histogram", "exact"]
EPS = 1e-7  # predictions are clamped to [EPS, 1 - EPS] for the LogLoss
CHUNK = 1 << 16  # rows per message of the exact mode's stream to rank 0


@dataclass(frozen=True)
class CTRMetrics:
    auc: float
    logloss: float
    pr_auc: float
    positive_rate: float
    label_entropy: float  # LogLoss of always predicting the positive rate: the bar to clear
    rows: int
    mean_prediction: float = float("nan")
    calibration: float = float("nan")  # mean prediction / positive rate (1 = calibrated)
    auc_mode: str = "histogram"
    auc_error_bound: float = 0.0  # |AUC - exact AUC| <= this (0 in exact mode)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _comm_device() -> torch.device:
    """nccl reduces CUDA tensors only; gloo takes CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class MetricAccumulator:
    """Streaming CTR metrics of one rank's rows; :meth:`result` combines the ranks (collective in a job)."""

    def __init__(self, auc: str = "histogram", local: bool = False) -> None:
        """``local``: this process's rows only, never a collective (predictions already in one place)."""
        if auc not in AUC_MODES:
            raise ValueError(f"auc mode {auc!r} is not one of {AUC_MODES}")
        self.mode = auc
        self.local = local
        # rows, positives, Σ logloss, Σ p: float64 (exact integers up to 2^53 rows)
        self.sums = torch.zeros(4, dtype=torch.float64)
        self.counts = torch.zeros(2, BINS, dtype=torch.int64)
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add rows: the model's logits (not probabilities) and their 0/1 labels."""
        logits = logits.detach().reshape(-1).cpu()
        if logits.dtype != torch.float64:
            logits = logits.float()  # float32 models' own precision; float64 scores stay as given
        y = labels.detach().reshape(-1).double().cpu()
        p = torch.sigmoid(logits.double()).clamp(EPS, 1 - EPS)
        loss = -(y * torch.log(p) + (1 - y) * torch.log1p(-p))
        self.sums += torch.stack([torch.tensor(float(y.numel()), dtype=torch.float64), y.sum(), loss.sum(), p.sum()])
        if self.mode == "histogram":
            add_to_histogram(self.counts, logits, y)
        else:
            self._scores.append(logits)
            self._labels.append(y.to(torch.uint8))

    def result(self) -> CTRMetrics:
        """The metrics over every rank's rows (every rank must call it; all return the same numbers). In exact
        mode the kept scores are released: call it once."""
        sums, counts = self.sums, self.counts
        distributed = not self.local and ranks.world()[1] > 1
        if distributed:
            dev = _comm_device()
            sums = sums.to(dev)
            dist.all_reduce(sums)
            sums = sums.cpu()
            if self.mode == "histogram":
                counts = counts.to(dev)
                dist.all_reduce(counts)
                counts = counts.cpu()
        rows, positives, loss, psum = (float(v) for v in sums)
        if self.mode == "histogram":
            neg, pos = counts[0], counts[1]
            auc, bound = auc_from_groups(pos, neg), auc_error_bound(pos, neg)
            ap = average_precision_from_groups(pos, neg)
        else:
            auc, ap = _exact_ranking(self._scores, self._labels, distributed)
            bound = 0.0 if not math.isnan(auc) else float("nan")
        rate = positives / rows if rows else float("nan")
        entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if 0 < rate < 1 else 0.0
        mean_p = psum / rows if rows else float("nan")
        return CTRMetrics(
            auc=auc,
            logloss=loss / rows if rows else float("nan"),
            pr_auc=ap,
            positive_rate=rate,
            label_entropy=entropy,
            rows=int(rows),
            mean_prediction=mean_p,
            calibration=mean_p / rate if rate and rate == rate else float("nan"),
            auc_mode=self.mode,
            auc_error_bound=bound,
        )


def _exact_ranking(scores: list[torch.Tensor], labels: list[torch.Tensor], distributed: bool) -> tuple[float, float]:
    """(AUC, PR-AUC) of every rank's rows: sorted local runs streamed to rank 0 in ``CHUNK``-row messages."""
    s = torch.cat(scores) if scores else torch.zeros(0)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.uint8)
    scores.clear()
    labels.clear()
    s, order = torch.sort(s, stable=True)
    y = y[order]
    del order
    runs = 1
    if distributed:
        s, y = _stream_to_rank0(s, y)
        runs = dist.get_world_size()
    out = torch.tensor([float("nan"), float("nan")], dtype=torch.float64)
    if s is not None:
        pos, neg = exact_groups(s, y, presorted=runs == 1)  # rank 0 re-sorts the ranks' sorted runs
        out = torch.tensor([auc_from_groups(pos, neg), average_precision_from_groups(pos, neg)], dtype=torch.float64)
    if distributed:
        dev = _comm_device()
        out = out.to(dev)
        dist.broadcast(out, src=0)
        out = out.cpu()
    return float(out[0]), float(out[1])


def _stream_to_rank0(s: torch.Tensor, y: torch.Tensor) -> tuple[Any, Any]:
    """Rank 0 receives every rank's sorted (score, label) rows chunk by chunk; other ranks return (None, None)."""
    dev, world, rank = _comm_device(), dist.get_world_size(), dist.get_rank()
    longest = torch.tensor([s.numel()], dtype=torch.int64, device=dev)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    parts_s: list[torch.Tensor] = []
    parts_y: list[torch.Tensor] = []
    for start in range(0, int(longest.item()), CHUNK):
        piece = torch.zeros(2 * CHUNK + 1, dtype=torch.float64)
        n = max(0, min(CHUNK, s.numel() - start))
        piece[0] = n
        piece[1 : 1 + n] = s[start : start + n].double()
        piece[1 + CHUNK : 1 + CHUNK + n] = y[start : start + n].double()
        piece = piece.to(dev)
        inbox = [torch.empty_like(piece) for _ in range(world)] if rank == 0 else None
        dist.gather(piece, inbox, dst=0)
        if inbox is not None:
            for got in inbox:
                got = got.cpu()
                k = int(got[0])
                parts_s.append(got[1 : 1 + k].to(s.dtype))
                parts_y.append(got[1 + CHUNK : 1 + CHUNK + k].to(torch.uint8))
    if rank != 0:
        return None, None
    return (torch.cat(parts_s) if parts_s else torch.zeros(0, dtype=s.dtype)), (
        torch.cat(parts_y) if parts_y else torch.zeros(0, dtype=torch.uint8)
    )


def ctr_metrics(probs: torch.Tensor, labels: torch.Tensor, auc: str = "exact") -> CTRMetrics:
    """Metrics of predictions already in this process (no collective), from probabilities.

    >>> round(ctr_metrics(torch.tensor([0.1, 0.9, 0.8]), torch.tensor([0.0, 1.0, 0.0])).auc, 3)
    1.0
    """
    p = probs.double().clamp(EPS, 1 - EPS)
    acc = MetricAccumulator(auc, local=True)
    acc.update(torch.log(p) - torch.log1p(-p), labels)
    return acc.result()
