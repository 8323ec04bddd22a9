"""Training controls around the combined (fused W1 + dense) optimizer: lr warmup and decay, dense clipping.

The schedule is a pure function of the step (:func:`lr_factor`), so a resumed run needs no scheduler
state: step s gets the same learning rates at any world size and after any restart. Both optimizers
follow it: the fused W1 optimizer reads its ``param_groups[0]["lr"]`` at every ``zero_grad``/``step``
(TorchRec hands it to FBGEMM, which applies it in the backward pass), so :class:`ScheduledOptimizer`
sets every group's lr in ``zero_grad``, before the step's forward and backward.

Clipping applies to the dense parameters (MLPs and W2) after DDP has averaged their gradients, so every
rank clips by the same global norm; it never reads the norm on the host.

Example:
    >>> [round(lr_factor(s, warmup=2, decay="linear", total=6, min_ratio=0.0), 2) for s in range(6)]
    [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mlet_torchrec.config import TrainConfig


def lr_factor(step: int, warmup: int, decay: str, total: int, min_ratio: float) -> float:
    """The multiplier of every base lr at 0-based ``step``: linear warmup over ``warmup`` steps, then
    ``decay`` ('none', 'linear', 'cosine') from 1 to ``min_ratio`` at step ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "none" or total <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "linear":
        return 1.0 - (1.0 - min_ratio) * t
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class ScheduledOptimizer:
    """The combined optimizer with the lr schedule and dense clipping; what the training loop (or
    TorchRec's train pipeline, which calls ``zero_grad`` before and ``step`` after every backward) drives.

    ``step`` counts the steps taken, starting from ``start_step`` (a resumed run's step).
    """

    def __init__(
        self,
        optimizer: Any,
        train: TrainConfig,
        total_steps: int,
        start_step: int = 0,
        base_lr: dict[str, float] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self._train = train
        self._total = total_steps
        self.steps_done = start_step
        subs = optimizer.optimizers if hasattr(optimizer, "optimizers") else [("", optimizer)]
        # the configured rates (by sub-optimizer name), not the groups' current ones: a loaded checkpoint
        # leaves its last scheduled rate there
        base = base_lr or {}
        self._base: list[tuple] = [
            (g, float(base.get(name, g["lr"]))) for name, opt in subs for g in opt.param_groups if "lr" in g
        ]
        dense = [opt for name, opt in subs if name == "dense"]
        self._dense: list[nn.Parameter] = [p for p in dense[0].params.values() if p.requires_grad] if dense else []
        self._scheduled = train.warmup_steps > 0 or train.lr_decay != "none"

    def factor(self) -> float:
        t = self._train
        return lr_factor(self.steps_done, t.warmup_steps, t.lr_decay, self._total, t.min_lr_ratio)

    def lrs(self) -> dict[str, float]:
        """Learning rates of the step about to run, per optimizer (for the logs)."""
        subs = self.optimizer.optimizers if hasattr(self.optimizer, "optimizers") else [("", self.optimizer)]
        return {name: float(opt.param_groups[0]["lr"]) for name, opt in subs if opt.param_groups}

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._scheduled:
            f = self.factor()
            for group, base in self._base:
                group["lr"] = base * f
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Any | None = None) -> None:
        clip = self._train.grad_clip_norm
        if clip is not None and self._dense:
            torch.nn.utils.clip_grad_norm_(self._dense, clip, foreach=True)
        self.optimizer.step()
        self.steps_done += 1

    # what TorchRec's pipeline and checkpointing may read through the wrapper
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()
