"""Layouts of a collapse: which rank holds which rectangle (:class:`Box`) of each table.

The W1 boxes come from the source checkpoint's DCP metadata (:func:`source_chunks`): at the training
world size every rank keeps the chunks it wrote, at another world size they are cut into row pieces and
balanced (:func:`assign_boxes`). The output boxes mirror the input (:func:`mirror_layout`, ``same``) or
come from TorchRec's planner for the d-dim EBC (:func:`plan_layout`).

Example:
    >>> mirror_layout([Box(0, 0, 10, 8, 0), Box(10, 0, 6, 8, 1)], num_rows=16, d=4)
    [Box(row=0, col=0, rows=10, cols=4, rank=0), Box(row=10, col=0, rows=6, cols=4, rank=1)]
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mlet_torchrec import ranks
from mlet_torchrec.training.safe_dcp import read_metadata


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

    def as_json(self) -> dict[str, Any]:
        return {"offsets": [self.row, self.col], "sizes": [self.rows, self.cols], "placement": f"rank:{self.rank}"}


_WRITER = re.compile(r"__(\d+)_\d+\.distcp$")


def source_chunks(checkpoint: Path, fqns: Sequence[str]) -> dict[str, list[tuple[Box, int | None]]]:
    """For each fqn: the chunks of the DCP checkpoint as boxes (rank -1) and the rank that wrote each."""
    metadata = read_metadata(checkpoint)
    writer: dict[tuple[str, tuple[int, ...]], int] = {}
    for index, info in metadata.storage_data.items():
        match = _WRITER.search(str(getattr(info, "relative_path", "")))
        if match and index.offset is not None:
            writer[(index.fqn, tuple(index.offset))] = int(match.group(1))
    out: dict[str, list[tuple[Box, int | None]]] = {}
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
    chunks: dict[str, list[tuple[Box, int | None]]], world_size: int, keep_writers: bool
) -> dict[str, list[Box]]:
    """Give every chunk to a rank, identically on every rank.

    With ``keep_writers`` (the source was written at this world size) each chunk goes to the
    rank that wrote it, so every rank reads its own files. Otherwise chunks are cut into row
    pieces of at most 1/world_size of all elements and spread largest-first over the least
    loaded ranks.
    """
    if keep_writers and all(w is not None and 0 <= w < world_size for cs in chunks.values() for _, w in cs):
        return {  # (every w is an int here: checked just above)
            name: sorted(Box(b.row, b.col, b.rows, b.cols, w) for b, w in cs if w is not None)
            for name, cs in chunks.items()
        }
    total = sum(b.rows * b.cols for cs in chunks.values() for b, _ in cs)
    target = max(1, -(-total // world_size))
    pieces: list[tuple[int, int, str, Box]] = []
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
    out: dict[str, list[Box]] = {name: [] for name in chunks}
    for neg, _, name, piece in pieces:
        used, rank = heapq.heappop(load)
        out[name].append(Box(piece.row, piece.col, piece.rows, piece.cols, rank))
        heapq.heappush(load, (used - neg, rank))
    return {name: sorted(boxes) for name, boxes in out.items()}


def mirror_layout(in_boxes: Sequence[Box], num_rows: int, d: int) -> list[Box]:
    """Output boxes that mirror the input boxes: rows stay with their rank; a row range split by
    columns over m ranks becomes a d-column split over the same ranks (in column order)."""
    cuts = sorted({0, num_rows} | {b.row for b in in_boxes} | {b.row_end for b in in_boxes})
    segments: list[tuple[int, int, tuple[tuple[int, int, int], ...]]] = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        cover = sorted((b for b in in_boxes if b.row < hi and b.row_end > lo), key=lambda b: (b.col, b.rank))
        owners = list(dict.fromkeys(b.rank for b in cover))[: max(1, d)] or [0]
        m = len(owners)
        widths = [d // m + (1 if i < d % m else 0) for i in range(m)]
        starts = [sum(widths[:i]) for i in range(m)]
        cols = tuple((s, w, o) for s, w, o in zip(starts, widths, owners, strict=True) if w > 0)
        if segments and segments[-1][1] == lo and segments[-1][2] == cols:
            segments[-1] = (segments[-1][0], hi, cols)
        else:
            segments.append((lo, hi, cols))
    return sorted(Box(lo, c, hi - lo, w, o) for lo, hi, cols in segments for c, w, o in cols)


def check_cover(name: str, boxes: Sequence[Box], rows: int, cols: int) -> None:
    """Every element of the table is in exactly one box."""
    if sum(b.rows * b.cols for b in boxes) != rows * cols or any(
        b.row < 0 or b.col < 0 or b.row_end > rows or b.col_end > cols for b in boxes
    ):
        raise ValueError(f"table {name}: boxes {boxes} do not tile a {rows} x {cols} table")


def plan_layout(
    model: nn.Module, kind: str, world_size: int, device_type: str, tables: dict[str, tuple[str, str, int, int]]
) -> dict[str, list[Box]]:
    """Output boxes from TorchRec's planner for the collapsed model's EBCs (``kind``: a sharding type or 'auto').

    ``tables``: id -> (EBC module path, table name, rows, width).
    """
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    from mlet_torchrec.training.distributed import MLETEmbeddingBagCollectionSharder
    from mlet_torchrec.training.guardrails import collective_plan, quiet_planner

    constraints = {}
    if kind != "auto":
        for _, name, _, d in tables.values():
            kwargs = {}
            if kind == "column_wise" and d % 4 == 0:  # TorchRec's column shards are multiples of 4 wide
                width = d // world_size if d % world_size == 0 else 4
                kwargs["min_partition"] = max(4, width - width % 4)
            constraints[name] = ParameterConstraints(sharding_types=[kind], **kwargs)
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device_type), constraints=constraints
    )
    sharders = [MLETEmbeddingBagCollectionSharder()]
    with quiet_planner():
        if ranks.world()[1] == world_size:
            plan = collective_plan(planner, model, sharders)
        else:
            plan = planner.plan(model, sharders)
    out: dict[str, list[Box]] = {}
    for tid, (path, name, rows, d) in tables.items():
        p = plan.plan[path][name]
        if p.sharding_spec is None:  # data_parallel: replicated; one copy in the checkpoint
            out[tid] = [Box(0, 0, rows, d, 0)]
            continue
        out[tid] = sorted(
            Box(s.shard_offsets[0], s.shard_offsets[1], s.shard_sizes[0], s.shard_sizes[1], s.placement.rank())
            for s in p.sharding_spec.shards
        )
    return out
