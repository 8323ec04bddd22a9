"""Staging for background checkpoint writes: a copy of the state dict, taken at the step.

DCP's default stager cannot copy TorchRec's ShardedTensors (it asks them for a ``data_ptr``), so
``async_save`` gets :class:`CopyStager`, which copies each local shard; the background thread then
writes the copy while training changes the weights.

Example:
    >>> import torch
    >>> state = {"w": torch.ones(2)}
    >>> copy = snapshot(state)
    >>> _ = state["w"].add_(1)
    >>> copy["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor


class CopyStager(AsyncStager):
    """Stages a state dict for a background write by copying every tensor now (sharded ones shard by shard):
    DCP's default stager cannot copy TorchRec's ShardedTensors. Training may then change the weights."""

    _synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return snapshot(state_dict)

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def snapshot(value: Any) -> Any:
    """A copy of every tensor in a (nested) state dict, ShardedTensors and DTensors included."""
    if isinstance(value, ShardedTensor):
        shards = [Shard(s.tensor.detach().clone(), s.metadata) for s in value.local_shards()]
        return ShardedTensor._init_from_local_shards_and_global_metadata(  # noqa: SLF001 - the documented way
            shards, value.metadata(), process_group=value._process_group
        )
    if isinstance(value, DTensor):
        return DTensor.from_local(
            value.to_local().detach().clone(),
            value.device_mesh,
            value.placements,
            shape=value.shape,
            stride=value.stride(),
        )
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return type(value)((k, snapshot(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    return value
