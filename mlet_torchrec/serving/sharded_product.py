"""The distributed product W = W1 @ W2: every rank multiplies only the W1 boxes it holds.

Row- and table-wise boxes hold whole k-dim rows: their product is final and lands locally when the output
box is on the same rank. Column-wise boxes hold k-column slices: ``W1[:, cols_r] @ W2[cols_r, :]`` is a
partial product, and the partials of one row block are summed on the rank that owns that output box
(point-to-point sends of row blocks, :class:`Exchange`). Every product is computed in row blocks by
:func:`mlet_torchrec.modules.product.mlet_product`, so no table is ever gathered whole on one rank.

Example (one process, one box):
    >>> import torch
    >>> w1, w2 = torch.randn(6, 4), torch.randn(4, 2)
    >>> out = collapse_boxes({Box(0, 0, 6, 4, 0): w1}, [Box(0, 0, 6, 4, 0)], [Box(0, 0, 6, 2, 0)], w2, rank=0)
    >>> torch.allclose(out[Box(0, 0, 6, 2, 0)], w1 @ w2)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mlet_torchrec.modules.product import mlet_product
from mlet_torchrec.options import BLOCK_ROWS
from mlet_torchrec.serving.layout import Box

if TYPE_CHECKING:
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor

_SEND_WINDOW = 8  # partial blocks in flight per rank


def sharded_tensor(
    boxes: Sequence[Box], local: dict[Box, torch.Tensor], size: tuple[int, int], dtype: torch.dtype
) -> ShardedTensor:
    from torch.distributed._shard.metadata import ShardMetadata

    # the defining modules: the package re-exports these without an __all__
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties
    from torch.distributed._shard.sharded_tensor.shard import Shard

    shards_md = [ShardMetadata([b.row, b.col], [b.rows, b.cols], f"rank:{b.rank}/cpu") for b in boxes]
    md = ShardedTensorMetadata(shards_md, torch.Size(size), TensorProperties(dtype=dtype, layout=torch.strided))
    rank = dist.get_rank()
    shards = [Shard(local[b], m) for b, m in zip(boxes, shards_md, strict=True) if b.rank == rank]
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, md)


class Exchange:
    """Point-to-point partial blocks with a bounded number of sends in flight."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pending: list[tuple[Any, torch.Tensor]] = []
        self.sent_bytes = 0

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        t = tensor.to(self.device).contiguous()
        self.pending.append((dist.isend(t, dst), t))
        self.sent_bytes += t.numel() * t.element_size()
        while len(self.pending) > _SEND_WINDOW:
            self.pending.pop(0)[0].wait()

    def recv(self, shape: tuple[int, int], dtype: torch.dtype, src: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, src)
        return t.cpu()

    def drain(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


@torch.no_grad()
def collapse_boxes(
    w1_local: dict[Box, torch.Tensor],
    in_boxes: Sequence[Box],
    out_boxes: Sequence[Box],
    w2: torch.Tensor | None,
    rank: int,
    block_rows: int = BLOCK_ROWS,
    accumulate: torch.dtype = torch.float32,
    exchange: Exchange | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> dict[Box, torch.Tensor]:
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
    w2_sub: dict[tuple[Box, Box], torch.Tensor] = {}
    out_local = {ob: torch.empty(ob.rows, ob.cols, dtype=out_dtype) for ob in out_boxes if ob.rank == rank}

    def sub(ib: Box, ob: Box) -> torch.Tensor:
        key = (ib, ob)
        if key not in w2_sub:
            w2_sub[key] = w2[ib.col : ib.col_end, ob.col : ob.col_end].to(dev, accumulate).contiguous()
        return w2_sub[key]

    def partial(ib: Box, ob: Box, r0: int, r1: int) -> torch.Tensor:
        x = w1_local[ib][r0 - ib.row : r1 - ib.row]
        return mlet_product(
            x.to(dev),
            sub(ib, ob),
            block_rows=block_rows,
            accumulate=accumulate,
            out=torch.empty(r1 - r0, ob.cols, dtype=accumulate, device=dev),
        )

    for ob in out_boxes:
        owner = ob.rank == rank
        for b0 in range(ob.row, ob.row_end, block_rows):
            b1 = min(b0 + block_rows, ob.row_end)
            contributors = [ib for ib in in_boxes if ib.row < b1 and ib.row_end > b0]
            if not any(ib.rank == rank for ib in contributors) and not owner:
                continue
            target = out_local[ob][b0 - ob.row : b1 - ob.row] if owner else None
            if (
                owner
                and len(contributors) == 1
                and contributors[0].rank == rank
                and accumulate == out_dtype
                and dev.type == "cpu"
            ):
                ib = contributors[0]  # the common case: whole rows, local: straight into the output
                mlet_product(
                    w1_local[ib][b0 - ib.row : b1 - ib.row],
                    sub(ib, ob),
                    out=target,
                    block_rows=block_rows,
                    accumulate=accumulate,
                )
                continue
            acc = torch.zeros(b1 - b0, ob.cols, dtype=accumulate) if owner else None
            for ib in contributors:  # own partials first would change the sum order: keep box order
                r0, r1 = max(ib.row, b0), min(ib.row_end, b1)
                if ib.rank == rank:
                    part = partial(ib, ob, r0, r1)
                    if acc is not None:  # this rank owns the output box
                        acc[r0 - b0 : r1 - b0] += part.cpu()
                    else:
                        assert exchange is not None, "a remote output box needs a process group"
                        exchange.send(part, ob.rank)
                elif acc is not None:
                    assert exchange is not None, "a remote input box needs a process group"
                    acc[r0 - b0 : r1 - b0] += exchange.recv((r1 - r0, ob.cols), accumulate, ib.rank)
            if target is not None and acc is not None:  # both set exactly when this rank owns the box
                target.copy_(acc)
    if exchange is not None:
        exchange.drain()
    return out_local
