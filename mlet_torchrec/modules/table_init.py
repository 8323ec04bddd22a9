"""Initialise embedding tables identically whatever their sharding and the world size.

Each table is drawn in fixed blocks of rows, block b from its own generator seeded by
(seed, table, b). A rank fills only the blocks that overlap its shards, so a 2-rank row-wise run,
a 4-rank column-wise run and a 1-process run start from the same tables, and no rank ever
materialises a whole table it does not own.

Rows are drawn from U(-1/sqrt(n), 1/sqrt(n)) as TorchRec's EmbeddingBagCollection and the DLRM
reference do, or from N(0, std^2) as DeepCTR-Torch does (W1 of MLET is initialised like a normal
table of the model it serves).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

BLOCK_ROWS = 1 << 14


def _block(seed: int, table: str, block: int, rows: int, dim: int, init: str, scale: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{table}/{block}".encode()) + (seed << 32))
    out = torch.empty(rows, dim)
    if init == "normal":
        return out.normal_(0.0, scale, generator=gen)
    return out.uniform_(-scale, scale, generator=gen)


def table_rows(
    table: str,
    num_rows: int,
    dim: int,
    row_start: int,
    row_end: int,
    seed: int,
    bound: float | None = None,
    init: str = "uniform",
    std: float = 1e-4,
) -> torch.Tensor:
    """Rows [row_start, row_end) of table ``table`` (num_rows x dim) as drawn for ``seed``.

    ``init='uniform'``: U(-bound, bound), bound 1/sqrt(num_rows) by default; ``'normal'``: N(0, std^2).
    """
    if not 0 <= row_start <= row_end <= num_rows:
        raise ValueError(f"rows [{row_start}, {row_end}) outside table {table} of {num_rows} rows")
    if init not in ("uniform", "normal"):
        raise ValueError(f"init must be 'uniform' or 'normal', got {init!r}")
    scale = std if init == "normal" else (1.0 / math.sqrt(num_rows) if bound is None else bound)
    parts = []
    for b in range(row_start // BLOCK_ROWS, (row_end + BLOCK_ROWS - 1) // BLOCK_ROWS):
        lo, hi = b * BLOCK_ROWS, min((b + 1) * BLOCK_ROWS, num_rows)
        block = _block(seed, table, b, hi - lo, dim, init, scale)
        parts.append(block[max(row_start, lo) - lo : min(row_end, hi) - lo])
    return torch.cat(parts) if parts else torch.empty(0, dim)


def _table_weights(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """(table name, weight) for every EmbeddingBagCollection table in a (possibly sharded) model.

    A weight is whatever ``state_dict`` holds (typed ``Any`` there): a Tensor, a ShardedTensor or another
    shard wrapper, told apart by duck typing in :func:`init_tables`.
    """
    for key, value in module.state_dict().items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-3] == "embedding_bags" and parts[-1] == "weight":
            yield parts[-2], value


@torch.no_grad()
def init_tables(module: nn.Module, seed: int, init: str = "uniform", std: float = 1e-4) -> dict[str, int]:
    """Fill every embedding table of ``module`` (sharded by DMP or not) from :func:`table_rows`.

    Returns the number of rows this rank wrote per table. Writing into the state_dict views works
    because TorchRec's sharded state_dict tensors alias the FBGEMM kernel's weights.
    """
    written: dict[str, int] = {}
    for table, weight in _table_weights(module):
        if hasattr(weight, "local_shards"):  # ShardedTensor: fill the shards this rank holds
            num_rows, dim = weight.size()
            for shard in weight.local_shards():
                (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                rows = table_rows(table, num_rows, dim, r0, r0 + nr, seed, init=init, std=std)[:, c0 : c0 + nc]
                shard.tensor.copy_(rows.to(shard.tensor.device, shard.tensor.dtype))
                written[table] = written.get(table, 0) + nr
        else:
            tensor = weight.local_tensor() if hasattr(weight, "local_tensor") else weight
            num_rows, dim = tensor.shape
            rows = table_rows(table, num_rows, dim, 0, num_rows, seed, init=init, std=std)
            tensor.copy_(rows.to(tensor.device, tensor.dtype))
            written[table] = num_rows
    return written
