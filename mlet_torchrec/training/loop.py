"""The training step and what drives it: TorchRec's train pipelines or a plain loop, without host syncs.

:class:`TrainStep` is the module the sharded model wraps: it takes the batch as its one argument and
returns ``(loss, (loss_sum, rows, logits))``, the form TorchRec's pipelines call. Its only child is the model's
``net``, so checkpoint keys are those of the model itself. :class:`LogitsView` gives evaluation the
usual ``(dense, sparse) -> logits`` call on the same module.

:class:`StepDriver` runs a given number of steps over a batch iterator and yields, per step, the batch
the model consumed and the step's on-device ``(loss_sum, rows, logits)``. With ``TrainPipelineSparseDist`` the
input distribution of batch i+1 overlaps the compute of batch i (on CUDA streams; on CPU/gloo it runs
at the plain loop's rate), so up to two batches beyond the current step are fetched: the loop counts
steps by what the model consumed, never by what the pipeline fetched, and each run of steps is given an
iterator of exactly its batches, so the pipeline drains at its end and the reader's position stays exact.

:class:`LossWindow` accumulates the loss, the row count and the first non-finite step on the device; it
is read (one all-reduce) only every ``log_every`` steps and before any checkpoint or evaluation.

Example:
    >>> driver = StepDriver("none", model, optimizer, torch.device("cpu"))   # doctest: +SKIP
    >>> for batch, (loss_sum, rows, _) in driver.run(iter(batches), 10):        # doctest: +SKIP
    ...     window.add(loss_sum, rows, step)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch

log = logging.getLogger("mlet.train")

StepOutput = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # this rank's (loss sum, rows, logits), on the device


class TrainStep(nn.Module):
    """``batch -> (mean loss, (loss sum, rows, logits))`` around a model's ``net`` (``CTRModel.net``).

    ``bf16``: the forward runs under CUDA bf16 autocast; the loss is computed in fp32.
    """

    def __init__(self, net: nn.Module, bf16: bool = False) -> None:
        super().__init__()
        self.net = net
        self.bf16 = bf16

    def forward(self, batch: Batch) -> tuple[torch.Tensor, StepOutput]:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.net(batch.dense_features, batch.sparse_features)
        logits = logits.squeeze(-1).float()
        loss_sum = F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="sum")
        rows = torch.full((), batch.labels.shape[0], dtype=torch.float32, device=logits.device)
        # local mean: see distributed.py for how the ranks' gradients combine
        return loss_sum / batch.labels.shape[0], (loss_sum.detach(), rows, logits.detach())


class LogitsView(nn.Module):
    """``(dense, sparse) -> logits`` through the sharded :class:`TrainStep` (its embedding collectives included)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, dense: torch.Tensor, sparse: Any) -> torch.Tensor:
        labels = torch.zeros(dense.shape[0], dtype=torch.float32, device=dense.device)
        _, (_, _, logits) = self.model(Batch(dense_features=dense, sparse_features=sparse, labels=labels))
        return logits


class LossWindow:
    """On-device sums of the loss and rows since the last read, and the first step whose loss was not finite."""

    NONE = torch.iinfo(torch.int64).max

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._sums = torch.zeros(2, dtype=torch.float64, device=device)
        self._first_bad = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def add(self, loss_sum: torch.Tensor, rows: torch.Tensor, step: int) -> None:
        """Account for (1-based) ``step``; no host sync."""
        self._sums += torch.stack([loss_sum.double(), rows.double()])
        bad = ~torch.isfinite(loss_sum)
        self._first_bad = torch.minimum(
            self._first_bad, torch.where(bad, torch.full_like(self._first_bad, step), self._first_bad)
        )

    def peek(self, world_size: int) -> tuple[float, float, int | None]:
        """Collective: (global loss sum, global rows, first non-finite step on any rank or None) so far."""
        sums, first = self._sums.clone(), self._first_bad.clone()
        if world_size > 1:
            dist.all_reduce(sums)
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        loss, rows = sums.tolist()
        bad = int(first.item())
        return loss, rows, None if bad == self.NONE else bad

    def read(self, world_size: int) -> tuple[float, float, int | None]:
        """:meth:`peek`, then start a new window."""
        out = self.peek(world_size)
        self._sums.zero_()
        self._first_bad.fill_(self.NONE)
        return out


def _recording(it: Iterator[Batch], fetched: deque[Batch]) -> Iterator[Batch]:
    for batch in it:
        fetched.append(batch)
        yield batch


class StepDriver:
    """Runs training steps through the chosen pipeline ('auto', 'sparse_dist', 'base', 'none')."""

    def __init__(self, kind: str, model: nn.Module, optimizer: Any, device: torch.device) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device
        self.kind = "sparse_dist" if kind == "auto" else kind
        self._pipeline: Any = None
        if self.kind == "sparse_dist":
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            self._pipeline = TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)
        elif self.kind == "base":
            from torchrec.distributed.train_pipeline import TrainPipelineBase

            self._pipeline = TrainPipelineBase(model, optimizer, device)
        self.name = type(self._pipeline).__name__ if self._pipeline is not None else "plain loop"

    def run(self, batches: Iterator[Batch], steps: int) -> Iterator[tuple[Batch, StepOutput]]:
        """``steps`` training steps on the next ``steps`` batches of ``batches`` (no more are read)."""
        own = itertools.islice(batches, steps)
        if self._pipeline is None:
            for batch in own:
                batch = batch.to(self.device, non_blocking=True)
                self.optimizer.zero_grad()
                loss, out = self.model(batch)
                loss.backward()
                self.optimizer.step()
                yield batch, out
            return
        if self.kind == "base":
            self._pipeline.reset()  # TrainPipelineBase binds to its first iterator: each run brings its own
        fetched: deque[Batch] = deque()
        source = _recording(own, fetched)
        for _ in range(steps):
            out = self._pipeline.progress(source)
            yield fetched.popleft(), out
        # every batch was consumed: the pipeline is empty again
        assert not fetched, f"{len(fetched)} batch(es) fetched but not trained"

    @contextlib.contextmanager
    def plain_model(self) -> Iterator[nn.Module]:
        """The model with its ordinary forward (evaluation), between runs of steps."""
        if self._pipeline is None or not hasattr(self._pipeline, "detach"):
            yield self.model
            return
        self._pipeline.detach()
        try:
            yield self.model
        finally:
            self._pipeline.attach()
