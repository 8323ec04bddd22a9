"""This process's place in its job: rank, world size, and the two collectives every writer needs.

Outside a process group (or in a group of one) this process is rank 0 of 1, and the collectives
do nothing: library code calls them alike in one process and on every rank of a job. Importing this
module imports no torch (a converting rank asks :func:`in_distributed_job` and never needs it).

    >>> world()  # not in a process group
    (0, 1)
    >>> is_main(), from_main("rank 0's choice")
    (True, "rank 0's choice")
"""

from __future__ import annotations

import os
from typing import TypeVar

T = TypeVar("T")


def in_distributed_job() -> bool:
    """True inside torchrun/TorchX/``launcher.run_local`` (they set WORLD_SIZE and RANK), before any process group
    exists."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def world() -> tuple[int, int]:
    """(this rank, the number of ranks) of the default process group; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0, the rank that decides and commits for the job (and in a lone process)."""
    return world()[0] == 0


def barrier() -> None:
    """Collective: wait for every rank (nothing to wait for in a lone process)."""
    if world()[1] > 1:
        import torch.distributed as dist

        dist.barrier()


def from_main(value: T) -> T:
    """Collective: rank 0's ``value`` (a picklable object) on every rank."""
    box = [value]
    if world()[1] > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(box, src=0)
    return box[0]
