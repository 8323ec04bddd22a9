"""Process group, sharding plan, DistributedModelParallel and the two optimizers.

The same code runs on CPU with gloo and on CUDA with nccl. W1 tables are sharded by the TorchRec
planner (per-table sharding types from the config) and trained by FBGEMM's fused optimizer in the
backward pass; the MLPs and W2 are replicated (DDP) and trained by a torch.optim optimizer.

Gradient convention: every rank's loss is the mean over its own (equal-sized) batch. DDP
averages the dense gradients over ranks, and TorchRec's sharded backward divides the table
gradients by the world size (``comm_ops`` gradient division, on by default), so tables and dense
parameters both receive the gradient of the global-batch mean: a 2-rank run reproduces a
1-process run with the same global batch, whatever the sharding (tests/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.constants import MIN_CW_DIM
from torchrec.distributed.types import CacheParams, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from mlet_torchrec.config import DenseOptimizerConfig, EmbeddingConfig, SparseOptimizerConfig
from mlet_torchrec.errors import UserError
from mlet_torchrec.training.guardrails import collective_plan

log = logging.getLogger("mlet.distributed")


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _restarted_attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """The process-group store of a worker that torchrun restarted, isolated from earlier attempts.

    torchrun's agent keeps one TCPStore for all attempts (TORCHELASTIC_USE_AGENT_STORE): the
    restarted workers would read the dead workers' gloo/nccl addresses left in it and fail to
    connect. On one node every worker sees the same TORCHELASTIC_RESTART_COUNT, so a prefix per
    attempt isolates them; multi-node jobs use TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 instead (the
    TorchX ``train`` component sets it with ``max_restarts``).
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if (
        os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        or attempt == 0
        or os.environ.get("WORLD_SIZE") != os.environ.get("LOCAL_WORLD_SIZE")
    ):
        return None
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"mlet/attempt_{attempt}", client)


RENDEZVOUS_TIMEOUT_S = 300.0
"""How long ranks started by hand (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` set, no torchrun) wait for each
other; ``MLET_RENDEZVOUS_TIMEOUT_S`` overrides it. Under torchrun/TorchX the launcher's rendezvous has its own."""


