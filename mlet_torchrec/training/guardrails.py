"""Guardrails that turn the ways a run can go wrong into one clear error on every rank.

- Memory: the TorchRec planner gets this machine's real capacity (host memory per local rank from
  /proc/meminfo and the cgroup limit; free GPU memory on CUDA) instead of its defaults, so a config
  whose tables do not fit is refused before any table is allocated, by :class:`TablesDoNotFit` with
  the numbers. Planning runs on rank 0 and its result *or its error* is broadcast, so the other
  ranks never wait forever for a plan.
- Divergence: a non-finite loss on any rank stops every rank at the same step
  (:class:`TrainingDiverged`), and no checkpoint is written from non-finite weights, so the last
  good checkpoint survives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypedDict

import torch
from torch import nn
from torchrec.distributed.planner.types import PlannerError, PlannerErrorType

from data_pipes.schema import DatasetMeta
from mlet_torchrec import ranks
from mlet_torchrec.config import ConfigError, ExperimentConfig
from mlet_torchrec.errors import UserError
from mlet_torchrec.training.table_size import table_sizes

# TorchRec's EmbeddingShardingPlanner keeps this share of every device for dense parts and buffers
PLANNER_RESERVATION = 0.15


class TrainingDiverged(UserError, RuntimeError, ValueError):
    """The loss (or the weights) became NaN or infinite; the run stopped without checkpointing them (one
    line, exit 2: the config's learning rates are the user's to change)."""


class TablesDoNotFit(ConfigError):
    """The embedding tables (with their optimizer state) need more memory than the job has."""


def _gib(n: float) -> str:
    if abs(n) >= 2**40:
        return f"{n / 2**40:.2f} TiB"
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.2f} MiB"


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def host_memory_available() -> dict[str, int]:
    """Bytes of host memory this process group may use: MemAvailable (or total pages), capped by the
    cgroup v2/v1 memory limit minus its usage. Returns the figure and where it came from."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    out = {"available": avail, "meminfo": avail}
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit = _read_int(limit_path)
        if limit is not None and limit < 2**60:
            usage = _read_int(usage_path) or 0
            out["cgroup_free"] = max(0, limit - usage)
            out["available"] = min(avail, out["cgroup_free"])
            break
    return out


