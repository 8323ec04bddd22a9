"""Run ``train`` on N local processes (a one-machine stand-in for torchrun/TorchX).

``mlet train --nproc-per-node 2`` and the tests use this; clusters use the TorchX components in
``launch/``, which start the same ``mlet train`` in every process.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from mlet_torchrec.config import ExperimentConfig
from mlet_torchrec.errors import EXIT_USER_ERROR, UserError


def _train_worker(config: dict[str, Any], verbose: bool, errors: str) -> dict[str, Any]:
    from mlet_torchrec.logs import configure_logging
    from mlet_torchrec.training.train import train

    configure_logging(verbose)
    with user_errors_to_parent(errors):
        return train(ExperimentConfig.model_validate(config)).summary()


class user_errors_to_parent:
    """In a worker of :func:`launch_local` (whose last argument is ``errors``): a ``UserError`` leaves its
    message in that folder for the parent and ends the process with status 2, no traceback; anything else
    propagates as usual."""

    def __init__(self, errors: str) -> None:
        self.errors = errors

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Any, tb: Any) -> None:
        if isinstance(err, UserError):
            Path(self.errors, f"rank{os.environ.get('RANK', '0')}").write_text(" ".join(str(err).split()))
            raise SystemExit(EXIT_USER_ERROR) from None  # a plain exit status: elastic records no stack trace


def launch_local(launch: LaunchConfig, entrypoint: Callable[..., Any], *args: Any) -> dict[int, Any]:
    """``elastic_launch(launch, entrypoint)(*args, errors)``, but a worker's ``UserError`` (see
    :class:`user_errors_to_parent`) is raised here as that ``UserError``'s one line, not as a ChildFailedError."""
    with tempfile.TemporaryDirectory(prefix="mlet-errors-") as folder:
        # elastic logs every failed worker with a stack trace of its own, and (as warnings) the signals that stop
        # the workers still running; for a reported UserError the one line below says it all, so drop those
        # records (and only those: a crash keeps them)
        quiet = _WhenUserError(Path(folder))
        for name in _WORKER_LOGGERS:
            logging.getLogger(name).addFilter(quiet)
        try:
            results: dict[int, Any] = elastic_launch(launch, entrypoint=entrypoint)(*args, folder)
            return results
        except ChildFailedError:
            messages = sorted(Path(folder).iterdir())
            if messages:
                raise UserError(messages[0].read_text()) from None
            raise
        finally:
            for name in _WORKER_LOGGERS:
                logging.getLogger(name).removeFilter(quiet)


# where torch logs a failed worker ("... failed", ERROR) and the stopping of the others ("Terminating process ...
# via signal SIGTERM", "Closing process ... via signal", WARNING): under load a slower rank is still running
_WORKER_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.multiprocessing.spawn")


class _WhenUserError(logging.Filter):
    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING or not any(self.folder.iterdir())


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
) -> dict[str, Any]:
    """Train on ``nproc_per_node`` processes of this machine; returns rank 0's result summary."""
    from mlet_torchrec.training.run_dir import discard_fresh_run_dir

    launch = local_launch_config(nproc_per_node, "mlet", max_restarts)
    existed_before = Path(config.run.dir).exists()
    try:
        results = launch_local(launch, _train_worker, config.model_dump(mode="json"), verbose)
    except UserError:
        discard_fresh_run_dir(config.run.dir, existed_before)
        raise
    summary: dict[str, Any] = results[0]
    return summary