def _own_rendezvous() -> dist.Store | None:
    """The store of ranks started without torchrun, made here so that waiting for the others ends, after
    ``RENDEZVOUS_TIMEOUT_S``, in one line naming the address, port and ranks (None under torchrun)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return None
    addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        wait = float(os.environ.get("MLET_RENDEZVOUS_TIMEOUT_S", RENDEZVOUS_TIMEOUT_S))
        return dist.TCPStore(addr, int(port), world, is_master=rank == 0, timeout=datetime.timedelta(seconds=wait))
    except (KeyError, ValueError) as e:
        raise UserError(
            f"a distributed environment without torchrun is incomplete or malformed ({e}): {_env()}"
        ) from None
    except (RuntimeError, OSError) as e:  # DistStoreError (a RuntimeError) on timeout; OSError: address in use
        raise UserError(
            f"no rendezvous at {addr}:{port} within {wait:.0f} s as rank {rank} of {world} "
            f"({type(e).__name__}); the other ranks never came: is {_env()} left over from another job? "
            "unset it, or start every rank"
        ) from None


DIST_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env() -> str:
    return " ".join(f"{k}={os.environ[k]}" for k in DIST_ENV if k in os.environ)


def check_launch_env(nproc_per_node: int) -> None:
    """``--nproc-per-node N`` (N > 1) starts a job of its own: refused, in one line, in a shell that holds a
    distributed environment already (torchrun's variables left over), which would otherwise be joined."""
    if nproc_per_node > 1 and "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        raise UserError(
            f"--nproc-per-node {nproc_per_node} starts a job of its own, but this shell has a distributed "
            f"environment already ({_env()}); unset those variables, or run without --nproc-per-node inside a job"
        )


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun/TorchX set up, or make a 1-process group when run directly.

    Prefer :func:`process_group`, which also shuts the group down. A 1-process group lives in an
    in-memory store (no port, no environment variables set), so a later call in the same process,
    or a job launched from it, starts afresh.
    """
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA device is visible (use run.device=auto or cpu)")
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        timeout = datetime.timedelta(minutes=30)
        if "WORLD_SIZE" not in os.environ:
            dist.init_process_group(backend=backend, timeout=timeout, store=dist.HashStore(), rank=0, world_size=1)
        else:
            store = _restarted_attempt_store(timeout) or _own_rendezvous()
            if store is None:
                dist.init_process_group(backend=backend, timeout=timeout)
            else:
                rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
                dist.init_process_group(backend=backend, timeout=timeout, store=store, rank=rank, world_size=world)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        # ranks of one machine share its cores: oversubscribed intra-op threads slow every rank down
        # (an explicit OMP_NUM_THREADS, e.g. torchrun's, wins)
        if "OMP_NUM_THREADS" not in os.environ:
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend())


SHUTDOWN_ON_ERROR_S = 10.0
"""How long a failing rank waits for its process group to shut down before it exits anyway."""


def shutdown_process_group(clean: bool) -> None:
    """End this process's part in the job: barrier (``clean`` only), destroy the group, collect garbage.

    Without it, gloo's worker threads and their pending work outlive the interpreter's finalisation
    and a finished job can die at exit with SIGABRT ("terminate called without an active
    exception"). On the error path there is no barrier (the peers are not coming) and the destroy
    runs in a helper thread for at most ``SHUTDOWN_ON_ERROR_S`` seconds: work queued for a dead peer
    must not keep this rank from exiting and telling the launcher.
    """
    if not dist.is_initialized():
        return
    if clean:
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
    else:
        done = threading.Thread(target=_destroy_quietly, name="mlet-destroy-pg", daemon=True)
        done.start()
        done.join(SHUTDOWN_ON_ERROR_S)
        if done.is_alive():
            log.warning(
                "the process group did not shut down within %.0f s (a peer is gone); exiting anyway",
                SHUTDOWN_ON_ERROR_S,
            )
    # modules (DDP reducers, TorchRec's sharded modules) and futures sit in reference cycles that hold
    # tensors and group handles: free them while the interpreter is whole, not during its teardown
    gc.collect()


def _destroy_quietly() -> None:
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[DistContext]:
    """The job's process group for the duration of a ``with`` block, shut down on the way out.

    Every multi-process entry point (train, collapse, evaluate, sweep cells) runs inside one. The
    group is shut down only if this block created it: a caller that set up its own keeps it.

        >>> with process_group("cpu") as ctx:      # doctest: +SKIP
        ...     result = work(ctx)                 # collectives allowed here
        >>> torch.distributed.is_initialized()     # doctest: +SKIP
        False
    """
    owned = not dist.is_initialized()
    ctx = init_distributed(device)
    try:
        yield ctx
    except BaseException:
        if owned:
            shutdown_process_group(clean=False)
        raise
    if owned:
        shutdown_process_group(clean=True)


class MLETEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """The stock EBC sharder, also offering row-wise sharding on CPU.

    TorchRec 1.8 lists row-wise only for CUDA, but its CPU kernels (bucketize + TBE) run it; the
    2-rank gloo tests check that row-wise training matches a 1-process run.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        for extra in ("row_wise", "table_row_wise"):
            if extra not in types:
                types.append(extra)
        return types


def sharding_constraints(
    emb: EmbeddingConfig,
    features: list[str],
    table_of: dict[str, str],
    world_size: int,
    compute_device: str = "cpu",
) -> dict[str, ParameterConstraints]:
    """Planner constraints from the config: a fixed sharding type per table unless 'auto'; on CUDA, the
    kernels: every table in GPU memory, or with ``embedding.uvm_caching`` also host memory behind a GPU cache
    (TorchRec would otherwise move tables to UVM on its own). ``uvm_caching`` on CPU raises ``UserError``.

    A DeepCTR-style model's first-order table of a feature (``lin_<feature>``, 4 wide) follows the feature's
    sharding, except that column-wise becomes table-wise (4 columns cannot be split into FBGEMM's multiples
    of 4). Constraints naming tables a model does not have are ignored by the planner.
    """
    from mlet_torchrec.models.blocks import LINEAR_PREFIX

    if emb.uvm_caching and compute_device != "cuda":
        raise UserError(
            "embedding.uvm_caching=true needs CUDA: UVM caching keeps tables in host memory behind a "
            "GPU cache; set embedding.uvm_caching=false on CPU"
        )
    kernels: dict[str, object] = {}
    if compute_device == "cuda":
        kernels["compute_kernels"] = ["dense", "fused"] + (["fused_uvm_caching"] if emb.uvm_caching else [])
        if emb.uvm_caching:
            kernels["cache_params"] = CacheParams(load_factor=emb.uvm_cache_load_factor)
    if emb.w1_dtype == "fp16":
        # TorchRec's data-parallel (dense kernel) fp16 tables receive no update: keep them on fused kernels
        asked = [f for f in features if emb.sharding_for(f) == "data_parallel"]
        if asked:
            raise UserError(
                f"embedding.w1_dtype=fp16 does not train data_parallel tables ({', '.join(asked)}): "
                "choose another sharding for them or embedding.w1_dtype=fp32"
            )
        kernels["sharding_types"] = ["table_wise", "row_wise", "column_wise", "table_row_wise"]
    constraints: dict[str, ParameterConstraints] = {}
    for feature in features:
        kind = emb.sharding_for(feature)
        width = emb.k_for(feature) or emb.d
        few_columns = (
            {"min_partition": -(-width // MAX_COLUMN_SHARDS)} if width > MIN_CW_DIM * MAX_COLUMN_SHARDS else {}
        )
        if kind == "auto":
            if kernels or few_columns:
                constraints[table_of[feature]] = ParameterConstraints(**kernels, **few_columns)
                constraints[LINEAR_PREFIX + feature] = ParameterConstraints(**kernels)
            continue
        base = {k: v for k, v in kernels.items() if k != "sharding_types"}
        kwargs = {**base, **few_columns}
        if kind == "column_wise" and world_size > 1 and width % world_size == 0:
            # split the columns over all ranks rather than letting the planner keep one shard
            kwargs["min_partition"] = max(width // world_size, int(few_columns.get("min_partition", 0)))
        constraints[table_of[feature]] = ParameterConstraints(sharding_types=[kind], **kwargs)
        linear_kind = "table_wise" if kind == "column_wise" else kind
        constraints[LINEAR_PREFIX + feature] = ParameterConstraints(sharding_types=[linear_kind], **base)
    return constraints


MAX_COLUMN_SHARDS = 64
"""The planner tries column-wise shards of ``MIN_CW_DIM`` columns: a table wider than 64 of them gets wider
shards, so that planning time stays bounded (seconds) whatever ``embedding.k``."""


def _sparse_optimizer(cfg: SparseOptimizerConfig) -> tuple[type, dict[str, float]]:
    if cfg.name == "sgd":
        return torch.optim.SGD, {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.name == "adagrad":
        return torch.optim.Adagrad, {"lr": cfg.lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    return RowWiseAdagrad, {"lr": cfg.lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}


def _dense_optimizer(cfg: DenseOptimizerConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    # CPU: torch's fused kernels update every parameter in one call instead of a few small ops per tensor
    # (at batch 256 the per-op overhead is most of the step); elsewhere torch picks its own default
    fused: bool | None = True if params and all(p.device.type == "cpu" for p in params) else None
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused)


@dataclass
class ShardedModel:
    model: DistributedModelParallel
    plan: ShardingPlan
    optimizer: CombinedOptimizer  # fused (W1) + dense (MLPs, W2)


def shard_model(
    model: nn.Module,
    emb: EmbeddingConfig,
    features: list[str],
    table_of: dict[str, str],
    sparse_opt: SparseOptimizerConfig,
    dense_opt: DenseOptimizerConfig,
    ctx: DistContext,
    capacity: dict[str, int] | None = None,
    plan: ShardingPlan | None = None,
) -> ShardedModel:
    """Plan, shard and wrap ``model`` (its W1 built on the meta device); attach both optimizers.

    ``capacity``: ``Topology`` memory caps (``ddr_cap``/``hbm_cap`` bytes per rank, see
    ``guardrails.memory_capacity``); TorchRec's defaults when None. Raises ``PlannerError`` on every rank.
    ``plan``: shard with this plan (``mlet plan``, ``training/planning.py``) instead of planning.
    """
    embedding_modules = [m for m in model.modules() if type(m).__name__ == "EmbeddingBagCollection"]
    opt_cls, opt_kwargs = _sparse_optimizer(sparse_opt)
    for ebc in embedding_modules:
        apply_optimizer_in_backward(opt_cls, ebc.parameters(), opt_kwargs)

    sharders = [MLETEmbeddingBagCollectionSharder()]
    constraints = sharding_constraints(emb, features, table_of, ctx.world_size, ctx.device.type)
    if plan is None:
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=ctx.world_size, compute_device=ctx.device.type, **(capacity or {})),
            constraints=constraints,
        )
        plan = collective_plan(planner, model, sharders)
    dmp = DistributedModelParallel(module=model, device=ctx.device, plan=plan, sharders=sharders)

    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense = KeyedOptimizerWrapper(dense_params, lambda ps: _dense_optimizer(dense_opt, list(ps)))
    optimizer = CombinedOptimizer([("fused", dmp.fused_optimizer), ("dense", dense)])
    return ShardedModel(dmp, plan, optimizer)


def plan_to_json(plan: ShardingPlan) -> list[dict[str, Any]]:
    """A ShardingPlan as a list of tables (module path, table, sharding type, kernel, ranks, shards, cache): the
    one serialiser of plans (``mlet plan`` files, run directories); ``planning.plan_from_json`` reads it back."""
    rows = []
    for module_path, module_plan in plan.plan.items():
        for table, p in module_plan.items():
            shards = [
                {"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes), "placement": str(s.placement)}
                for s in (p.sharding_spec.shards if p.sharding_spec is not None else [])
            ]
            rows.append(
                {
                    "module": module_path,
                    "table": table,
                    "sharding_type": p.sharding_type,
                    "compute_kernel": p.compute_kernel,
                    "ranks": p.ranks,
                    "shards": shards,
                    "cache_load_factor": p.cache_params.load_factor if p.cache_params else None,
                }
            )
    return rows


def plan_summary(plan: ShardingPlan) -> dict[str, dict[str, object]]:
    """The run directory's ``plan.json``: :func:`plan_to_json` keyed by ``module.table``."""
    keys = ("sharding_type", "compute_kernel", "ranks", "shards")
    return {f"{t['module']}.{t['table']}": {k: t[k] for k in keys} for t in plan_to_json(plan)}
