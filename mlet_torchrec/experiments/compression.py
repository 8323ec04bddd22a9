"""The MLET papers' compression studies (appendix A.4), on collapsed models.

Three ways to shrink the served tables, each comparable with MLET's smaller d:

* **Hashing trick** (training time): the ids of chosen features are taken modulo m, a fraction
  of their cardinality, so those tables have m rows (:mod:`mlet_torchrec.experiments.hashing`:
  a hashed copy of a data set, used unchanged through ``data.path``, or hashing on the fly).
* **INT8 post-training quantization** with one symmetric scale per table,
  ``q = clamp(round(w / s), -127, 127)``, the scale found by a grid search minimising the L2 error
  ``||W - s q||`` (:func:`grid_search_scale`), against the max-abs scale ``s = max|W| / 127``.
* **Low-rank SVD** of a trained single-layer table (the competing method): the best rank-r
  approximation ``W ~ (W V_r) V_r^T`` from the d x d Gram matrix, streamed in row blocks
  (:func:`svd_factors`).

Table sizes are counted as in A.4.4: relative to the model with d = 1, un-hashed, FP32 tables,
i.e. ``sum_t params_t * bits / 32 / sum_t n_t`` with n_t the un-hashed rows
(:func:`relative_table_size`): a d = 16 FP32 model is 16, its INT8 version 4 (plus one scale per
table), hashing every table to a quarter of its rows gives 4, a rank-r SVD about r.

``mlet compression study --input COLLAPSED_DIR`` evaluates the INT8 and SVD variants of a collapsed model on
the test split; ``mlet compression hash --input DATA --output DIR C3=0.25 C4=0.1`` writes a hashed data set.

Example:
    >>> import torch
    >>> w = torch.randn(1000, 8)
    >>> s_grid, e_grid = grid_search_scale(w)
    >>> e_grid <= quantization_error(w, maxabs_scale(w))
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipes.schema import table_name
from mlet_torchrec.experiments.hashing import unhashed_cardinalities
from mlet_torchrec.modules.product import mlet_product

QMAX = {8: 127, 4: 7}


# --------------------------------------------------------------------------------------------
# sizes (A.4.4)


def relative_table_size(
    unhashed_rows: Mapping[str, int], params: Mapping[str, int], bits: int | Mapping[str, int] = 32, extra_bits: int = 0
) -> float:
    """Served table size relative to d = 1, un-hashed, FP32 tables (A.4.4).

    ``params``: stored parameters per table (n' x d for a dense table of n' rows, n r + r d for a
    rank-r factorisation); ``bits``: their width (32 FP32, 8 INT8), per table or for all;
    ``extra_bits``: per-table overhead such as a quantization scale.
    """
    base = sum(unhashed_rows.values())
    if base <= 0:
        raise ValueError("no rows to count")
    total = 0.0
    for name, p in params.items():
        b = bits[name] if isinstance(bits, Mapping) else bits
        total += p * b + extra_bits
    return total / (32 * base)


# --------------------------------------------------------------------------------------------
# INT8 post-training quantization, one symmetric scale per table


def maxabs_scale(w: torch.Tensor, bits: int = 8) -> float:
    """The scale that maps the largest |w| to the largest code (no clipping)."""
    m = float(w.abs().max()) if w.numel() else 0.0
    return m / QMAX[bits] if m > 0 else 1.0


def quantize_symmetric(w: torch.Tensor, scale: float, bits: int = 8) -> torch.Tensor:
    q = QMAX[bits]
    return torch.clamp(torch.round(w / scale), -q, q).to(torch.int8)


def dequantize(q: torch.Tensor, scale: float) -> torch.Tensor:
    return q.to(torch.float32) * scale


def _errors(w: torch.Tensor, scales: torch.Tensor, bits: int, chunk: int = 4096) -> torch.Tensor:
    """Sum of squared errors of symmetric quantization for every candidate scale.

    Works on (candidates x chunk) tiles small enough to stay in cache, in place; per-tile sums in
    float32, accumulated over tiles in float64.
    """
    q = QMAX[bits]
    flat = w.reshape(-1).to(torch.float32)
    out = torch.zeros(scales.numel(), dtype=torch.float64)
    s = scales.to(torch.float32).view(-1, 1)
    inv = 1.0 / s
    tile = torch.empty(scales.numel(), min(chunk, max(1, flat.numel())))
    for start in range(0, flat.numel(), chunk):
        x = flat[start : start + chunk].view(1, -1)
        t = tile[:, : x.shape[1]]
        torch.mul(x, inv, out=t)
        t.round_().clamp_(-q, q).mul_(s).sub_(x)
        out += torch.linalg.vector_norm(t, dim=1).double().square()
    return out


def quantization_error(w: torch.Tensor, scale: float, bits: int = 8) -> float:
    """L2 error ``||W - dequantize(quantize(W))||`` of one scale."""
    return float(_errors(w, torch.tensor([scale]), bits)[0].sqrt())


class _Probe:
    """The elements the scale search scores: all of them, or the largest ``sample // 8`` exactly
    plus a uniform sample of the rest, weighted to stand for all of it (the tail decides the
    clipping error, so it is never left to chance)."""

    def __init__(self, w: torch.Tensor, sample: int | None, seed: int) -> None:
        flat = w.reshape(-1)
        self.parts: list[tuple[torch.Tensor, float]] = [(flat, 1.0)]
        if sample is None or flat.numel() <= sample:
            return
        top_k = max(1, sample // 8)
        top = torch.topk(flat.abs(), top_k, sorted=False)
        threshold = float(top.values.min())
        g = torch.Generator().manual_seed(seed)
        drawn = flat[torch.randint(0, flat.numel(), (sample - top_k,), generator=g)]
        body = drawn[drawn.abs() < threshold]
        rest = flat.numel() - top_k
        self.parts = [(flat[top.indices], 1.0)]
        if body.numel():
            # the expected share of the draw below the threshold is rest / numel
            self.parts.append((body, rest / max(1.0, drawn.numel() * rest / flat.numel())))

    def errors(self, scales: torch.Tensor, bits: int) -> torch.Tensor:
        (first, first_weight), *rest = self.parts
        total = _errors(first, scales, bits) * first_weight
        for x, weight in rest:
            total = total + _errors(x, scales, bits) * weight
        return total


def grid_search_scale(
    w: torch.Tensor,
    num_grid: int = 64,
    min_fraction: float = 0.05,
    bits: int = 8,
    refine: int = 2,
    sample: int | None = 1 << 18,
    seed: int = 0,
) -> tuple[float, float]:
    """(scale, L2 error) of the symmetric per-table scale that minimises the L2 error.

    Candidates are ``a * maxabs_scale(w)`` for ``a`` on a grid over [min_fraction, 1] (so the
    max-abs scale is always a candidate and the result is never worse), refined ``refine`` times
    around the best. Tables above ``sample`` elements are scored on their largest elements plus a
    weighted random sample of the others; the error returned is always over the whole table.
    """
    base = maxabs_scale(w, bits)
    probe = _Probe(w, sample, seed)
    lo, hi = min_fraction, 1.0
    best_a = 1.0
    for _ in range(1 + refine):
        grid = torch.linspace(lo, hi, num_grid, dtype=torch.float64)
        grid = torch.unique(torch.cat([grid, torch.tensor([best_a], dtype=torch.float64)]))
        errs = probe.errors(grid * base, bits)
        i = int(torch.argmin(errs))
        best_a = float(grid[i])
        step = (hi - lo) / max(1, num_grid - 1)
        lo, hi = max(min_fraction, best_a - step), min(1.0, best_a + step)
    scale = best_a * base
    err, err_max = quantization_error(w, scale, bits), quantization_error(w, base, bits)
    if err_max < err:  # a sampled search can miss; never return worse than max-abs
        return base, err_max
    return scale, err


@dataclass
class QuantizedTable:
    name: str
    method: str  # "grid" or "maxabs"
    scale: float
    l2_error: float
    maxabs_l2_error: float
    bits: int = 8


def quantize_table(
    name: str, w: torch.Tensor, method: str = "grid", bits: int = 8
) -> tuple[torch.Tensor, QuantizedTable]:
    """(int8 codes, description) of one table with a symmetric per-table scale."""
    base = maxabs_scale(w, bits)
    err_max = quantization_error(w, base, bits)
    if method == "grid":
        scale, err = grid_search_scale(w, bits=bits)
    elif method == "maxabs":
        scale, err = base, err_max
    else:
        raise ValueError(f"quantization method {method!r} is not 'grid' or 'maxabs'")
    return quantize_symmetric(w, scale, bits), QuantizedTable(name, method, scale, err, err_max, bits)


def _embedding_tables(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Table name -> weight of a collapsed model's d-dim EmbeddingBagCollection (``model.embeddings``,
    or the only stock EBC); other EBCs (first-order ``lin_*`` tables) are left alone."""
    from torchrec import EmbeddingBagCollection

    named = getattr(model, "embeddings", None)
    ebcs = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection) and type(m) is EmbeddingBagCollection]
    if isinstance(named, EmbeddingBagCollection) and type(named) is EmbeddingBagCollection:
        ebcs = [named]
    elif len(ebcs) != 1:
        raise ValueError(f"expected one plain EmbeddingBagCollection (a collapsed model), found {len(ebcs)}")
    (ebc,) = ebcs
    return {name: bag.weight for name, bag in ebc.embedding_bags.items()}


