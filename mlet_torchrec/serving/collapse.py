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

The command checks its own work: the collapsed model's predictions must equal the factored
model's (max abs diff <= tolerance) on the check split (sharded models on every rank in a job),
and it reports that figure.

Example:
    >>> report = collapse("runs/demo/mlet", "runs/demo/mlet-collapsed")   # doctest: +SKIP
    >>> report.max_abs_diff <= 1e-5                                       # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from data_pipes.schema import DatasetMeta
from mlet_torchrec.training.checkpoint import load_model_state, read_checkpoint_info, resolve_checkpoint
from mlet_torchrec.config import ExperimentConfig, load_config
from mlet_torchrec.evaluation.evaluate import predict_split
from mlet_torchrec.evaluation.metrics import ctr_metrics, gather_predictions
from mlet_torchrec.models import CTRModel, build_model
from mlet_torchrec.modules.mlet_ebc import MLETEmbeddingBagCollection

log = logging.getLogger("mlet.collapse")

MANIFEST = "manifest.json"
PLAN_FILE = "plan.json"
REPORT_FILE = "collapse_report.json"
FORMAT = "mlet-torchrec collapsed model v2"
STATE_ROOT = "model"  # the DCP state dict is {"model": model.state_dict()}
OUTPUT_SHARDINGS = ("same", "auto", "table_wise", "row_wise", "column_wise", "table_row_wise")
ACCUMULATE = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_BLOCK_ROWS = 16384
_SEND_WINDOW = 8  # partial blocks in flight per rank


class CollapseMismatch(RuntimeError):
    """The collapsed model does not reproduce the factored model's predictions."""


@dataclass
class CollapseReport:
    output: str
    source_checkpoint: str
    tables: Dict[str, Dict[str, Any]]
    serving_table_bytes: int
    check_split: Optional[str]
    rows_checked: int
    max_abs_diff: float
    tolerance: float
    collapsed_metrics: Dict[str, float] = field(default_factory=dict)
    world_size: int = 1
    source_world_size: int = 1
    output_sharding: str = "same"
    block_rows: int = DEFAULT_BLOCK_ROWS
    accumulate: str = "float32"
    collapse_seconds: float = 0.0
    check_seconds: float = 0.0
    sent_bytes: int = 0  # partial products sent between ranks, all ranks together


# --------------------------------------------------------------------------------------------
# single-process helpers kept for callers (tests, evaluate_path, demo)


def _module_path(model: nn.Module, kind: type) -> str:
    paths = [name for name, m in model.named_modules() if isinstance(m, kind)]
    if len(paths) != 1:
        raise ValueError(f"expected one {kind.__name__} in the model, found {len(paths)}")
    return paths[0]


def _extra_tables(factored: nn.Module, plain: nn.Module) -> List[Tuple[Any, str, str]]:
    """(config, the collapsed model's EBC path, training-model key) of each extra table of the MLET module (the
    ``lin_*`` tables ride along in W1 while training; the collapsed model keeps them in another plain EBC)."""
    from torchrec import EmbeddingBagCollection

    mlet_path = _module_path(factored, MLETEmbeddingBagCollection)
    mlet: MLETEmbeddingBagCollection = factored.get_submodule(mlet_path)  # type: ignore[assignment]
    where = {t.name: path for path, m in plain.named_modules() if type(m) is EmbeddingBagCollection
             for t in m.embedding_bag_configs()}
    out = []
    for t in mlet.extra_bag_configs():
        if t.name not in where:
            raise ValueError(f"the collapsed model has no table {t.name} (an extra table of the MLET module)")
        out.append((t, where[t.name], f"{mlet_path}.w1.embedding_bags.{t.name}.weight"))
    return out


def extra_table_keys(factored: nn.Module, plain: nn.Module) -> Dict[str, str]:
    """Collapsed-model key -> training-model key of the MLET module's extra tables."""
    return {f"{path}.embedding_bags.{t.name}.weight": src for t, path, src in _extra_tables(factored, plain)}


def collapse_state_dict(factored: CTRModel, plain: CTRModel) -> Dict[str, torch.Tensor]:
    """The plain model's state dict with every table W1 @ W2 and every other tensor copied."""
    mlet_path = _module_path(factored, MLETEmbeddingBagCollection)
    mlet: MLETEmbeddingBagCollection = factored.get_submodule(mlet_path)  # type: ignore[assignment]
    source = factored.state_dict()
    extra = extra_table_keys(factored, plain)
    out: Dict[str, torch.Tensor] = {}
    table_prefix = f"{mlet_path}.embedding_bags."
    for key in plain.state_dict():
        if key in extra:
            out[key] = source[extra[key]].clone()
        elif key.startswith(table_prefix):
            table = key[len(table_prefix) :].split(".")[0]
            w1 = source[f"{mlet_path}.w1.embedding_bags.{table}.weight"]
            # float64 accumulation keeps the product within float32 rounding of the training-time path
            out[key] = mlet.collapse_table(table, w1.double()).to(w1.dtype)
        else:
            out[key] = source[key]
    return out


