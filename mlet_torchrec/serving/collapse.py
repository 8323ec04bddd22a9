"""Collapse a trained MLET checkpoint into a plain d-dim model: W = W1 @ W2 per table.

The output is what serving loads: a torch.distributed.checkpoint (DCP) of the model built on a
stock TorchRec ``EmbeddingBagCollection`` of d-dim tables (the keys of
``build_model(..., collapsed=True)``, under the top-level key ``model``), a ``manifest.json``
that describes the tables well enough to rebuild the stock EBC without this package, the run's
``config.yaml``, the output's sharding (``plan.json``) and ``collapse_report.json``.

It runs in one process (``mlet collapse``) or on every rank of a job (``mlet collapse
--nproc-per-node N``, torchrun, TorchX). In a job every rank multiplies only W1 shards it holds:

* the W1 boxes come from the source checkpoint's DCP metadata (the chunks each training rank
  wrote). At the training world size every rank takes the chunks it wrote itself; at another
  world size the chunks are split into row pieces and balanced over the ranks;
* row- and table-wise boxes hold whole k-dim rows: their product is final and lands locally
  when the output box is on the same rank (``--output-sharding same``, the default);
* column-wise boxes hold k-column slices: ``W1[:, cols_r] @ W2[cols_r, :]`` is a partial product,
  and the partials of one row block are summed on the rank that owns that output box
  (point-to-point sends of row blocks, a reduce to the owner);
* every product is computed in row blocks (``block_rows``), so no table is ever gathered whole on
  one rank and the working memory beyond a rank's own shards is a few blocks.

The output boxes are the user's choice: ``same`` mirrors the input layout (row/table-wise stays
put, column-wise becomes a d-column split over the same ranks), ``auto``/``table_wise``/
``row_wise``/``column_wise`` ask TorchRec's planner for a plan of the d-dim EBC at the job's
world size. DCP reshards on load, so a stock model loads the output at any world size.

Where the pieces live: the artifact loader (``artifact``), the layouts (``layout``), the distributed
product (``sharded_product``), the manifest (``manifest``) and the prediction check (``check``); this
module runs the job and writes the output atomically (``mlet_torchrec.io``).

The command checks its own work: the collapsed model's predictions must equal the factored
model's (max abs diff <= tolerance) on the check split (sharded models on every rank in a job),
and it reports that figure.

Example:
    >>> report = collapse("runs/demo/mlet", "runs/demo/mlet-collapsed")   # doctest: +SKIP
    >>> report.max_abs_diff <= 1e-5                                       # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from data_pipes.transform import carry_transform
from mlet_torchrec import ranks
from mlet_torchrec.errors import UserError
from mlet_torchrec.files import sha256_file
from mlet_torchrec.io import atomic_output, atomic_write_text, check_output_path
from mlet_torchrec.models.registry import CTRModel, build_model
from mlet_torchrec.options import ACCUMULATE as ACCUMULATE_NAMES
from mlet_torchrec.options import BLOCK_ROWS, COLLAPSE_TOLERANCE, OUTPUT_SHARDINGS
from mlet_torchrec.serving.artifact import (
    MANIFEST,
    STATE_ROOT,
    Artifact,
    extra_tables,
    load_artifact,
    mlet_module,
)
from mlet_torchrec.serving.check import CollapseMismatch, check_predictions
from mlet_torchrec.serving.layout import (
    Box,
    assign_boxes,
    check_cover,
    mirror_layout,
    plan_layout,
    source_chunks,
)
from mlet_torchrec.serving.manifest import PLAN_FILE, manifest
from mlet_torchrec.serving.sharded_product import Exchange, collapse_boxes, sharded_tensor
from mlet_torchrec.training.checkpoint import load_dcp
from mlet_torchrec.training.safe_dcp import DCP_METADATA, METADATA_SHA256
from mlet_torchrec.training.table_size import fp32_table_bytes

log = logging.getLogger("mlet.collapse")

REPORT_FILE = "collapse_report.json"
COMMAND = "mlet collapse"
ACCUMULATE = {name: getattr(torch, name) for name in ACCUMULATE_NAMES}


@dataclass
class CollapseReport:
    output: str
    source_checkpoint: str
    tables: dict[str, dict[str, Any]]
    serving_table_bytes: int
    check_split: str | None
    rows_checked: int
    max_abs_diff: float
    tolerance: float
    collapsed_metrics: dict[str, float] = field(default_factory=dict)
    world_size: int = 1
    source_world_size: int = 1
    output_sharding: str = "same"
    block_rows: int = BLOCK_ROWS
    accumulate: str = "float32"
    collapse_seconds: float = 0.0
    check_seconds: float = 0.0
    sent_bytes: int = 0  # partial products sent between ranks, all ranks together
    copied_tables: int = 0  # tables outside the MLET module (DeepCTR models' first-order lin_*): copied as they are


def extra_table_keys(factored: CTRModel, plain: CTRModel) -> dict[str, str]:
    """Collapsed-model key -> training-model key of the MLET module's extra tables."""
    return {f"{path}.embedding_bags.{t.name}.weight": src for t, path, src in extra_tables(factored, plain)}


