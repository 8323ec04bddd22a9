"""What a training run reports: its result, the per-step event hooks see, and its table sizes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.datasets.utils import Batch

from data_pipes.schema import DatasetMeta
from mlet_torchrec.config import ExperimentConfig
from mlet_torchrec.evaluation.metrics import CTRMetrics
from mlet_torchrec.training.table_size import table_sizes


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    train_seconds: float
    samples_per_second: float
    valid: CTRMetrics | None
    test: CTRMetrics | None
    resumed_from: Path | None = None
    """The checkpoint this run continued from (None: it started at step 0)."""
    start_step: int = 0

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out["run_dir"], out["checkpoint"] = str(self.run_dir), str(self.checkpoint)
        out["resumed_from"] = None if self.resumed_from is None else str(self.resumed_from)
        return out


@dataclass
class StepEvent:
    """What a ``train(config, hooks=...)`` hook sees after every step (on every rank)."""

    step: int
    epoch: int
    batches_in_epoch: int
    batch: Batch  # this rank's batch
    model: nn.Module
    rank: int
    world_size: int
    checkpoint: Path | None  # written at this step, if any
    step_loss: tuple[torch.Tensor, torch.Tensor]  # this rank's (loss sum, rows), on the device

    @property
    def loss(self) -> float:
        """Mean loss of the step's global batch. Reading it waits for the device, and with several ranks it
        is collective (an all-reduce): read it on every rank or on none."""
        stats = torch.stack([t.detach().double() for t in self.step_loss])
        if self.world_size > 1:
            dist.all_reduce(stats)
        loss_sum, rows = stats.tolist()
        return loss_sum / max(rows, 1.0)


StepHook = Callable[[StepEvent], None]


def table_bytes(meta: DatasetMeta, config: ExperimentConfig) -> dict[str, int]:
    """Bytes of the tables at serving (fp32 n x d) and while training (W1 at its dtype, plus W2), as
    :mod:`~mlet_torchrec.training.table_size` counts them."""
    sizes = table_sizes(config, meta)
    return {
        "serving_table_bytes": sum(t.serving for t in sizes),
        "training_table_bytes": sum(t.weights + t.w2 for t in sizes),
    }
