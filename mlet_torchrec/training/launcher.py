"""Run ``train`` on N local processes (a one-machine stand-in for torchrun/TorchX).

``mlet train --nproc-per-node 2`` and the tests use this; clusters use the TorchX components in
``launch/``, which start the same ``mlet train`` in every process.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Dict

from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from mlet_torchrec.config import ExperimentConfig


def _train_worker(config: Dict[str, Any], verbose: bool) -> Dict[str, Any]:
    from mlet_torchrec.logs import configure_logging
    from mlet_torchrec.training.train import train

    configure_logging(verbose)
    return train(ExperimentConfig.model_validate(config)).summary()


def in_distributed_job() -> bool:
    """True inside torchrun/TorchX/elastic_launch (they set WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def local_launch_config(nproc_per_node: int, run_prefix: str, max_restarts: int = 0) -> LaunchConfig:
    """One machine, N processes, a free rendezvous port: what the local jobs of `mlet` use."""
    return LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc_per_node,
        run_id=f"{run_prefix}-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=max_restarts,
        monitor_interval=0.5,
    )


def train_local(
    config: ExperimentConfig, nproc_per_node: int, max_restarts: int = 0, verbose: bool = False
) -> Dict[str, Any]:
    """Train on ``nproc_per_node`` processes of this machine; returns rank 0's result summary."""
    launch = local_launch_config(nproc_per_node, "mlet", max_restarts)
    results = elastic_launch(launch, entrypoint=_train_worker)(config.model_dump(mode="json"), verbose)
    return results[0]
