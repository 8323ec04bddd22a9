"""The MLET product W1 @ W2: the one routine every caller uses (training forward, collapse, export, studies).

Two regimes of the same product:

* ``block_rows=None`` (the training forward): one differentiable ``torch.matmul``; batched operands
  (``(F, B, k) @ (F, k, d)``: every feature's pooled rows times its table's W2) are one batched matmul;
* ``block_rows=N`` (collapse): no autograd, ``out = w1 @ w2`` in row blocks. A single ``torch.mm`` over a
  tall-skinny W1 streams it at well below memory bandwidth; blocks of ~10^4 rows keep the BLAS kernel in
  its efficient regime and need no full-size temporaries. ``accumulate=torch.float64`` converts each block
  (through a reused buffer) for a double-precision product, rounded once into ``out``'s dtype.

Example:
    >>> import torch
    >>> w1, w2 = torch.randn(100, 8), torch.randn(8, 4)
    >>> torch.allclose(mlet_product(w1, w2, block_rows=7), w1 @ w2, atol=1e-5)
    True
    >>> mlet_product(torch.randn(3, 5, 8), torch.randn(3, 8, 4)).shape  # batched, differentiable
    torch.Size([3, 5, 4])
"""

from __future__ import annotations

import torch

from mlet_torchrec.options import BLOCK_ROWS


def mlet_product(
    w1: torch.Tensor,
    w2: torch.Tensor,
    out: torch.Tensor | None = None,
    block_rows: int | None = None,
    accumulate: torch.dtype | None = None,
) -> torch.Tensor:
    """``w1 @ w2``: differentiable when ``block_rows`` is None, else blocked into ``out`` (2-D, no grad)."""
    if block_rows is None and out is None and accumulate is None:
        return torch.matmul(w1, w2)
    return _blocked(w1, w2, out, block_rows or BLOCK_ROWS, accumulate or w1.dtype)


@torch.no_grad()
def _blocked(
    w1: torch.Tensor, w2: torch.Tensor, out: torch.Tensor | None, block_rows: int, accumulate: torch.dtype
) -> torch.Tensor:
    if block_rows <= 0:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
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
