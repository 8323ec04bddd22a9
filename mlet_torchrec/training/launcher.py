"""The one place that starts local processes: any verb of ``mlet`` on N processes of this machine.

A verb (train, collapse, evaluate, the INT8 check of export, the compression study) is a library function
written to run as every rank of a group (torchrun, TorchX, or this module); :func:`run_local` is the
one-machine stand-in for torchrun that ``mlet VERB --nproc-per-node N`` and the tests use. Clusters use the
TorchX components in ``launch/``, which start the same ``mlet VERB`` in every process.

A worker's ``UserError`` reaches the parent as that error's one line (raised again there as a ``UserError``),
not as elastic's ``ChildFailedError`` with a traceback per rank; anything else keeps elastic's report.

    >>> from functools import partial
    >>> run_local(2, partial(evaluate_path, "runs/tiny", "test"))  # doctest: +SKIP
    {'split': 'test', 'auc': 0.71, ...}
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from mlet_torchrec.config import ExperimentConfig
from mlet_torchrec.errors import EXIT_USER_ERROR, UserError

T = TypeVar("T")

# where torch logs a failed worker ("... failed", ERROR) and the stopping of the others ("Terminating process ...
# via signal SIGTERM", "Closing process ... via signal", WARNING): under load a slower rank is still running
_WORKER_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.multiprocessing.spawn")
# the signals elastic's agent handles in the process that calls it (TORCHELASTIC_SIGNALS_TO_HANDLE's default)
_AGENT_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, name)
)
# where elastic logs the Ctrl-C it forwards to the workers ("Received 2 death signal, shutting down workers")
_AGENT_LOGGERS = ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api")


def run_local(
    nproc_per_node: int,
    call: Callable[[], T],
    log_level: str | bool = "INFO",
    max_restarts: int = 0,
    fresh_dir: Path | str | None = None,
) -> T:
    """``call()`` in each of ``nproc_per_node`` local processes, one rank each; returns rank 0's result.

    ``call`` must pickle (a module-level function, or a ``functools.partial`` of one) and so must its
    result. Each worker logs at ``log_level``. On a worker's ``UserError`` the job stops and that error's one
    line is raised here; ``fresh_dir``, a run directory the job may have created, is then removed unless it
    existed before or holds a checkpoint (several ranks may fail at different steps: the parent cleans up).
    """
    from mlet_torchrec.training.run_dir import discard_fresh_run_dir

    existed_before = fresh_dir is not None and Path(fresh_dir).exists()
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc_per_node,
        run_id=f"mlet-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port
        max_restarts=max_restarts,
        monitor_interval=0.5,
    )
    with tempfile.TemporaryDirectory(prefix="mlet-errors-") as folder, _signal_handlers_kept():
        # elastic logs every failed worker with a stack trace of its own, and (as warnings) the signals that stop
        # the workers still running; for a reported UserError the one line says it all, so drop those records
        # (and only those: a crash keeps them)
        filters: list[tuple[str, logging.Filter]] = [(n, _WhenUserError(Path(folder))) for n in _WORKER_LOGGERS]
        filters += [(n, _OnCtrlC()) for n in _AGENT_LOGGERS]
        for name, quiet in filters:
            logging.getLogger(name).addFilter(quiet)
        try:
            results: dict[int, T] = elastic_launch(launch, entrypoint=_worker)(call, log_level, folder)
            return results[0]
        except ChildFailedError:
            error = _reported_error(Path(folder))
            if error is None:
                raise
            if fresh_dir is not None:
                discard_fresh_run_dir(fresh_dir, existed_before)
            raise error from None
        except SignalException as stop:
            # Ctrl-C: elastic has stopped the workers; a worker that saw it says where it stopped (train: the
            # step and the checkpoint to resume from), else the command's plain "interrupted" (exit 130 both)
            if stop.sigval != signal.SIGINT:
                raise
            if fresh_dir is not None:
                discard_fresh_run_dir(fresh_dir, existed_before)
            raise (_reported_error(Path(folder)) or KeyboardInterrupt()) from None
        finally:
            for name, quiet in filters:
                logging.getLogger(name).removeFilter(quiet)


@contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Puts back the caller's handlers of the signals elastic takes over (it installs its own on start and never
    restores them), so that a later Ctrl-C in a caller that goes on (a sweep, a notebook, the tests) is its own
    ``KeyboardInterrupt``, not elastic's ``SignalException``. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {number: signal.getsignal(number) for number in _AGENT_SIGNALS}
    try:
        yield
    finally:
        for number, handler in kept.items():
            if handler is not None:  # None: installed outside Python, cannot be set again from here
                signal.signal(number, handler)


def _reported_error(folder: Path) -> UserError | None:
    """The first ``UserError`` a worker of :func:`run_local` left in ``folder`` (see :func:`_worker`), if any."""
    messages = sorted(folder.iterdir())
    if not messages:
        return None
    kind, _, message = messages[0].read_text().partition("\n")
    return _user_error(kind)(message)


def _worker(call: Callable[[], T], log_level: str | bool, errors: str) -> T:
    """One rank of :func:`run_local`: a ``UserError`` leaves its message in ``errors`` for the parent and ends
    the process with status 2, no traceback; anything else propagates as usual."""
    from mlet_torchrec.logs import configure_logging
    from mlet_torchrec.training.run_dir import CtrlC

    configure_logging(log_level)  # workers inherit no logging or warning settings
    # for the rank's whole life, so a Ctrl-C's second SIGINT (elastic forwards what the terminal sent the rank
    # too) cannot interrupt the first one's one line, even after training's own handler is gone
    signal.signal(signal.SIGINT, CtrlC(sys.unraisablehook))
    try:
        return call()
    except UserError as err:
        kind = f"{type(err).__module__}:{type(err).__qualname__}"  # the parent raises the same kind (exit code)
        Path(errors, f"rank{os.environ.get('RANK', '0')}").write_text(f"{kind}\n{' '.join(str(err).split())}")
        raise SystemExit(EXIT_USER_ERROR) from None  # a plain exit status: elastic records no stack trace


def _user_error(kind: str) -> type[UserError]:
    """The ``UserError`` subclass a worker named (``module:qualname``, written by :func:`_worker`)."""
    module, _, name = kind.partition(":")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return UserError
    return found if isinstance(found, type) and issubclass(found, UserError) else UserError


class _WhenUserError(logging.Filter):
    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING or not any(self.folder.iterdir())


class _OnCtrlC(logging.Filter):
    """Drops elastic's records of the Ctrl-C it forwards to the workers ("Received SIGINT death signal ...",
    "Closing process N via signal SIGINT"): an interrupted job ends in its one line. Only those two
    messages, and only for SIGINT: a record that merely holds a 2 (a local rank, an exit code) is kept.

    Example:
        >>> closing = "Closing process %s via signal %s"
        >>> _OnCtrlC().filter(logging.LogRecord("x", logging.WARNING, "", 0, closing, (7, "SIGINT"), None))
        False
    """

    MESSAGES = ("Received %s death signal, shutting down workers", "Closing process %s via signal %s")

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (record.msg in self.MESSAGES and args and args[-1] in (signal.SIGINT, "SIGINT"))


def train_summary(config: dict[str, Any]) -> dict[str, Any]:
    """``train`` on this rank of the job, from a config as JSON; the result summary (the verb of ``mlet train``)."""
    from mlet_torchrec.training.train import train

    return train(ExperimentConfig.model_validate(config)).summary()


def train_local(
    config: ExperimentConfig, nproc_per_node: int, max_restarts: int = 0, log_level: str | bool = "INFO"
) -> dict[str, Any]:
    """Train ``config`` on ``nproc_per_node`` processes of this machine; rank 0's result summary."""
    call = partial(train_summary, config.model_dump(mode="json"))
    return run_local(nproc_per_node, call, log_level, max_restarts, fresh_dir=config.run.dir)