def memory_capacity(device: torch.device) -> dict[str, int]:
    """``Topology`` keyword arguments for this machine: ``ddr_cap`` (host memory per local rank) and,
    on CUDA, ``hbm_cap`` (free memory of this rank's GPU)."""
    local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    caps = {"ddr_cap": max(1, host_memory_available()["available"] // local_world)}
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        caps["hbm_cap"] = int(free)
    return caps


@contextlib.contextmanager
def quiet_planner() -> Iterator[None]:
    """While TorchRec's planner runs: its logs (a warning per unplaced table and per dry-run estimate, the whole
    plan at INFO) and warnings are not for users; its errors are raised, not logged."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def collective_plan(planner: Any, module: nn.Module, sharders: list[Any]) -> Any:
    """``planner.plan`` on rank 0, its plan or its ``PlannerError`` broadcast to every rank.

    TorchRec's own ``collective_plan`` leaves ranks > 0 waiting in the broadcast when rank 0 raises.
    """
    if ranks.world()[1] == 1:
        return planner.plan(module, sharders)
    found: tuple[Any, ...] = ()
    if ranks.is_main():
        try:
            found = ("plan", planner.plan(module, sharders))
        except PlannerError as e:
            found = ("error", str(e), e.error_type.value)
        except Exception as e:  # any other planning failure: every rank raises it
            found = ("other", f"{type(e).__name__}: {e}", None)
    kind, *rest = ranks.from_main(found)
    if kind == "plan":
        return rest[0]
    if kind == "error":
        raise PlannerError(rest[0], PlannerErrorType(rest[1]))
    raise RuntimeError(f"sharding planner failed on rank 0: {rest[0]}")


class TableMemory(TypedDict):
    """Bytes of :func:`table_memory`: in all, and of the largest table (by feature name)."""

    weights: int
    optimizer_state: int
    total: int
    largest: int
    largest_feature: str


def table_memory(meta: DatasetMeta, config: ExperimentConfig) -> TableMemory:
    """Bytes the sharded tables need while training: W1 at its dtype and the fused optimizer's fp32 state
    (:mod:`mlet_torchrec.training.table_size`, as the planner counts them)."""
    sizes = table_sizes(config, meta)
    largest = max(sizes, key=lambda t: t.sharded, default=None)
    return {
        "weights": sum(t.weights for t in sizes),
        "optimizer_state": sum(t.state for t in sizes),
        "total": sum(t.sharded for t in sizes),
        "largest": largest.sharded if largest else 0,
        "largest_feature": largest.feature if largest else "",
    }


def batch_bytes(meta: DatasetMeta, config: ExperimentConfig, rows: int) -> int:
    """A generous estimate of one batch of ``rows`` in memory: the inputs (fp32 label and dense values, int64
    ids with their offsets), the looked-up W1 rows and the d-dim embeddings, doubled for the gradients and
    intermediates of the forward and backward passes."""
    per_row = 4 * (1 + len(meta.dense)) + sum(16 + 4 * (t.width + t.d) for t in table_sizes(config, meta))
    return 2 * rows * per_row


def checked_capacity(
    meta: DatasetMeta, config: ExperimentConfig, world_size: int, device: torch.device
) -> dict[str, int]:
    """:func:`memory_capacity`, once the sizes are known to fit it; before the planner runs (its time grows with
    the sizes), a config that cannot fit is refused in one line (:class:`TablesDoNotFit`): the sharded tables
    (W1 and optimizer state) over all ranks, or, on each rank, the replicated W2 (with its gradient and
    optimizer state) plus one training or evaluation batch."""
    caps = memory_capacity(device)
    per_rank = caps.get("hbm_cap", caps["ddr_cap"])  # the device's: W2 and the batches live there
    usable = per_rank * (1 - PLANNER_RESERVATION)
    need = table_memory(meta, config)
    if need["total"] > table_home(config, caps)[1] * (1 - PLANNER_RESERVATION) * world_size:
        raise tables_do_not_fit(None, meta, config, world_size, caps, device)
    uvm_cached = config.embedding.uvm_caching and "hbm_cap" in caps
    cache = config.embedding.uvm_cache_load_factor * need["weights"] if uvm_cached else 0
    if cache > usable * world_size:
        raise TablesDoNotFit(
            f"the GPU cache of the UVM-cached tables needs {_gib(cache)} (embedding.uvm_cache_load_factor="
            f"{config.embedding.uvm_cache_load_factor} of W1's {_gib(need['weights'])}) but the {world_size} "
            f"rank(s) have {_gib(usable)} usable of GPU memory each; lower embedding.uvm_cache_load_factor"
        )
    replicated = 3 * sum(t.w2 for t in table_sizes(config, meta))
    for key in ("batch_size", "eval_batch_size"):
        size = getattr(config.train, key)
        batch = batch_bytes(meta, config, -(-size // world_size))
        if replicated + batch > usable:
            raise TablesDoNotFit(
                f"train.{key}={size} needs about {_gib(batch)} per rank for one batch ({world_size} rank(s))"
                + (
                    f" beside {_gib(replicated)} of replicated W2 with its gradient and state"
                    if replicated >= 2**20
                    else ""
                )
                + f", but a rank has {_gib(usable)} usable of {_gib(per_rank)}; lower train.{key}"
                + (" or embedding.k" if replicated >= 2**20 else "")
            )
    return caps


def table_home(config: ExperimentConfig, caps: dict[str, int]) -> tuple[str, int]:
    """Where the sharded tables (W1 and optimizer state) live, and each rank's room there: GPU memory on CUDA,
    host memory on CPU, and host memory with ``embedding.uvm_caching`` (only a cache of their rows is on the GPU).

    Example:
        >>> from mlet_torchrec.config import load_config
        >>> table_home(load_config(None, ["embedding.uvm_caching=true"]), {"ddr_cap": 64, "hbm_cap": 8})
        ('host memory (UVM caching)', 64)
    """
    if "hbm_cap" not in caps:
        return "host memory", caps["ddr_cap"]
    return (
        ("host memory (UVM caching)", caps["ddr_cap"])
        if config.embedding.uvm_caching
        else ("GPU memory", caps["hbm_cap"])
    )


def tables_do_not_fit(
    err: PlannerError | None,
    meta: DatasetMeta,
    config: ExperimentConfig,
    world_size: int,
    caps: dict[str, int],
    device: torch.device,
) -> TablesDoNotFit:
    """The planner's storage error as one message with the numbers (needed vs available)."""
    need = table_memory(meta, config)
    kind, per_rank = table_home(config, caps)
    usable = per_rank * (1 - PLANNER_RESERVATION)
    detail = str(err).strip().splitlines()[-1].strip() if err is not None and str(err).strip() else ""
    opt, w1 = config.sparse_optimizer.name, config.embedding.w1_dtype
    parts = (
        f"W1 {_gib(need['weights'])} + {opt} state {_gib(need['optimizer_state'])}; W1 in {w1}, the state in fp32"
        if need["optimizer_state"]
        else f"W1 in {w1}; {opt} keeps no state"
    )
    return TablesDoNotFit(
        f"the embedding tables do not fit in memory: training them needs {_gib(need['total'])} ({parts}; "
        f"largest table t_{need['largest_feature']} {_gib(need['largest'])}) but the {world_size} rank(s) have "
        f"{_gib(per_rank)} of {kind} each ({_gib(usable)} after the planner's {PLANNER_RESERVATION:.0%} reservation; "
        f"{_gib(usable * world_size)} in all). Use more ranks or machines, a smaller embedding.k / embedding.d, "
        f"or fewer rows per table." + (f" [TorchRec planner: {detail}]" if detail else "")
    )


def _local_tensors(value: Any) -> list[torch.Tensor]:
    if hasattr(value, "local_shards"):
        return [s.tensor for s in value.local_shards()]
    if hasattr(value, "to_local"):
        return [value.to_local()]
    if isinstance(value, torch.Tensor):
        return [value]
    return []


@torch.no_grad()
def nonfinite_weights(model: nn.Module, chunk_rows: int = 1 << 16) -> list[str]:
    """Names of this rank's weights (local shards) holding NaN or inf, checked in row chunks."""
    bad = []
    for name, value in model.state_dict().items():
        for t in _local_tensors(value):
            if not t.is_floating_point() or t.numel() == 0:
                continue
            flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
            if any(
                not bool(torch.isfinite(flat[i : i + chunk_rows]).all()) for i in range(0, flat.shape[0], chunk_rows)
            ):
                bad.append(name)
                break
    return bad