def load_factored(checkpoint: Path | str) -> Tuple[CTRModel, ExperimentConfig, DatasetMeta, Path]:
    """A training checkpoint as an unsharded factored model in this process (DCP reshards)."""
    ckpt = resolve_checkpoint(checkpoint)
    config = load_config(ckpt / "config.yaml")
    meta = DatasetMeta.load(config.data.path)
    model = build_model(config.model, config.embedding, meta)
    load_model_state(ckpt, model)
    return model.eval(), config, meta, ckpt


def load_collapsed(directory: Path | str) -> Tuple[CTRModel, ExperimentConfig, DatasetMeta]:
    """A collapse output as a plain d-dim model (stock TorchRec EBC) in this process."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; is it the output of `mlet collapse`?")
    config = load_config(directory / "config.yaml")
    meta = DatasetMeta.load(config.data.path)
    model = build_model(config.model, config.embedding, meta, collapsed=True)
    load_model_state(directory, model)
    return model.eval(), config, meta


# --------------------------------------------------------------------------------------------
# the product kernel


@torch.no_grad()
def blocked_product(
    w1: torch.Tensor,
    w2: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    accumulate: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``out = w1 @ w2`` in row blocks: each block of W1 is read once while it sits in cache.

    A single ``torch.mm`` over a tall-skinny W1 streams it at well below memory bandwidth; blocks
    of ~10^4 rows keep the BLAS kernel in its efficient regime and need no full-size temporaries.
    ``accumulate=float64`` converts each block (through a reused buffer) for a double-precision
    product, rounded once into ``out``'s dtype.
    """
    n = w1.shape[0]
    if out is None:
        out = torch.empty(n, w2.shape[1], dtype=w1.dtype, device=w1.device)
    if n == 0:
        return out
    if accumulate == out.dtype == w1.dtype == w2.dtype:
        for start in range(0, n, block_rows):
            torch.mm(w1[start : start + block_rows], w2, out=out[start : start + block_rows])
        return out
    w2a = w2.to(accumulate)
    rows = min(block_rows, n)
    buf_in = torch.empty(rows, w1.shape[1], dtype=accumulate, device=w1.device)
    buf_out = torch.empty(rows, w2.shape[1], dtype=accumulate, device=w1.device)
    for start in range(0, n, block_rows):
        m = min(block_rows, n - start)
        buf_in[:m].copy_(w1[start : start + m])
        torch.mm(buf_in[:m], w2a, out=buf_out[:m])
        out[start : start + m].copy_(buf_out[:m])
    return out


# --------------------------------------------------------------------------------------------
# layouts: which rank holds which rectangle of a table


@dataclass(frozen=True, order=True)
class Box:
    """Rows [row, row + rows) x columns [col, col + cols) of one table, held by ``rank``."""

    row: int
    col: int
    rows: int
    cols: int
    rank: int

    @property
    def row_end(self) -> int:
        return self.row + self.rows

    @property
    def col_end(self) -> int:
        return self.col + self.cols

    def as_json(self) -> Dict[str, Any]:
        return {"offsets": [self.row, self.col], "sizes": [self.rows, self.cols], "placement": f"rank:{self.rank}"}


_WRITER = re.compile(r"__(\d+)_\d+\.distcp$")


def source_chunks(checkpoint: Path, fqns: Sequence[str]) -> Dict[str, List[Tuple[Box, Optional[int]]]]:
    """For each fqn: the chunks of the DCP checkpoint as boxes (rank -1) and the rank that wrote each."""
    metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata()
    writer: Dict[Tuple[str, Tuple[int, ...]], int] = {}
    for index, info in metadata.storage_data.items():
        match = _WRITER.search(str(getattr(info, "relative_path", "")))
        if match and index.offset is not None:
            writer[(index.fqn, tuple(index.offset))] = int(match.group(1))
    out: Dict[str, List[Tuple[Box, Optional[int]]]] = {}
    for fqn in fqns:
        md = metadata.state_dict_metadata.get(fqn)
        if md is None or not hasattr(md, "chunks"):
            raise KeyError(f"{checkpoint}: the checkpoint has no tensor {fqn}")
        chunks = []
        for c in md.chunks:
            (r, col), (nr, nc) = tuple(c.offsets), tuple(c.sizes)
            chunks.append((Box(r, col, nr, nc, -1), writer.get((fqn, (r, col)))))
        out[fqn] = sorted(chunks)
    return out


