"""Plan a cluster before renting it: TorchRec's sharding planner on a topology given by the user.

``make_plan`` builds the training model (W1 at k, with the sparse optimizer's state) and its serving
twin (the collapsed d-dim model, no optimizer state) on the meta device, runs the planner on
``world_size`` ranks of ``hbm_gb``/``ddr_gb`` each, and returns a JSON-able plan: per table the
sharding type, kernel and shards, per rank the HBM and DDR used, and the MLET memory factor against the
single-layer model. ``mlet train --plan PLAN.json`` (``run.plan``) shards with that plan instead of
planning again; :func:`load_plan` refuses a plan made for another world size, device or config.

When the tables cannot fit, :class:`PlanDoesNotFit` says by how much, in one line, with the levers.

    >>> from mlet_torchrec.config import load_config
    >>> from data_pipes.schema import DatasetMeta, SparseFeature
    >>> meta = DatasetMeta(sparse=[SparseFeature(name="a", cardinality=1000)], splits={})
    >>> cfg = load_config(None, ["embedding.d=4", "embedding.k=16", "model.bottom_mlp=[8]", "model.top_mlp=[8]"])
    >>> plan = make_plan(cfg, meta, Cluster(world_size=2, device="cpu", ddr_gb=1, batch_size=64))
    >>> plan["training"]["tables"][0]["table"], round(plan["memory"]["training_factor"], 2)
    ('t_a', 4.0)
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from tabulate import tabulate
from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import PlannerError, PlannerErrorType
from torchrec.distributed.types import (
    CacheParams,
    EmbeddingModuleShardingPlan,
    EnumerableShardingSpec,
    ParameterSharding,
    ShardingPlan,
    ShardMetadata,
)
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from data_pipes.schema import DatasetMeta, table_name
from mlet_torchrec.config import ExperimentConfig
from mlet_torchrec.errors import UserError
from mlet_torchrec.logs import human_bytes
from mlet_torchrec.models.registry import build_model
from mlet_torchrec.training.distributed import (
    MLETEmbeddingBagCollectionSharder,
    _sparse_optimizer,
    plan_to_json,
    sharding_constraints,
)
from mlet_torchrec.training.guardrails import PLANNER_RESERVATION, quiet_planner
from mlet_torchrec.training.table_size import table_sizes

PLAN_FORMAT = "mlet-plan/1"
GIB = 2**30


class PlanError(UserError):
    """A plan file that cannot be used for this run (another world size, device or config, or unreadable)."""


class PlanDoesNotFit(UserError):
    """The tables (with their optimizer state) need more memory than the planned cluster has."""


@dataclass(frozen=True)
class Cluster:
    """The topology to plan for: ``world_size`` ranks, ``local_world_size`` per host, memory per rank."""

    world_size: int
    device: Literal["cuda", "cpu"] = "cuda"
    local_world_size: int | None = None
    hbm_gb: float = 80.0
    """GPU memory per rank, GiB (ignored for cpu)."""
    ddr_gb: float = 128.0
    """Host memory per rank, GiB."""
    batch_size: int | None = None
    """Global batch size (None: the config's train.batch_size)."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise UserError(f"--world-size must be at least 1, got {self.world_size}")
        lws = self.local_world_size
        if lws is not None and (lws < 1 or self.world_size % lws):
            raise UserError(f"--local-world-size {lws} must be positive and divide --world-size {self.world_size}")
        if self.hbm_gb <= 0 or self.ddr_gb <= 0:
            raise UserError(f"--hbm-gb and --ddr-gb must be positive, got {self.hbm_gb} and {self.ddr_gb}")


# ------------------------------------------------------------------------------------------- sizes


def memory_summary(config: ExperimentConfig, meta: DatasetMeta) -> dict[str, Any]:
    """Bytes of the tables (:mod:`~mlet_torchrec.training.table_size`): MLET training (W1 and optimizer state, as
    sharded), single-layer training at d, serving (fp32 n x d), and the MLET memory factor."""
    mlet, single = table_sizes(config, meta), table_sizes(config, meta, mlet=False)
    train_bytes, single_bytes = sum(t.sharded for t in mlet), sum(t.sharded for t in single)
    return {
        "training_bytes": train_bytes,
        "training_weights_bytes": sum(t.weights for t in mlet),
        "training_state_bytes": sum(t.state for t in mlet),
        "single_layer_training_bytes": single_bytes,
        "serving_bytes": sum(t.serving for t in mlet),
        "training_factor": train_bytes / max(single_bytes, 1),
    }


# -------------------------------------------------------------------------------- (de)serialising


def _placement(rank: int, device: str, local_world_size: int) -> str:
    return f"rank:{rank}/cpu" if device == "cpu" else f"rank:{rank}/cuda:{rank % local_world_size}"


def plan_from_json(tables: list[dict[str, Any]], device: str, local_world_size: int) -> ShardingPlan:
    """The inverse of :func:`plan_to_json`; placements are rebuilt for this job's devices."""
    modules: dict[str, EmbeddingModuleShardingPlan] = {}
    for t in tables:
        shards = [
            ShardMetadata(
                shard_offsets=list(s["offsets"]),
                shard_sizes=list(s["sizes"]),
                placement=_placement(int(s["placement"].split("/")[0].split(":")[1]), device, local_world_size),
            )
            for s in t["shards"]
        ]
        lf = t.get("cache_load_factor")
        modules.setdefault(t["module"], EmbeddingModuleShardingPlan())[t["table"]] = ParameterSharding(
            sharding_type=t["sharding_type"],
            compute_kernel=t["compute_kernel"],
            ranks=t["ranks"],
            sharding_spec=EnumerableShardingSpec(shards) if shards else None,
            cache_params=CacheParams(load_factor=lf) if lf is not None else None,
        )
    return ShardingPlan(modules)


# --------------------------------------------------------------------------------------- planning


def planned_for(config: ExperimentConfig, meta: DatasetMeta) -> dict[str, Any]:
    """What a plan depends on: the keys a run must share with it (compared by :func:`load_plan`)."""
    e = config.embedding
    return {
        "embedding.d": e.d,
        "embedding.k": e.k,
        "embedding.w1_dtype": e.w1_dtype,
        "embedding.uvm_caching": e.uvm_caching,
        "embedding.uvm_cache_load_factor": e.uvm_cache_load_factor,
        "embedding.sharding": e.sharding,
        "embedding.tables": {n: t.model_dump(mode="json") for n, t in sorted(e.tables.items())},
        "model.name": config.model.name,
        "sparse_optimizer.name": config.sparse_optimizer.name,
        "data.cardinalities": meta.cardinalities(),
    }


def _run_planner(
    model: nn.Module, config: ExperimentConfig, meta: DatasetMeta, cluster: Cluster, batch_size: int
) -> tuple[ShardingPlan, EmbeddingShardingPlanner]:
    features = meta.sparse_names()
    lws = cluster.local_world_size or min(cluster.world_size, 8)
    caps = {"ddr_cap": int(cluster.ddr_gb * GIB)}
    if cluster.device == "cuda":
        caps["hbm_cap"] = int(cluster.hbm_gb * GIB)
    with quiet_planner():
        planner = EmbeddingShardingPlanner(
            topology=Topology(
                world_size=cluster.world_size, local_world_size=lws, compute_device=cluster.device, **caps
            ),
            batch_size=max(1, batch_size // cluster.world_size),
            constraints=sharding_constraints(
                config.embedding, features, {f: table_name(f) for f in features}, cluster.world_size, cluster.device
            ),
            debug=False,
        )
        plan = planner.plan(model, [MLETEmbeddingBagCollectionSharder()])
    return plan, planner


def _shard_bytes(option: Any, shard: Any, fp32_state_fix: bool) -> tuple[int, int]:
    """(HBM, DDR) bytes of one shard as the planner sized it, plus what it leaves out: TorchRec sizes the
    optimizer state at the table's dtype, FBGEMM keeps Adagrad's state in fp32 (2 more bytes per fp16 weight;
    in host memory for UVM-cached tables)."""
    hbm, ddr = (int(shard.storage.hbm), int(shard.storage.ddr)) if shard.storage is not None else (0, 0)
    if fp32_state_fix and option.compute_kernel in ("fused", "fused_uvm_caching"):
        extra = int(shard.size[0]) * int(shard.size[1]) * 2
        hbm, ddr = (hbm + extra, ddr) if option.compute_kernel == "fused" else (hbm, ddr + extra)
    return hbm, ddr


def _planned(
    plan: ShardingPlan, planner: EmbeddingShardingPlanner, world_size: int, fp32_state_fix: bool
) -> dict[str, Any]:
    ranks = [{"rank": r, "hbm_bytes": 0, "ddr_bytes": 0} for r in range(world_size)]
    per_table: dict[str, dict[str, int]] = {}
    for option in planner._best_plan or []:  # the planner keeps its chosen options (storage per shard)
        t = per_table.setdefault(option.name, {"hbm_bytes": 0, "ddr_bytes": 0})
        for shard in option.shards:
            hbm, ddr = _shard_bytes(option, shard, fp32_state_fix)
            t["hbm_bytes"], t["ddr_bytes"] = t["hbm_bytes"] + hbm, t["ddr_bytes"] + ddr
            if shard.rank is not None:
                ranks[shard.rank]["hbm_bytes"] += hbm
                ranks[shard.rank]["ddr_bytes"] += ddr
    tables = plan_to_json(plan)
    for row in tables:
        row.update(per_table.get(row["table"], {}))
    return {"tables": tables, "ranks": ranks}


def make_plan(config: ExperimentConfig, meta: DatasetMeta, cluster: Cluster) -> dict[str, Any]:
    """Plan the training and serving models of ``config`` on ``cluster``; raises :class:`PlanDoesNotFit`."""
    if config.embedding.uvm_caching and cluster.device != "cuda":
        raise UserError(
            "embedding.uvm_caching=true needs --device cuda: UVM caching keeps tables in host memory "
            "behind a GPU cache, and a CPU run has no GPU"
        )
    batch = cluster.batch_size or config.train.batch_size
    usable = (cluster.hbm_gb if cluster.device == "cuda" else cluster.ddr_gb) * GIB * (1 - PLANNER_RESERVATION)
    if memory_summary(config, meta)["training_bytes"] > usable * cluster.world_size:
        raise does_not_fit(config, meta, cluster)  # before the planner, whose time grows with the sizes
    torch.manual_seed(0)
    net = build_model(config.model, config.embedding, meta, device=torch.device("meta"))
    opt_cls, opt_kwargs = _sparse_optimizer(config.sparse_optimizer)
    with warnings.catch_warnings():  # TorchRec deprecates its own helper; training uses it too
        warnings.simplefilter("ignore", DeprecationWarning)
        for m in net.modules():
            if type(m).__name__ == "EmbeddingBagCollection":
                apply_optimizer_in_backward(opt_cls, m.parameters(), opt_kwargs)
    try:
        plan, planner = _run_planner(net, config, meta, cluster, batch)
    except PlannerError as e:
        if e.error_type == PlannerErrorType.INSUFFICIENT_STORAGE:
            raise does_not_fit(config, meta, cluster) from None
        raise UserError(f"TorchRec's planner found no plan: {' '.join(str(e).split())[:400]}") from None
    fix = config.embedding.w1_dtype == "fp16" and config.sparse_optimizer.name == "adagrad"
    training = _planned(plan, planner, cluster.world_size, fix)
    if fix:  # the planner undercounted Adagrad's fp32 state: check the corrected figures ourselves
        caps = (
            (cluster.hbm_gb * GIB, cluster.ddr_gb * GIB) if cluster.device == "cuda" else (None, cluster.ddr_gb * GIB)
        )
        for r in training["ranks"]:
            over = [
                (tier, need, cap)
                for tier, need, cap in (("GPU", r["hbm_bytes"], caps[0]), ("host", r["ddr_bytes"], caps[1]))
                if cap is not None and need > cap * (1 - PLANNER_RESERVATION)
            ]
            if over:
                tier, need, _ = over[0]
                raise does_not_fit(
                    config,
                    meta,
                    cluster,
                    note=(
                        f"rank {r['rank']} needs {need / GIB:.1f} GiB of {tier} memory once Adagrad's fp32 state of "
                        f"fp16 tables is counted (TorchRec's planner counts it at fp16)"
                    ),
                )
    serving_net = build_model(config.model, config.embedding, meta, device=torch.device("meta"), collapsed=True)
    try:
        serving_plan, serving_planner = _run_planner(serving_net, config, meta, cluster, batch)
        serving: dict[str, Any] = _planned(serving_plan, serving_planner, cluster.world_size, False)
    except PlannerError as e:
        serving = {"error": " ".join(str(e).split())[:400]}
    lws = cluster.local_world_size or min(cluster.world_size, 8)
    return {
        "format": PLAN_FORMAT,
        "cluster": {**asdict(cluster), "local_world_size": lws, "batch_size": batch},
        "planned_for": planned_for(config, meta),
        "memory": memory_summary(config, meta),
        "training": training,
        "serving": serving,
    }


def does_not_fit(config: ExperimentConfig, meta: DatasetMeta, cluster: Cluster, note: str = "") -> PlanDoesNotFit:
    """One line: what the tables need, what the cluster has, the shortfall and the levers that would help."""
    mem = memory_summary(config, meta)
    need = mem["training_bytes"]
    tier, per_rank = (
        ("GPU memory", cluster.hbm_gb * GIB) if cluster.device == "cuda" else ("host memory", cluster.ddr_gb * GIB)
    )
    usable = per_rank * (1 - PLANNER_RESERVATION)
    short = need - usable * cluster.world_size
    levers = []
    if config.embedding.w1_dtype == "fp32":
        levers.append(f"embedding.w1_dtype=fp16 (saves {mem['training_weights_bytes'] / 2 / GIB:.1f} GiB)")
    if config.sparse_optimizer.name == "adagrad":
        rowwise = sum(replace(t, optimizer="rowwise_adagrad").state for t in table_sizes(config, meta))
        saved = mem["training_state_bytes"] - rowwise
        levers.append(f"sparse_optimizer.name=rowwise_adagrad (saves {saved / GIB:.1f} GiB)")
    if cluster.device == "cuda" and not config.embedding.uvm_caching:
        levers.append("embedding.uvm_caching=true (tables in host memory behind a GPU cache)")
    levers.append(f"--world-size {math.ceil(need / usable)} or more")
    state = (
        f" + {config.sparse_optimizer.name} state {mem['training_state_bytes'] / GIB:.1f} GiB"
        if mem["training_state_bytes"]
        else ""
    )
    short_text = note or (f"{short / GIB:.1f} GiB short" if short > 0 else "too tight once the shards are placed")
    return PlanDoesNotFit(
        f"the tables do not fit on {cluster.world_size} x {per_rank / GIB:g} GiB of {tier}: training them needs "
        f"{need / GIB:.1f} GiB (W1 {config.embedding.w1_dtype} {mem['training_weights_bytes'] / GIB:.1f} GiB{state}) "
        f"but about {usable * cluster.world_size / GIB:.1f} GiB is usable after TorchRec's "
        f"{PLANNER_RESERVATION:.0%} reservation ({short_text}); try {', '.join(levers)}"
    )


# ------------------------------------------------------------------------------------ plan files


def _is_plan(path: Path) -> bool:
    """Whether ``path`` holds a plan `mlet plan` wrote (the only kind of file :func:`write_plan` replaces)."""
    try:
        return bool(json.loads(path.read_text()).get("format") == PLAN_FORMAT)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return False


def write_plan(plan: dict[str, Any], output: Path | str, overwrite: bool = False) -> Path:
    """Write PLAN.json completely or not at all (:func:`~mlet_torchrec.io.atomic_file`); replaces only a plan
    `mlet plan` wrote, and only with ``overwrite``."""
    from mlet_torchrec.io import atomic_file

    with atomic_file(output, _is_plan, overwrite=overwrite) as built:
        built.write_text(json.dumps(plan, indent=1) + "\n")
    return Path(output)


def read_plan(path: Path | str) -> dict[str, Any]:
    try:
        plan = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"plan file {path} does not exist; write one with `mlet plan`") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PlanError(f"plan file {path} is not a readable JSON plan: {' '.join(str(e).split())}") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise PlanError(f"plan file {path} is not a plan written by `mlet plan` (format {PLAN_FORMAT})")
    return plan


def load_plan(
    path: Path | str, config: ExperimentConfig, meta: DatasetMeta, world_size: int, device: str, local_world_size: int
) -> ShardingPlan:
    """The training ShardingPlan of ``path`` for this job; :class:`PlanError` if it was made for another one."""
    plan = read_plan(path)
    cluster = plan.get("cluster", {})
    if cluster.get("world_size") != world_size:
        raise PlanError(
            f"plan {path} was made for {cluster.get('world_size')} ranks but this run has {world_size}; "
            f"run `mlet plan --world-size {world_size}` again"
        )
    if cluster.get("device") != device:
        raise PlanError(
            f"plan {path} was made for --device {cluster.get('device')} but this run is on {device}; "
            f"run `mlet plan --device {device}` again"
        )
    made, now = plan.get("planned_for", {}), planned_for(config, meta)
    for key in now:
        if made.get(key) != now[key]:
            shown = "the data set's cardinalities" if key == "data.cardinalities" else f"{key}={made.get(key)}"
            raise PlanError(
                f"plan {path} was made for {shown}, not this run's config "
                f"({key}={json.dumps(now[key])[:80]}); run `mlet plan` again for it"
            )
    try:
        return plan_from_json(plan["training"]["tables"], device, local_world_size)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise PlanError(f"plan file {path} is damaged ({type(e).__name__}: {e}); run `mlet plan` again") from None


# ----------------------------------------------------------------------------------------- report


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a short text report: per table its sharding, kernel, rank ids and memory; per rank its
    memory; the MLET memory factor. Sizes in adaptive units, columns aligned by ``tabulate``."""
    c, m = plan["cluster"], plan["memory"]
    tiers = (("HBM", "hbm_bytes"), ("DDR", "ddr_bytes")) if c["device"] == "cuda" else (("DDR", "ddr_bytes"),)
    lines = [
        f"plan for {c['world_size']} ranks ({c['local_world_size']} per host) on {c['device']}, "
        + (f"{c['hbm_gb']:g} GiB HBM + " if c["device"] == "cuda" else "")
        + f"{c['ddr_gb']:g} GiB DDR per rank, global batch {c['batch_size']}"
    ]
    for part in ("training", "serving"):
        p = plan[part]
        if "error" in p:
            lines.append(f"{part}: no plan ({p['error'][:200]})")
            continue
        rows = [
            [t["table"], t["sharding_type"], t["compute_kernel"], rank_ids(t["ranks"] or [])]
            + [human_bytes(t.get(key, 0)) for _, key in tiers]
            for t in p["tables"]
        ]
        lines += [
            f"{part} model:",
            _indent(tabulate(rows, ["table", "sharding", "kernel", "ranks", *(n for n, _ in tiers)])),
        ]
        lws = c["local_world_size"]
        per_rank = [[r["rank"], r["rank"] // lws] + [human_bytes(r[key]) for _, key in tiers] for r in p["ranks"]]
        lines.append(_indent(tabulate(per_rank, ["rank", "host", *(n for n, _ in tiers)])))
    lines.append(
        f"tables while training: {human_bytes(m['training_bytes'])} (W1 {human_bytes(m['training_weights_bytes'])}"
        f" + optimizer state {human_bytes(m['training_state_bytes'])}); single-layer model at the same d: "
        f"{human_bytes(m['single_layer_training_bytes'])}; MLET memory factor {m['training_factor']:.2f}x "
        f"while training, 1x at serving (collapsed tables {human_bytes(m['serving_bytes'])})"
    )
    return "\n".join(lines)


def rank_ids(ranks: list[int]) -> str:
    """Rank ids as runs: ``[0, 1, 2, 5]`` -> ``"0-2,5"``.

    >>> rank_ids([0, 1, 2, 5, 7, 8]), rank_ids([3]), rank_ids([])
    ('0-2,5,7-8', '3', '-')
    """
    runs: list[list[int]] = []
    for r in sorted(set(ranks)):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "-"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
