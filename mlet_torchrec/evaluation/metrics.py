"""CTR metrics over predictions gathered from every rank: AUC, LogLoss, PR-AUC.

Example:
    >>> import torch
    >>> m = ctr_metrics(torch.tensor([0.1, 0.9, 0.8]), torch.tensor([0.0, 1.0, 0.0]))
    >>> round(m.auc, 3)
    1.0
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc, binary_average_precision


@dataclass(frozen=True)
class CTRMetrics:
    auc: float
    logloss: float
    pr_auc: float
    positive_rate: float
    label_entropy: float  # LogLoss of always predicting the positive rate: the bar to clear
    rows: int

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def ctr_metrics(probs: torch.Tensor, labels: torch.Tensor) -> CTRMetrics:
    probs = probs.double().clamp(1e-7, 1 - 1e-7)
    labels = labels.double()
    p = float(labels.mean()) if labels.numel() else float("nan")
    entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p)) if 0 < p < 1 else 0.0
    both = 0 < labels.sum() < labels.numel()
    return CTRMetrics(
        auc=float(binary_auroc(probs, labels.long())) if both else float("nan"),
        logloss=float(F.binary_cross_entropy(probs, labels)),
        pr_auc=float(binary_average_precision(probs, labels.long())) if both else float("nan"),
        positive_rate=p,
        label_entropy=entropy,
        rows=int(labels.numel()),
    )


def gather_predictions(probs: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Concatenate every rank's (probs, labels) on every rank (sizes may differ between ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return probs, labels
    # nccl gathers CUDA tensors only; gloo takes CPU tensors
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    local = torch.stack([probs.float(), labels.float()]).to(dev)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[1]], dtype=torch.int64, device=dev))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(2, longest, device=dev)
    padded[:, : local.shape[1]] = local
    gathered = [torch.zeros(2, longest, device=dev) for _ in sizes]
    dist.all_gather(gathered, padded)
    merged = torch.cat([g[:, : int(s.item())] for g, s in zip(gathered, sizes)], dim=1).cpu()
    return merged[0], merged[1]