def assign_boxes(
    chunks: Dict[str, List[Tuple[Box, Optional[int]]]], world_size: int, keep_writers: bool
) -> Dict[str, List[Box]]:
    """Give every chunk to a rank, identically on every rank.

    With ``keep_writers`` (the source was written at this world size) each chunk goes to the
    rank that wrote it, so every rank reads its own files. Otherwise chunks are cut into row
    pieces of at most 1/world_size of all elements and spread largest-first over the least
    loaded ranks.
    """
    if keep_writers and all(w is not None and 0 <= w < world_size for cs in chunks.values() for _, w in cs):
        return {name: sorted(Box(b.row, b.col, b.rows, b.cols, w) for b, w in cs) for name, cs in chunks.items()}
    total = sum(b.rows * b.cols for cs in chunks.values() for b, _ in cs)
    target = max(1, -(-total // world_size))
    pieces: List[Tuple[int, int, str, Box]] = []
    order = 0
    for name, cs in chunks.items():
        for b, _ in cs:
            n_pieces = max(1, min(b.rows, -(-(b.rows * b.cols) // target)))
            step = -(-b.rows // n_pieces)
            for r in range(b.row, b.row_end, step):
                piece = Box(r, b.col, min(step, b.row_end - r), b.cols, -1)
                pieces.append((-(piece.rows * piece.cols), order, name, piece))
                order += 1
    pieces.sort()
    load = [(0, r) for r in range(world_size)]
    heapq.heapify(load)
    out: Dict[str, List[Box]] = {name: [] for name in chunks}
    for neg, _, name, piece in pieces:
        used, rank = heapq.heappop(load)
        out[name].append(Box(piece.row, piece.col, piece.rows, piece.cols, rank))
        heapq.heappush(load, (used - neg, rank))
    return {name: sorted(boxes) for name, boxes in out.items()}


def mirror_layout(in_boxes: Sequence[Box], num_rows: int, d: int) -> List[Box]:
    """Output boxes that mirror the input boxes: rows stay with their rank; a row range split by
    columns over m ranks becomes a d-column split over the same ranks (in column order)."""
    cuts = sorted({0, num_rows} | {b.row for b in in_boxes} | {b.row_end for b in in_boxes})
    segments: List[Tuple[int, int, Tuple[Tuple[int, int, int], ...]]] = []
    for lo, hi in zip(cuts, cuts[1:]):
        cover = sorted((b for b in in_boxes if b.row < hi and b.row_end > lo), key=lambda b: (b.col, b.rank))
        owners = list(dict.fromkeys(b.rank for b in cover))[: max(1, d)] or [0]
        m = len(owners)
        widths = [d // m + (1 if i < d % m else 0) for i in range(m)]
        starts = [sum(widths[:i]) for i in range(m)]
        cols = tuple((s, w, o) for s, w, o in zip(starts, widths, owners) if w > 0)
        if segments and segments[-1][1] == lo and segments[-1][2] == cols:
            segments[-1] = (segments[-1][0], hi, cols)
        else:
            segments.append((lo, hi, cols))
    return sorted(Box(lo, c, hi - lo, w, o) for lo, hi, cols in segments for c, w, o in cols)


def _check_cover(name: str, boxes: Sequence[Box], rows: int, cols: int) -> None:
    """Every element of the table is in exactly one box."""
    if sum(b.rows * b.cols for b in boxes) != rows * cols or any(
        b.row < 0 or b.col < 0 or b.row_end > rows or b.col_end > cols for b in boxes
    ):
        raise ValueError(f"table {name}: boxes {boxes} do not tile a {rows} x {cols} table")


def _quiet_planner() -> None:
    for name in ("torchrec.distributed.planner", "torchrec.distributed.planner.types",
                 "torchrec.distributed.planner.storage_reservations", "torchrec.distributed.planner.stats"):
        logging.getLogger(name).setLevel(logging.ERROR)


def plan_layout(model: nn.Module, kind: str, world_size: int, device_type: str,
                tables: Dict[str, Tuple[str, str, int, int]]) -> Dict[str, List[Box]]:
    """Output boxes from TorchRec's planner for the collapsed model's EBCs (``kind``: a sharding type or 'auto').

    ``tables``: id -> (EBC module path, table name, rows, width).
    """
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    from mlet_torchrec.training.distributed import MLETEmbeddingBagCollectionSharder

    _quiet_planner()
    constraints = {}
    if kind != "auto":
        for _, name, _, d in tables.values():
            kwargs = {}
            if kind == "column_wise" and d % 4 == 0:  # TorchRec's column shards are multiples of 4 wide
                width = d // world_size if d % world_size == 0 else 4
                kwargs["min_partition"] = max(4, width - width % 4)
            constraints[name] = ParameterConstraints(sharding_types=[kind], **kwargs)
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device=device_type),
                                       constraints=constraints)
    sharders = [MLETEmbeddingBagCollectionSharder()]
    if dist.is_initialized() and dist.get_world_size() == world_size:
        plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    else:
        plan = planner.plan(model, sharders)
    out: Dict[str, List[Box]] = {}
    for tid, (path, name, rows, d) in tables.items():
        p = plan.plan[path][name]  # type: ignore[index]
        if p.sharding_spec is None:  # data_parallel: replicated; one copy in the checkpoint
            out[tid] = [Box(0, 0, rows, d, 0)]
            continue
        out[tid] = sorted(
            Box(s.shard_offsets[0], s.shard_offsets[1], s.shard_sizes[0], s.shard_sizes[1], s.placement.rank())
            for s in p.sharding_spec.shards  # type: ignore[union-attr]
        )
    return out


# --------------------------------------------------------------------------------------------
# the distributed product: every rank multiplies the W1 boxes it holds


def _sharded_tensor(boxes: Sequence[Box], local: Dict[Box, torch.Tensor], size: Tuple[int, int], dtype: torch.dtype):
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
    from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

    shards_md = [ShardMetadata([b.row, b.col], [b.rows, b.cols], f"rank:{b.rank}/cpu") for b in boxes]
    md = ShardedTensorMetadata(shards_md, torch.Size(size), TensorProperties(dtype=dtype, layout=torch.strided))
    rank = dist.get_rank()
    shards = [Shard(local[b], m) for b, m in zip(boxes, shards_md) if b.rank == rank]
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, md)


class _Exchange:
    """Point-to-point partial blocks with a bounded number of sends in flight."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: List[Tuple[Any, torch.Tensor]] = []
        self.sent_bytes = 0

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        t = tensor.to(self.device).contiguous()
        self.pending.append((dist.isend(t, dst), t))
        self.sent_bytes += t.numel() * t.element_size()
        while len(self.pending) > _SEND_WINDOW:
            self.pending.pop(0)[0].wait()

    def recv(self, shape: Tuple[int, int], dtype: torch.dtype, src: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, src)
        return t.cpu()

    def drain(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


@torch.no_grad()
def collapse_boxes(
    w1_local: Dict[Box, torch.Tensor],
    in_boxes: Sequence[Box],
    out_boxes: Sequence[Box],
    w2: Optional[torch.Tensor],
    rank: int,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    accumulate: torch.dtype = torch.float32,
    exchange: Optional[_Exchange] = None,
    out_dtype: torch.dtype = torch.float32,
) -> Dict[Box, torch.Tensor]:
    """This rank's output boxes of ``W = W1 @ W2`` from the W1 boxes every rank holds.

    Every rank walks the same sequence (output box, row block). For each block, every rank that
    holds W1 rows of it computes its partial ``W1[rows, cols_r] @ W2[cols_r, out_cols]``; the
    owner of the output box adds them up (its own first, then the others' in box order) and
    writes the block. ``w2=None`` is a single-layer table (W = W1; the identity as W2).
    """
    if w2 is None:
        k = max(b.col_end for b in in_boxes)
        w2 = torch.eye(k, dtype=torch.float32)
    w2 = w2.detach().cpu()
    dev = exchange.device if exchange is not None else torch.device("cpu")
    w2_sub: Dict[Tuple[Box, Box], torch.Tensor] = {}
    out_local = {ob: torch.empty(ob.rows, ob.cols, dtype=out_dtype) for ob in out_boxes if ob.rank == rank}

    def sub(ib: Box, ob: Box) -> torch.Tensor:
        key = (ib, ob)
        if key not in w2_sub:
            w2_sub[key] = w2[ib.col : ib.col_end, ob.col : ob.col_end].to(dev, accumulate).contiguous()
        return w2_sub[key]

    def partial(ib: Box, ob: Box, r0: int, r1: int) -> torch.Tensor:
        x = w1_local[ib][r0 - ib.row : r1 - ib.row]
        return blocked_product(x.to(dev), sub(ib, ob), block_rows=block_rows, accumulate=accumulate,
                               out=torch.empty(r1 - r0, ob.cols, dtype=accumulate, device=dev))

    for ob in out_boxes:
        owner = ob.rank == rank
        for b0 in range(ob.row, ob.row_end, block_rows):
            b1 = min(b0 + block_rows, ob.row_end)
            contributors = [ib for ib in in_boxes if ib.row < b1 and ib.row_end > b0]
            if not any(ib.rank == rank for ib in contributors) and not owner:
                continue
            target = out_local[ob][b0 - ob.row : b1 - ob.row] if owner else None
            if (owner and len(contributors) == 1 and contributors[0].rank == rank and accumulate == out_dtype
                    and dev.type == "cpu"):
                ib = contributors[0]  # the common case: whole rows, local: straight into the output
                blocked_product(w1_local[ib][b0 - ib.row : b1 - ib.row], sub(ib, ob), out=target,
                                block_rows=block_rows, accumulate=accumulate)
                continue
            acc = torch.zeros(b1 - b0, ob.cols, dtype=accumulate) if owner else None
            for ib in contributors:  # own partials first would change the sum order: keep box order
                r0, r1 = max(ib.row, b0), min(ib.row_end, b1)
                if ib.rank == rank:
                    part = partial(ib, ob, r0, r1)
                    if owner:
                        acc[r0 - b0 : r1 - b0] += part.cpu()
                    else:
                        assert exchange is not None, "a remote output box needs a process group"
                        exchange.send(part, ob.rank)
                elif owner:
                    assert exchange is not None, "a remote input box needs a process group"
                    acc[r0 - b0 : r1 - b0] += exchange.recv((r1 - r0, ob.cols), accumulate, ib.rank)
            if owner:
                target.copy_(acc)
    if exchange is not None:
        exchange.drain()
    return out_local


# --------------------------------------------------------------------------------------------
# manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _pooling_name(pooling: Any) -> str:
    return str(getattr(pooling, "name", pooling)).lower()


def manifest(config: ExperimentConfig, meta: DatasetMeta, source: Path, step: int,
             extra: Optional[Dict[str, Any]] = None, embedding_prefix: Optional[str] = None,
             extra_tables: Optional[Dict[str, Tuple[Any, str]]] = None) -> Dict[str, Any]:
    """What serving needs to rebuild the stock model without this package (see ``export.SERVING_MD``).

    ``tables``: the model's d-dim tables (one stock ``EmbeddingBagCollection``, keys under
    ``state_dict.embedding_bag_collection``); ``extra_tables``: tables of other EBCs the model has
    (the DeepCTR models' first-order ``lin_*`` tables), copied unchanged, each with its full key.
    """
    from data_pipes.schema import table_name

    emb = config.embedding
    ebc = embedding_prefix or f"{STATE_ROOT}.net.sparse_arch.embedding_bag_collection."
    tables = {
        table_name(f.name): {
            "rows": f.cardinality,
            "d": emb.d,
            "features": [f.name],
            "pooling": emb.pooling,
            "dtype": "float32",
            "k": emb.k_for(f.name),
            "sigma": emb.sigma if emb.k_for(f.name) else None,
            "key": f"{ebc}embedding_bags.{table_name(f.name)}.weight",
        }
        for f in meta.sparse
    }
    ks = sorted({t["k"] for t in tables.values() if t["k"] is not None})
    source = Path(source)
    src: Dict[str, Any] = {"path": str(source.resolve()), "step": step}
    if (source / ".metadata").is_file():
        src["dcp_metadata_sha256"] = _sha256(source / ".metadata")
    out: Dict[str, Any] = {
        "format": FORMAT,
        "model": config.model.name,
        "model_config": config.model.model_dump(mode="json"),
        "state_dict": {
            "root": STATE_ROOT,
            "model_prefix": f"{STATE_ROOT}.net.",
            "embedding_bag_collection": ebc,
        },
        "dense_features": meta.dense,
        "sparse_features": meta.sparse_names(),
        "d": emb.d,
        "k": ks[0] if len(ks) == 1 else (ks or None),
        "sigma": emb.sigma if ks else None,
        "tables": tables,
        "source_checkpoint": src,
        "data": config.data.path,
    }
    if config.model.name == "dlrm":  # torchrec.models.dlrm.DLRM(ebc, **architecture)
        out["architecture"] = {
            "dense_in_features": len(meta.dense),
            "dense_arch_layer_sizes": [*config.model.bottom_mlp, emb.d],
            "over_arch_layer_sizes": [*config.model.top_mlp, 1],
        }
    if extra_tables:
        out["extra_tables"] = {
            cfg.name: {"rows": cfg.num_embeddings, "d": cfg.embedding_dim, "features": list(cfg.feature_names),
                       "pooling": _pooling_name(cfg.pooling), "dtype": "float32", "k": None, "key": key}
            for cfg, key in extra_tables.values()
        }
    if extra:
        out.update(extra)
    return out


# --------------------------------------------------------------------------------------------
# the collapse job


@dataclass(frozen=True)
class _Table:
    """One table of the output: W = W1 @ W2 for an MLET table, a copy for other tables."""

    name: str
    src_key: str  # in the training checkpoint (under STATE_ROOT)
    out_key: str  # in the collapsed model (under STATE_ROOT)
    rows: int
    in_width: int  # k (or d for a single-layer table)
    width: int  # d
    w2_key: Optional[str]  # None: copied (single-layer, or a table outside the MLET module)
    ebc_path: str  # the collapsed model's EBC holding it
    k: Optional[int]


@dataclass
class _Job:
    config: ExperimentConfig
    meta: DatasetMeta
    ckpt: Path
    info: Dict[str, Any]
    factored: CTRModel  # tables on the meta device
    plain: CTRModel  # stock EBCs on the meta device
    ebc_path: str  # the collapsed model's main (d-dim) EBC
    tables: Dict[str, _Table]  # by output key
    extra_configs: Dict[str, Any]  # output key -> EmbeddingBagConfig of the tables outside the MLET module


def _prepare(checkpoint: Path | str) -> _Job:
    from torchrec import EmbeddingBagCollection

    ckpt = resolve_checkpoint(checkpoint)
    config = load_config(ckpt / "config.yaml")
    meta = DatasetMeta.load(config.data.path)
    meta_dev = torch.device("meta")
    factored = build_model(config.model, config.embedding, meta, device=meta_dev)
    plain = build_model(config.model, config.embedding, meta, device=meta_dev, collapsed=True)
    mlet_path = _module_path(factored, MLETEmbeddingBagCollection)
    mlet: MLETEmbeddingBagCollection = factored.get_submodule(mlet_path)  # type: ignore[assignment]
    (ebc_path,) = [name for name, m in plain.named_modules() if m is plain.embeddings]
    inner = mlet.inner_dims()
    tables: Dict[str, _Table] = {}
    for t in mlet.embedding_bag_configs():
        k = inner[t.name]
        out_key = f"{ebc_path}.embedding_bags.{t.name}.weight"
        tables[out_key] = _Table(t.name, f"{mlet_path}.w1.embedding_bags.{t.name}.weight", out_key, t.num_embeddings,
                                 k or t.embedding_dim, t.embedding_dim, f"{mlet_path}.w2.{t.name}" if k else None,
                                 ebc_path, k)
    extra: Dict[str, Any] = {}
    for t, path, src_key in _extra_tables(factored, plain):  # the DeepCTR models' lin_* tables
        out_key = f"{path}.embedding_bags.{t.name}.weight"
        tables[out_key] = _Table(t.name, src_key, out_key, t.num_embeddings, t.embedding_dim, t.embedding_dim, None,
                                 path, None)
        extra[out_key] = t
    for path, m in factored.named_modules():  # tables of any other EBC the training model has: copied
        if type(m) is EmbeddingBagCollection and m is not mlet.w1:
            for t in m.embedding_bag_configs():
                key = f"{path}.embedding_bags.{t.name}.weight"
                tables[key] = _Table(t.name, key, key, t.num_embeddings, t.embedding_dim, t.embedding_dim, None,
                                     path, None)
                extra[key] = t
    plain_keys = set(plain.state_dict())
    missing = [key for key in tables if key not in plain_keys]
    if missing:
        raise ValueError(f"the collapsed {config.model.name} model has no tables {missing}")
    return _Job(config, meta, ckpt, read_checkpoint_info(ckpt), factored, plain, ebc_path, tables, extra)


def _dense_state(job: _Job, no_dist: bool) -> Dict[str, torch.Tensor]:
    """Every tensor of the factored model but its tables (MLPs, W2), loaded on every rank (they are small)."""
    skip = {t.src_key for t in job.tables.values()}
    state = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in job.factored.state_dict().items() if k not in skip}
    dcp.load({STATE_ROOT: state}, checkpoint_id=str(job.ckpt), no_dist=no_dist)
    return state


def _shard_for_check(model: nn.Module, constraints: Dict[str, Any], device: torch.device) -> nn.Module:
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    from mlet_torchrec.training.distributed import MLETEmbeddingBagCollectionSharder

    _quiet_planner()
    sharders = [MLETEmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=dist.get_world_size(), compute_device=device.type), constraints=constraints
    )
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(module=model, device=device, plan=plan, sharders=sharders)


def _check(job: _Job, written: Path, split: Optional[str], max_rows: Optional[int], tolerance: float,
           distributed: bool) -> Tuple[int, float, Dict[str, float]]:
    """Predictions of the written collapsed model against the factored model on ``split``."""
    if split is None:
        return 0, 0.0, {}
    config, meta = job.config, job.meta
    if not distributed:
        factored, _, _, _ = load_factored(job.ckpt)
        plain = build_model(config.model, config.embedding, meta, collapsed=True)
        load_model_state(written, plain)
        p_factored, labels = predict_split(factored, config.data.path, split, config.train.eval_batch_size, meta, max_rows)
        p_plain, _ = predict_split(plain.eval(), config.data.path, split, config.train.eval_batch_size, meta, max_rows)
        diff = float((p_factored - p_plain).abs().max()) if labels.numel() else 0.0
        return int(labels.numel()), diff, ctr_metrics(p_plain, labels).as_dict()

    from data_pipes.schema import table_name
    from mlet_torchrec.training.distributed import init_distributed, sharding_constraints

    ctx = init_distributed(config.run.device)
    features = meta.sparse_names()
    constraints = sharding_constraints(config.embedding, features, {f: table_name(f) for f in features},
                                       ctx.world_size)
    torch.manual_seed(config.train.seed)
    factored = _shard_for_check(build_model(config.model, config.embedding, meta, device=torch.device("meta")),
                                constraints, ctx.device)
    load_model_state(job.ckpt, factored)
    plain = _shard_for_check(
        build_model(config.model, config.embedding, meta, device=torch.device("meta"), collapsed=True),
        constraints, ctx.device,
    )
    load_model_state(written, plain)
    p_factored, labels = predict_split(factored, config.data.path, split, config.train.eval_batch_size, meta, max_rows,
                                       ctx.rank, ctx.world_size)
    p_plain, _ = predict_split(plain, config.data.path, split, config.train.eval_batch_size, meta, max_rows,
                               ctx.rank, ctx.world_size)
    local = float((p_factored - p_plain).abs().max()) if labels.numel() else 0.0
    stat = torch.tensor([local], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(stat, op=dist.ReduceOp.MAX)
    probs, all_labels = gather_predictions(p_plain, labels)
    return int(all_labels.numel()), float(stat.item()), ctr_metrics(probs, all_labels).as_dict()


def collapse(
    checkpoint: Path | str,
    output: Path | str,
    check_split: Optional[str] = "test",
    max_check_rows: Optional[int] = None,
    tolerance: float = 1e-5,
    overwrite: bool = False,
    output_sharding: str = "same",
    block_rows: int = DEFAULT_BLOCK_ROWS,
    accumulate: str = "float32",
) -> CollapseReport:
    """Collapse ``checkpoint`` into ``output`` and verify the predictions on ``check_split``.

    Runs in this process, or, inside a job (torchrun, TorchX, :func:`collapse_local`; the
    process group is joined or already initialised), as one rank of a distributed collapse:
    call it on every rank with the same arguments; every rank returns the same report.
    """
    from mlet_torchrec.training.launcher import in_distributed_job

    if output_sharding not in OUTPUT_SHARDINGS:
        raise ValueError(f"output sharding {output_sharding!r} is not one of {OUTPUT_SHARDINGS}")
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate {accumulate!r} is not one of {sorted(ACCUMULATE)}")
    if block_rows <= 0:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty (pass overwrite=True / --overwrite)")
    job = _prepare(checkpoint)
    if check_split is not None and check_split not in job.meta.splits:
        raise ValueError(
            f"check split {check_split!r} not in data set {job.config.data.path} ({sorted(job.meta.splits)})"
        )

    distributed = dist.is_initialized() or in_distributed_job()
    if distributed:
        from mlet_torchrec.training.distributed import init_distributed

        ctx = init_distributed(job.config.run.device)
        rank, world = ctx.rank, ctx.world_size
        device = ctx.device
        distributed = world > 1
    else:
        rank, world, device = 0, 1, torch.device("cpu")
    is_main = rank == 0
    acc = ACCUMULATE[accumulate]

    # where the output is written: a temporary sibling, renamed into place once checked
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = [None]
    if is_main:
        tmp_name[0] = tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name[0], 0o777 & ~umask)  # mkdtemp makes it private; the output is for others to read
    if distributed:
        dist.broadcast_object_list(tmp_name, src=0)
    tmp = Path(tmp_name[0])  # type: ignore[arg-type]
    try:
        start = time.perf_counter()
        source_world = int(job.info.get("world_size", 1))
        tables = job.tables
        if world == 1:  # whole tables: the product of full rows, as the training-time path computes it
            in_layout = {i: [Box(0, 0, t.rows, t.in_width, 0)] for i, t in tables.items()}
        else:
            chunks = source_chunks(job.ckpt, [f"{STATE_ROOT}.{t.src_key}" for t in tables.values()])
            in_layout = assign_boxes({i: chunks[f"{STATE_ROOT}.{t.src_key}"] for i, t in tables.items()}, world,
                                     source_world == world)
        if output_sharding == "same" or world == 1:
            out_layout = {i: mirror_layout(in_layout[i], t.rows, t.width) for i, t in tables.items()}
        else:
            out_layout = plan_layout(job.plain, output_sharding, world, device.type,
                                     {i: (t.ebc_path, t.name, t.rows, t.width) for i, t in tables.items()})
        for i, t in tables.items():
            _check_cover(t.name, in_layout[i], t.rows, t.in_width)
            _check_cover(t.name, out_layout[i], t.rows, t.width)

        dense = _dense_state(job, no_dist=not distributed)
        exchange = _Exchange(device if device.type == "cuda" else torch.device("cpu")) if distributed else None
        out_state: Dict[str, Any] = {}
        for i, t in tables.items():  # one table at a time: only its W1 shards are in memory
            n, d = t.rows, t.width
            mine = [b for b in in_layout[i] if b.rank == rank]
            w1_local = {b: torch.empty(b.rows, b.cols) for b in mine}
            if distributed:
                holder: Any = _sharded_tensor(in_layout[i], w1_local, (n, t.in_width), torch.float32)
                dcp.load({STATE_ROOT: {t.src_key: holder}}, checkpoint_id=str(job.ckpt))
            else:
                full = torch.empty(n, t.in_width)
                dcp.load({STATE_ROOT: {t.src_key: full}}, checkpoint_id=str(job.ckpt), no_dist=True)
                w1_local = {b: full[b.row : b.row_end, b.col : b.col_end] for b in in_layout[i]}
            w2 = dense[t.w2_key] if t.w2_key is not None else None
            out_local = collapse_boxes(w1_local, in_layout[i], out_layout[i], w2, rank, block_rows, acc, exchange)
            del w1_local
            if distributed:
                out_state[t.out_key] = _sharded_tensor(out_layout[i], out_local, (n, d), torch.float32)
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
        dcp.save({STATE_ROOT: out_state}, checkpoint_id=str(tmp), no_dist=not distributed)
        collapse_seconds = time.perf_counter() - start
        sent = exchange.sent_bytes if exchange is not None else 0
        if distributed:
            total = torch.tensor([sent], dtype=torch.int64, device=device)
            dist.all_reduce(total)
            sent = int(total.item())

        extra = {
            "collapse": {
                "world_size": world,
                "source_world_size": source_world,
                "output_sharding": output_sharding,
                "accumulate": accumulate,
                "block_rows": block_rows,
            },
            "output_layout": {tables[i].name: [b.as_json() for b in boxes] for i, boxes in out_layout.items()},
        }
        man = manifest(job.config, job.meta, job.ckpt, int(job.info.get("step", -1)), extra,
                       embedding_prefix=f"{STATE_ROOT}.{job.ebc_path}.",
                       extra_tables={key: (cfg, f"{STATE_ROOT}.{key}") for key, cfg in job.extra_configs.items()})
        man["dcp_metadata_sha256"] = _sha256(tmp / ".metadata") if is_main else None
        if is_main:
            (tmp / MANIFEST).write_text(json.dumps(man, indent=2))
            job.config.save(tmp / "config.yaml")
            (tmp / PLAN_FILE).write_text(json.dumps(man["output_layout"], indent=2))

        check_start = time.perf_counter()
        rows, max_diff, metrics = _check(job, tmp, check_split, max_check_rows, tolerance, distributed)
        check_seconds = time.perf_counter() - check_start
        if max_diff > tolerance:
            raise CollapseMismatch(
                f"collapsed predictions differ from the factored model's by {max_diff:.3g} "
                f"(> {tolerance:g}) on {rows} rows of {check_split}"
            )
        report = CollapseReport(
            output=str(output),
            source_checkpoint=str(job.ckpt),
            tables=man["tables"],
            serving_table_bytes=sum(t["rows"] * t["d"] * 4 for t in man["tables"].values()),
            check_split=check_split,
            rows_checked=rows,
            max_abs_diff=max_diff,
            tolerance=tolerance,
            collapsed_metrics=metrics,
            world_size=world,
            source_world_size=source_world,
            output_sharding=output_sharding,
            block_rows=block_rows,
            accumulate=accumulate,
            collapse_seconds=collapse_seconds,
            check_seconds=check_seconds,
            sent_bytes=sent,
        )
        if distributed:
            dist.barrier()
        if is_main:
            (tmp / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
            if output.exists():
                shutil.rmtree(output) if output.is_dir() else output.unlink()
            os.replace(tmp, output)
            log.info("collapsed %d tables into %s in %.1f s", len(tables), output, collapse_seconds)
        if distributed:
            dist.barrier()
    finally:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    return report


# --------------------------------------------------------------------------------------------
# N local processes


def _collapse_worker(kwargs: Dict[str, Any], verbose: bool) -> Dict[str, Any]:
    from mlet_torchrec.logs import configure_logging

    configure_logging(verbose)
    return asdict(collapse(**kwargs))


def collapse_local(checkpoint: Path | str, output: Path | str, nproc_per_node: int, verbose: bool = False,
                   **kwargs: Any) -> CollapseReport:
    """:func:`collapse` on ``nproc_per_node`` processes of this machine (elastic_launch); rank 0's report."""
    from torch.distributed.launcher.api import elastic_launch

    from mlet_torchrec.training.launcher import local_launch_config

    if nproc_per_node <= 1:
        return collapse(checkpoint, output, **kwargs)
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not kwargs.get("overwrite", False):
        raise FileExistsError(f"{output} exists and is not empty (pass overwrite=True / --overwrite)")
    resolve_checkpoint(checkpoint)  # fail here, not in N workers
    launch = local_launch_config(nproc_per_node, "mlet-collapse")
    args = {"checkpoint": str(checkpoint), "output": str(output), **kwargs}
    results = elastic_launch(launch, entrypoint=_collapse_worker)(args, verbose)
    return CollapseReport(**results[0])