@torch.no_grad()
def quantize_model_tables(model: torch.nn.Module, method: str = "grid", bits: int = 8) -> dict[str, QuantizedTable]:
    """Replace every table of a collapsed model by its INT8 round trip (fake quantization)."""
    out = {}
    for name, weight in _embedding_tables(model).items():
        q, info = quantize_table(name, weight.detach(), method, bits)
        weight.copy_(dequantize(q, info.scale))
        out[name] = info
    return out


# --------------------------------------------------------------------------------------------
# low-rank SVD (the competing method)


@torch.no_grad()
def svd_factors(
    w: torch.Tensor, rank: int, block_rows: int = 1 << 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A n x r, B r x d, singular values) with ``A @ B`` the best rank-r approximation of ``w``.

    From the d x d Gram matrix ``W^T W = V S^2 V^T`` (float64, accumulated in row blocks):
    ``A = W V_r``, ``B = V_r^T``, so ``A @ B = W V_r V_r^T`` (Eckart-Young).
    """
    n, d = w.shape
    if not 1 <= rank <= d:
        raise ValueError(f"rank {rank} outside [1, {d}]")
    gram = torch.zeros(d, d, dtype=torch.float64)
    for s in range(0, n, block_rows):
        x = w[s : s + block_rows].double()
        gram += x.T @ x
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    order = torch.argsort(evals, descending=True)
    v = evecs[:, order[:rank]]
    a = torch.empty(n, rank, dtype=torch.float32)
    for s in range(0, n, block_rows):
        a[s : s + block_rows] = (w[s : s + block_rows].double() @ v).float()
    return a, v.T.float().contiguous(), evals[order].clamp_min(0).sqrt()


@torch.no_grad()
def svd_model_tables(model: torch.nn.Module, rank: int) -> dict[str, dict[str, float]]:
    """Replace every table of a collapsed (e.g. single-layer) model by its rank-r SVD approximation."""
    out = {}
    for name, weight in _embedding_tables(model).items():
        r = min(rank, weight.shape[1])
        a, b, sv = svd_factors(weight.detach(), r)
        approx = mlet_product(a, b, block_rows=1 << 16)
        out[name] = {
            "rank": r,
            "rel_l2_error": float((approx - weight).norm() / weight.norm().clamp_min(1e-30)),
            "params": a.numel() + b.numel(),
        }
        weight.copy_(approx)
    return out


# --------------------------------------------------------------------------------------------
# the study


def compression_study(
    collapsed: str | Path,
    split: str = "test",
    svd_ranks: Sequence[int] = (),
    int8: bool = True,
    max_rows: int | None = None,
) -> list[dict[str, object]]:
    """Rows {method, table_size (A.4.4), auc, logloss} for a collapsed model and its compressed variants.

    In one process, or as one rank of a job (torchrun, TorchX, ``mlet compression study --nproc-per-node``):
    every rank builds the same variants, scores its slice of the split, and returns the same rows."""
    from mlet_torchrec.ranks import in_distributed_job
    from mlet_torchrec.serving.artifact import load_artifact
    from mlet_torchrec.training.distributed import process_group

    if not in_distributed_job():
        return _study(collapsed, split, svd_ranks, int8, max_rows, 0, 1)
    with process_group(load_artifact(collapsed).config.run.device) as ctx:
        return _study(collapsed, split, svd_ranks, int8, max_rows, ctx.rank, ctx.world_size)


def _study(
    collapsed: str | Path, split: str, svd_ranks: Sequence[int], int8: bool, max_rows: int | None, rank: int, world: int
) -> list[dict[str, object]]:
    from mlet_torchrec.evaluation.evaluate import evaluate_split
    from mlet_torchrec.serving.artifact import load_collapsed

    model, config, meta = load_collapsed(collapsed)
    rows_unhashed = unhashed_cardinalities(meta)
    table_rows = {table_name(f.name): f.cardinality for f in meta.sparse}
    base_rows = {table_name(k): v for k, v in rows_unhashed.items()}
    d = config.embedding.d
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def score() -> dict[str, float]:
        m = evaluate_split(model, config.data.path, split, config.train.eval_batch_size, meta, max_rows, rank, world)
        return {"auc": m.auc, "logloss": m.logloss, "auc_error_bound": m.auc_error_bound}

    dense_params = {t: n * d for t, n in table_rows.items()}
    results: list[dict[str, object]] = [
        {"method": f"fp32 d={d}", "table_size": relative_table_size(base_rows, dense_params), **score()}
    ]
    if int8:
        for method in ("maxabs", "grid"):
            model.load_state_dict(state)
            info = quantize_model_tables(model, method)
            results.append(
                {
                    "method": f"int8 {method} d={d}",
                    "table_size": relative_table_size(base_rows, dense_params, bits=8, extra_bits=32),
                    "l2_error": math.sqrt(sum(i.l2_error**2 for i in info.values())),
                    **score(),
                }
            )
    for r in svd_ranks:
        model.load_state_dict(state)
        svd_info = svd_model_tables(model, r)
        results.append(
            {
                "method": f"svd rank {r} of d={d}",
                "table_size": relative_table_size(base_rows, {t: int(i["params"]) for t, i in svd_info.items()}),
                **score(),
            }
        )
    model.load_state_dict(state)
    return results
