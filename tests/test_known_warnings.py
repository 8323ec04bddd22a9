"""The warnings ``mlet`` silences are the ones it understands: each filter matches what the library really
says, and what the warning fears does not happen for the code paths this project uses.

fbgemm's dense (data_parallel) embedding kernel warns "an autograd kernel was not registered ... This may
lead to silently incorrect behavior" on every backward. Its CPU kernel builds its own autograd node, so
torch's fallback only attaches a warning hook; the gradients below equal torch's ``embedding_bag``.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import DenseTableBatchedEmbeddingBagsCodegen

from mlet_torchrec.logs import KNOWN_WARNINGS

ROWS = (10, 7)
DIM = 4


def _filter_for(message: str) -> tuple[str, type[Warning], str]:
    (entry,) = [w for w in KNOWN_WARNINGS if re.match(w[0], message)]
    return entry


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_fbgemm_dense_kernel_gradient_is_right_and_its_warning_is_the_filtered_one(mode):
    torch.manual_seed(0)
    tbe = DenseTableBatchedEmbeddingBagsCodegen(
        [(n, DIM) for n in ROWS], pooling_mode=PoolingMode.SUM if mode == "sum" else PoolingMode.MEAN, use_cpu=True
    )
    # two tables x two bags, fbgemm's table-major layout: table 0 bags [0,2) [2,3), table 1 bags [3,6) [6,8)
    ids = torch.tensor([1, 2, 2, 3, 0, 6, 6, 5])
    out = tbe(ids, torch.tensor([0, 2, 3, 6, 8]))
    assert type(out.grad_fn).__name__ == "CppFunction"  # fbgemm's own autograd node, not torch's warn-only node
    upstream = torch.randn_like(out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out.backward(upstream)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "This may lead to silently incorrect behavior" in messages[0]
    assert _filter_for(messages[0])[1] is caught[0].category

    tables = [t.detach().clone().requires_grad_() for t in tbe.weights.detach().split([n * DIM for n in ROWS])]
    pooled = [
        torch.nn.functional.embedding_bag(ids[lo:hi], t.view(n, DIM), torch.tensor([0, mid - lo]), mode=mode)
        for t, n, (lo, mid, hi) in zip(tables, ROWS, [(0, 2, 3), (3, 6, 8)], strict=True)
    ]
    reference = torch.cat(pooled, dim=1)
    torch.testing.assert_close(out, reference)
    reference.backward(upstream)
    assert tbe.weights.grad is not None
    torch.testing.assert_close(tbe.weights.grad, torch.cat([t.grad for t in tables]))
    assert float(tbe.weights.grad.abs().sum()) > 0


def test_torchscript_warnings_of_export_are_the_filtered_ones_and_change_nothing():
    """Scripting a torch.fx.GraphModule (what export does) and a function annotated ``torch.IntTensor`` (as
    TorchRec's KeyedJaggedTensor code is) warn with the filtered messages; the scripted code computes the same."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scripted = torch.jit.script(torch.fx.symbolic_trace(linear))
        counted = torch.jit.script(_count_int)
    for message in ("instance-level annotations on empty non-base types", "dtype-specific subtypes"):
        hits = [w for w in caught if message in str(w.message)]
        assert hits and all(_filter_for(str(w.message))[1] is w.category for w in hits)
    torch.testing.assert_close(scripted(x), linear(x), rtol=0, atol=0)
    ids = torch.tensor([3, 1, 2], dtype=torch.int32)
    assert counted(ids) == _count_int(ids) == 3 and ids.dtype == torch.int32


def _count_int(ids: torch.IntTensor) -> int:
    return int(ids.numel())