def collapse_state_dict(factored: CTRModel, plain: CTRModel) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every table W1 @ W2 and every other tensor copied."""
    mlet_path, mlet = mlet_module(factored)
    source = factored.state_dict()
    extra = extra_table_keys(factored, plain)
    out: dict[str, torch.Tensor] = {}
    table_prefix = f"{mlet_path}.embedding_bags."
    target = plain.state_dict()
    for key in target:
        # the collapsed tables take the plain model's dtype (fp32), whatever W1's (fp16 W1 included)
        if key in extra:
            out[key] = source[extra[key]].to(target[key].dtype, copy=True)
        elif key.startswith(table_prefix):
            table = key[len(table_prefix) :].split(".")[0]
            w1 = source[f"{mlet_path}.w1.embedding_bags.{table}.weight"]
            # float64 accumulation keeps the product within float32 rounding of the training-time path
            out[key] = mlet.collapse_table(table, w1.double()).to(target[key].dtype)
        else:
            out[key] = source[key]
    return out


@dataclass(frozen=True)
class _Table:
    """One table of the output: W = W1 @ W2 for an MLET table, a copy for other tables."""

    name: str
    src_key: str  # in the training checkpoint (under STATE_ROOT)
    out_key: str  # in the collapsed model (under STATE_ROOT)
    rows: int
    in_width: int  # k (or d for a single-layer table)
    width: int  # d
    w2_key: str | None  # None: copied (single-layer, or a table outside the MLET module)
    ebc_path: str  # the collapsed model's EBC holding it
    k: int | None


@dataclass
class _Job:
    source: Artifact  # the training checkpoint, resolved once (its model: tables on the meta device)
    plain: CTRModel  # the collapsed model's structure: stock EBCs on the meta device
    ebc_path: str  # the collapsed model's main (d-dim) EBC
    tables: dict[str, _Table]  # by output key
    extra_configs: dict[str, Any]  # output key -> EmbeddingBagConfig of the tables outside the MLET module


def _prepare(source: Artifact) -> _Job:
    from torchrec import EmbeddingBagCollection

    config, meta, factored = source.config, source.meta, source.model
    plain = build_model(config.model, config.embedding, meta, device=torch.device("meta"), collapsed=True)
    mlet_path, mlet = mlet_module(factored)
    (ebc_path,) = [name for name, m in plain.named_modules() if m is plain.embeddings]
    inner = mlet.inner_dims()
    tables: dict[str, _Table] = {}
    for t in mlet.embedding_bag_configs():
        k = inner[t.name]
        out_key = f"{ebc_path}.embedding_bags.{t.name}.weight"
        tables[out_key] = _Table(
            t.name,
            f"{mlet_path}.w1.embedding_bags.{t.name}.weight",
            out_key,
            t.num_embeddings,
            k or t.embedding_dim,
            t.embedding_dim,
            f"{mlet_path}.w2.{t.name}" if k else None,
            ebc_path,
            k,
        )
    extra: dict[str, Any] = {}
    for t, path, src_key in extra_tables(factored, plain):  # the DeepCTR models' lin_* tables
        out_key = f"{path}.embedding_bags.{t.name}.weight"
        tables[out_key] = _Table(
            t.name, src_key, out_key, t.num_embeddings, t.embedding_dim, t.embedding_dim, None, path, None
        )
        extra[out_key] = t
    for path, m in factored.named_modules():  # tables of any other EBC the training model has: copied
        if type(m) is EmbeddingBagCollection and m is not mlet.w1:
            for t in m.embedding_bag_configs():
                key = f"{path}.embedding_bags.{t.name}.weight"
                tables[key] = _Table(
                    t.name, key, key, t.num_embeddings, t.embedding_dim, t.embedding_dim, None, path, None
                )
                extra[key] = t
    plain_keys = set(plain.state_dict())
    missing = [key for key in tables if key not in plain_keys]
    if missing:
        raise ValueError(f"the collapsed {config.model.name} model has no tables {missing}")
    return _Job(source, plain, ebc_path, tables, extra)


def _dense_state(job: _Job, no_dist: bool) -> dict[str, torch.Tensor]:
    """Every tensor of the factored model but its tables (MLPs, W2), loaded on every rank (they are small)."""
    skip = {t.src_key for t in job.tables.values()}
    state = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in job.source.model.state_dict().items() if k not in skip}
    load_dcp(job.source.path, {STATE_ROOT: state}, no_dist=no_dist)  # damaged/other model: one line
    return state


def _product(
    job: _Job,
    rank: int,
    world: int,
    device: torch.device,
    output_sharding: str,
    block_rows: int,
    acc: torch.dtype,
    distributed: bool,
) -> tuple[dict[str, Any], dict[str, list[Box]], int]:
    """(this rank's output state dict, the output layout, bytes this rank sent): every table's W1 @ W2."""
    ckpt, tables = str(job.source.path), job.tables
    if world == 1:  # whole tables: the product of full rows, as the training-time path computes it
        in_layout = {i: [Box(0, 0, t.rows, t.in_width, 0)] for i, t in tables.items()}
    else:
        chunks = source_chunks(job.source.path, [f"{STATE_ROOT}.{t.src_key}" for t in tables.values()])
        in_layout = assign_boxes(
            {i: chunks[f"{STATE_ROOT}.{t.src_key}"] for i, t in tables.items()}, world, job.source.world_size == world
        )
    if output_sharding == "same" or world == 1:
        out_layout = {i: mirror_layout(in_layout[i], t.rows, t.width) for i, t in tables.items()}
    else:
        out_layout = plan_layout(
            job.plain,
            output_sharding,
            world,
            device.type,
            {i: (t.ebc_path, t.name, t.rows, t.width) for i, t in tables.items()},
        )
    for i, t in tables.items():
        check_cover(t.name, in_layout[i], t.rows, t.in_width)
        check_cover(t.name, out_layout[i], t.rows, t.width)

    dense = _dense_state(job, no_dist=not distributed)
    exchange = Exchange(device if device.type == "cuda" else torch.device("cpu")) if distributed else None
    out_state: dict[str, Any] = {}
    for i, t in tables.items():  # one table at a time: only its W1 shards are in memory
        n, d = t.rows, t.width
        mine = [b for b in in_layout[i] if b.rank == rank]
        w1_local = {b: torch.empty(b.rows, b.cols) for b in mine}
        if distributed:
            holder: Any = sharded_tensor(in_layout[i], w1_local, (n, t.in_width), torch.float32)
            load_dcp(ckpt, {STATE_ROOT: {t.src_key: holder}})
        else:
            full = torch.empty(n, t.in_width)
            load_dcp(ckpt, {STATE_ROOT: {t.src_key: full}}, no_dist=True)
            w1_local = {b: full[b.row : b.row_end, b.col : b.col_end] for b in in_layout[i]}
        w2 = dense[t.w2_key] if t.w2_key is not None else None
        out_local = collapse_boxes(w1_local, in_layout[i], out_layout[i], w2, rank, block_rows, acc, exchange)
        del w1_local
        if distributed:
            out_state[t.out_key] = sharded_tensor(out_layout[i], out_local, (n, d), torch.float32)
        elif len(out_local) == 1 and next(iter(out_local)) == Box(0, 0, n, d, 0):
            out_state[t.out_key] = next(iter(out_local.values()))
        else:
            full_out = torch.empty(n, d)
            for b, v in out_local.items():
                full_out[b.row : b.row_end, b.col : b.col_end] = v
            out_state[t.out_key] = full_out
    for key in job.plain.state_dict():
        if key not in out_state:
            out_state[key] = dense[key]
    return out_state, out_layout, exchange.sent_bytes if exchange is not None else 0


def _validate(output_sharding: str, accumulate: str, block_rows: int) -> None:
    if output_sharding not in OUTPUT_SHARDINGS:
        raise UserError(f"output sharding {output_sharding!r} is not one of {OUTPUT_SHARDINGS}")
    if accumulate not in ACCUMULATE:
        raise UserError(f"accumulate {accumulate!r} is not one of {sorted(ACCUMULATE)}")
    if block_rows <= 0:
        raise UserError(f"block_rows must be positive, got {block_rows}")


def _inputs(checkpoint: Path | str, source: Artifact) -> list[Path | str]:
    """What an output must never equal or contain: the path given, the checkpoint, the data set."""
    return [checkpoint, source.path, source.config.data.path]


def collapse(
    checkpoint: Path | str,
    output: Path | str,
    check_split: str | None = "test",
    max_check_rows: int | None = None,
    tolerance: float = COLLAPSE_TOLERANCE,
    overwrite: bool = False,
    output_sharding: str = "same",
    block_rows: int = BLOCK_ROWS,
    accumulate: str = "float32",
) -> CollapseReport:
    """Collapse ``checkpoint`` into ``output`` and verify the predictions on ``check_split``.

    Runs in this process, or, inside a job (torchrun, TorchX, ``mlet collapse --nproc-per-node``; the
    process group is joined or already initialised), as one rank of a distributed collapse:
    call it on every rank with the same arguments; every rank returns the same report.
    The output appears atomically (``mlet_torchrec.io``): rank 0 names one hidden temporary
    directory, every rank writes its shards into it, rank 0 moves it into place once checked.
    """
    from mlet_torchrec.ranks import in_distributed_job

    _validate(output_sharding, accumulate, block_rows)
    source = load_artifact(checkpoint)
    if source.kind != "checkpoint":
        raise UserError(f"{checkpoint}: already a collapse output; give a training checkpoint or run directory")
    inputs = _inputs(checkpoint, source)
    check_output_path(output, inputs, overwrite)  # every rank refuses alike, before any collective
    if check_split is not None and check_split not in source.meta.splits:
        raise UserError(
            f"check split {check_split!r} not in data set {source.config.data.path} ({sorted(source.meta.splits)})"
        )
    job = _prepare(source)

    args = _Args(
        output, inputs, overwrite, check_split, max_check_rows, tolerance, output_sharding, block_rows, accumulate
    )
    if not (dist.is_initialized() or in_distributed_job()):
        return _run(job, args, 0, 1, torch.device("cpu"))
    from mlet_torchrec.training.distributed import process_group

    # a group this call creates is shut down when it ends (barrier, destroy); a caller's own group is kept
    with process_group(source.config.run.device) as ctx:
        return _run(job, args, ctx.rank, ctx.world_size, ctx.device)


@dataclass(frozen=True)
class _Args:
    output: Path | str
    inputs: Sequence[Path | str]
    overwrite: bool
    check_split: str | None
    max_check_rows: int | None
    tolerance: float
    output_sharding: str
    block_rows: int
    accumulate: str


def _run(job: _Job, a: _Args, rank: int, world: int, device: torch.device) -> CollapseReport:
    """The collapse on this rank: product, save, manifest, check, then rank 0 commits the output."""
    with atomic_output(a.output, COMMAND, a.inputs, a.overwrite, ranks=ranks) as tmp:
        report = _write_and_check(job, a, tmp, rank, world, device)
        if rank == 0:
            atomic_write_text(tmp / REPORT_FILE, json.dumps(asdict(report), indent=2))
    log.debug(
        "%d MLET tables multiplied out and %d copied into %s in %.1f s",
        len(report.tables),
        report.copied_tables,
        a.output,
        report.collapse_seconds,
    )
    return report


def _write_and_check(job: _Job, a: _Args, tmp: Path, rank: int, world: int, device: torch.device) -> CollapseReport:
    """This rank's part of the output in ``tmp`` (its shards; rank 0 the manifest, config and plan), checked
    against the factored model; the report (the same on every rank)."""
    source, distributed = job.source, world > 1
    start = time.perf_counter()
    out_state, out_layout, sent = _product(
        job, rank, world, device, a.output_sharding, a.block_rows, ACCUMULATE[a.accumulate], distributed
    )
    dcp_save({STATE_ROOT: out_state}, checkpoint_id=str(tmp), no_dist=not distributed)
    collapse_seconds = time.perf_counter() - start
    if distributed:
        total = torch.tensor([sent], dtype=torch.int64, device=device)
        dist.all_reduce(total)
        sent = int(total.item())
    man = _write_manifest(job, a, tmp, world, out_layout, rank == 0)

    check_start = time.perf_counter()
    written = Artifact(tmp, "collapsed", source.config, source.meta, job.plain, man)
    rows, max_diff, metrics = check_predictions(source, written, a.check_split, a.max_check_rows, distributed)
    if max_diff > a.tolerance:
        raise CollapseMismatch(
            f"collapsed predictions differ from the factored model's by {max_diff:.3g} "
            f"(> {a.tolerance:g}) on {rows} rows of {a.check_split}"
        )
    return CollapseReport(
        output=str(a.output),
        source_checkpoint=str(source.path),
        tables=man["tables"],
        serving_table_bytes=sum(fp32_table_bytes(t["rows"], t["d"]) for t in man["tables"].values()),
        check_split=a.check_split,
        rows_checked=rows,
        max_abs_diff=max_diff,
        tolerance=a.tolerance,
        collapsed_metrics=metrics,
        world_size=world,
        source_world_size=source.world_size,
        output_sharding=a.output_sharding,
        block_rows=a.block_rows,
        accumulate=a.accumulate,
        collapse_seconds=collapse_seconds,
        check_seconds=time.perf_counter() - check_start,
        sent_bytes=sent,
        copied_tables=len(job.extra_configs),
    )


def _write_manifest(
    job: _Job, a: _Args, tmp: Path, world: int, out_layout: dict[str, list[Box]], is_main: bool
) -> dict[str, Any]:
    """The output's manifest (every rank builds it); rank 0 writes it with the run's config and the plan."""
    source = job.source
    extra = {
        "collapse": {
            "world_size": world,
            "source_world_size": source.world_size,
            "output_sharding": a.output_sharding,
            "accumulate": a.accumulate,
            "block_rows": a.block_rows,
        },
        "output_layout": {job.tables[i].name: [b.as_json() for b in boxes] for i, boxes in out_layout.items()},
    }
    man = manifest(
        source.config,
        source.meta,
        source.path,
        source.step,
        extra,
        embedding_prefix=f"{STATE_ROOT}.{job.ebc_path}.",
        extra_tables={key: (cfg, f"{STATE_ROOT}.{key}") for key, cfg in job.extra_configs.items()},
    )
    man[METADATA_SHA256] = sha256_file(tmp / DCP_METADATA) if is_main else None
    if is_main:
        man["transform_identity"] = carry_transform(source.config.data.path, tmp)
        atomic_write_text(tmp / MANIFEST, json.dumps(man, indent=2))
        source.config.save(tmp / "config.yaml")
        atomic_write_text(tmp / PLAN_FILE, json.dumps(man["output_layout"], indent=2))
    return man
