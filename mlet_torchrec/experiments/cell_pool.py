"""Warm worker processes that train sweep cells, shared by every store's sweep (``mlet results run --jobs N``).

Each store's sweep (one thread of ``mlet results run``, the only one that plans and appends that store's lines)
hands the runs of its pass to the pool; the pool trains them in its ``workers`` processes, one cell at a time
each, in-process (``run_cell_here`` with ``shared_process``: a worker pays torch's import once). So N cores stay
busy while any store has runs left: the last store with work fills every worker instead of one.

A worker that dies (killed, out of memory) breaks the pool: the sweeps stop with :class:`CellPoolBroken` and a
rerun resumes where they stopped. Workers ignore Ctrl-C; the process that owns the pool stops them.

Example (``fn`` stands in for training; it must be importable by the workers):
    >>> with CellPool(1, fn=len) as pool:  # doctest: +SKIP
    ...     pool.run("abc")  # (fn's result, seconds it took in the worker)
    (3, 1.1e-06)
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import TracebackType
from typing import Any

BROKEN = "a worker process of `mlet results run` died (killed, or out of memory?); rerun it to resume where it stopped"


class CellPoolBroken(RuntimeError):
    """A worker of the pool died: no further cell can run in it."""


class CellPoolStopped(CellPoolBroken):
    """The pool was stopped (Ctrl-C in the process that owns it): the sweeps end without running more cells."""


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the pool owner's to handle
    import torch

    torch.set_num_threads(1)  # one core per worker (OMP_NUM_THREADS is set before the workers start)


def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - start


def _run_cell(config: Any, nproc: int, freq_features: Any, compression: bool = True) -> dict[str, Any]:
    from mlet_torchrec.experiments.cell import run_cell_here

    return run_cell_here(config, nproc, freq_features, shared_process=True, compression=compression)


class CellPool:
    """``workers`` spawned processes training cells; :meth:`run` blocks the calling thread until its cell is done.

    ``fn`` (default: ``run_cell_here(config, nproc, freq_features, shared_process=True, compression=...)``) is
    called in a worker with :meth:`run`'s arguments."""

    def __init__(self, workers: int, fn: Callable[..., Any] = _run_cell) -> None:
        if workers < 1:
            raise ValueError(f"a cell pool needs at least 1 worker, got {workers}")
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the workers; this process only plans
        self.workers, self._fn = workers, fn
        self.stopping, self.broken = threading.Event(), threading.Event()
        self._ex = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=_worker_init)

    def run(self, *args: Any, **kwargs: Any) -> tuple[Any, float]:
        """``fn(*args, **kwargs)`` in a worker, and the seconds it took there (not the wait for a free worker);
        its exception is raised here, unless the pool was stopped meanwhile (:class:`CellPoolStopped`: a cell
        cut short by the stop is not a failed cell)."""
        self.check()
        try:
            result: tuple[Any, float] = self._ex.submit(_timed, self._fn, *args, **kwargs).result()
            return result
        except CellPoolBroken:
            raise
        except BrokenProcessPool as e:
            if self.stopping.is_set():
                raise CellPoolStopped("the cell pool was stopped") from e
            self.broken.set()
            raise CellPoolBroken(BROKEN) from e
        except Exception as e:
            if self.stopping.is_set():  # e.g. submit after the shutdown, or the cell the stop cut short
                raise CellPoolStopped("the cell pool was stopped") from e
            raise

    def check(self) -> None:
        """Raises :class:`CellPoolStopped` once the pool is stopped, :class:`CellPoolBroken` once a worker died."""
        if self.stopping.is_set():
            raise CellPoolStopped("the cell pool was stopped")
        if self.broken.is_set():
            raise CellPoolBroken(BROKEN)

    def usable(self) -> bool:
        """Neither stopped nor broken: a sweep may start on it."""
        return not (self.stopping.is_set() or self.broken.is_set())

    def close(self, stop: bool = False) -> None:
        """Wait for the workers to finish (or, with ``stop``, cancel what waits and end the workers now)."""
        if stop:
            self.stopping.set()
            workers = list((getattr(self._ex, "_processes", None) or {}).values())  # no public kill; shutdown drops it
            self._ex.shutdown(wait=False, cancel_futures=True)
            for proc in workers:
                proc.terminate()
        self._ex.shutdown(wait=True)

    def __enter__(self) -> CellPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close(stop=kind is not None)
