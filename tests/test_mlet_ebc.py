"""Unit tests of MLETEmbeddingBagCollection, deterministic table init and collapse of one module."""

import math

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import PoolingType

from mlet_torchrec.config import ConfigError, load_config
from mlet_torchrec.modules.mlet_ebc import InnerDimensionError, MLETEmbeddingBagCollection
from mlet_torchrec.modules.table_init import BLOCK_ROWS, init_tables, table_rows


def _tables(d=4, pooling=PoolingType.SUM):
    return [
        EmbeddingBagConfig(name="t_a", embedding_dim=d, num_embeddings=50, feature_names=["a"], pooling=pooling),
        EmbeddingBagConfig(name="t_b", embedding_dim=d, num_embeddings=30, feature_names=["b", "c"], pooling=pooling),
        EmbeddingBagConfig(name="t_e", embedding_dim=d, num_embeddings=20, feature_names=["e"], pooling=pooling),
    ]


def _kjt(batch=5, seed=0):
    """Multi-hot bags of 0..3 ids (empty bags included) for features a, b, c, e."""
    g = torch.Generator().manual_seed(seed)
    keys, sizes = ["a", "b", "c", "e"], [50, 30, 30, 20]
    lengths = torch.randint(0, 4, (len(keys) * batch,), generator=g)
    values = torch.cat(
        [
            torch.randint(0, n, (int(lengths[i * batch : (i + 1) * batch].sum()),), generator=g)
            for i, n in enumerate(sizes)
        ]
    )
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)


def _reference(module: MLETEmbeddingBagCollection, kjt: KeyedJaggedTensor, mean: bool) -> torch.Tensor:
    """pool(W1 rows) @ W2 per feature, by explicit loops (the definition, not the implementation)."""
    feature_table = {f: t.name for t in module.embedding_bag_configs() for f in t.feature_names}
    out = []
    jt = kjt.to_dict()
    for key in kjt.keys():
        table = feature_table[key]
        w1 = module.w1.embedding_bags[table].weight.detach()
        cols = []
        for row_ids in jt[key].to_dense():
            pooled = w1[row_ids].sum(0) if len(row_ids) else torch.zeros(w1.shape[1])
            if mean and len(row_ids):
                pooled = pooled / len(row_ids)
            k = module.inner_dims()[table]
            cols.append(pooled @ module.w2[table].detach() if k is not None else pooled)
        out.append(torch.stack(cols))
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("inner", [16, {"t_a": 8, "t_b": 16, "t_e": None}, None])
def test_output_equals_pooled_w1_times_w2(pooling, inner):
    torch.manual_seed(0)
    module = MLETEmbeddingBagCollection(_tables(pooling=pooling), inner_dim=inner, sigma=0.5)
    kjt = _kjt()
    got = module(kjt)
    assert got.keys() == ["a", "b", "c", "e"]
    assert got.length_per_key() == [4, 4, 4, 4]
    want = _reference(module, kjt, mean=pooling == PoolingType.MEAN)
    torch.testing.assert_close(got.values(), want, atol=1e-6, rtol=1e-5)


def test_baseline_mode_is_the_plain_ebc():
    torch.manual_seed(0)
    module = MLETEmbeddingBagCollection(_tables(), inner_dim=None)
    plain = EmbeddingBagCollection(tables=_tables())
    plain.load_state_dict({k.removeprefix("w1."): v for k, v in module.state_dict().items()})
    kjt = _kjt()
    assert not module.is_factored and len(list(module.w2.parameters())) == 0
    torch.testing.assert_close(module(kjt).values(), plain(kjt).values())


def test_reports_d_dim_configs_and_fits_stock_dlrm():
    torch.manual_seed(0)
    module = MLETEmbeddingBagCollection(_tables(d=4), inner_dim=32)
    assert [t.embedding_dim for t in module.embedding_bag_configs()] == [4, 4, 4]
    assert [t.embedding_dim for t in module.w1.embedding_bag_configs()] == [32, 32, 32]
    dlrm = DLRM(
        embedding_bag_collection=module,
        dense_in_features=3,
        dense_arch_layer_sizes=[8, 4],
        over_arch_layer_sizes=[8, 1],
    )
    logits = dlrm(torch.randn(5, 3), _kjt())
    assert logits.shape == (5, 1)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.w2.values())


def test_w2_init_statistics():
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=32, num_embeddings=10, feature_names=[f"f{i}"]) for i in range(4)
    ]
    for sigma in (0.25, 0.5):
        module = MLETEmbeddingBagCollection(tables, inner_dim=256, sigma=sigma)
        w2 = torch.cat([p.detach().flatten() for p in module.w2.values()])  # 32768 draws
        assert w2.numel() == 4 * 256 * 32
        assert abs(float(w2.mean())) < 4 * sigma / math.sqrt(w2.numel())
        assert abs(float(w2.std()) / sigma - 1) < 0.02


def test_w1_init_is_uniform_like_a_normal_table_and_sharding_independent():
    num_rows, dim = 3 * BLOCK_ROWS + 123, 8
    full = table_rows("t", num_rows, dim, 0, num_rows, seed=7)
    bound = 1 / math.sqrt(num_rows)
    assert float(full.abs().max()) <= bound
    assert abs(float(full.std()) / (bound / math.sqrt(3)) - 1) < 0.01
    # any row range (a row-wise shard) equals the same rows of the whole table
    for lo, hi in [(5, 17), (BLOCK_ROWS - 3, 2 * BLOCK_ROWS + 9), (num_rows - 10, num_rows)]:
        torch.testing.assert_close(table_rows("t", num_rows, dim, lo, hi, seed=7), full[lo:hi], rtol=0, atol=0)
    assert not torch.equal(table_rows("t", num_rows, dim, 0, 10, seed=8), full[:10])
    assert not torch.equal(table_rows("u", num_rows, dim, 0, 10, seed=7), full[:10])


def test_init_tables_fills_every_table_deterministically():
    a = MLETEmbeddingBagCollection(_tables(), inner_dim=16)
    b = MLETEmbeddingBagCollection(_tables(), inner_dim=16)
    assert init_tables(a, seed=3) == {"t_a": 50, "t_b": 30, "t_e": 20}
    init_tables(b, seed=3)
    for name in ("t_a", "t_b", "t_e"):
        torch.testing.assert_close(a.w1.embedding_bags[name].weight, b.w1.embedding_bags[name].weight, rtol=0, atol=0)


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_collapsed_table_reproduces_the_factored_output(pooling):
    torch.manual_seed(1)
    module = MLETEmbeddingBagCollection(_tables(pooling=pooling), inner_dim={"t_a": 64, "t_b": 8, "t_e": None})
    plain = EmbeddingBagCollection(tables=_tables(pooling=pooling))
    with torch.no_grad():
        for t in plain.embedding_bag_configs():
            w1 = module.w1.embedding_bags[t.name].weight
            plain.embedding_bags[t.name].weight.copy_(module.collapse_table(t.name, w1, block_rows=7))
    kjt = _kjt(batch=16, seed=4)
    assert float((module(kjt).values() - plain(kjt).values()).abs().max()) <= 1e-6


def test_k_below_d_is_refused_unless_allowed():
    with pytest.raises(InnerDimensionError, match=r"table t_a: inner dimension k=2 is below d=4"):
        MLETEmbeddingBagCollection(_tables(d=4), inner_dim=2)
    module = MLETEmbeddingBagCollection(_tables(d=4), inner_dim=2, allow_k_below_d=True)
    assert module(_kjt()).values().shape == (5, 16)
    with pytest.raises(ConfigError, match=r"embedding.k=4 is below embedding.d=8"):
        load_config(None, ["embedding.d=8", "embedding.k=4"])
    with pytest.raises(ConfigError, match=r"embedding.tables.C1.k=2"):
        load_config(None, ["embedding.d=8", "embedding.k=64", "embedding.tables.C1.k=2"])
    assert load_config(None, ["embedding.d=8", "embedding.k=4", "embedding.allow_k_below_d=true"]).embedding.k == 4


def test_unknown_table_in_inner_dims_is_an_error():
    with pytest.raises(KeyError, match="unknown tables"):
        MLETEmbeddingBagCollection(_tables(), inner_dim={"t_zz": 16})


def test_projection_is_one_batched_op_for_uniform_k():
    module = MLETEmbeddingBagCollection(_tables(), inner_dim=16)
    assert len(module._groups) == 1
    mixed = MLETEmbeddingBagCollection(_tables(), inner_dim={"t_a": 8, "t_b": 16, "t_e": 16})
    assert sorted(g.k for g in mixed._groups) == [8, 16]


@pytest.mark.parametrize("inner", [16, {"t_a": 8, "t_b": 16, "t_e": None}])
def test_w1_output_in_any_key_order_gives_the_same_result(inner):
    """A sharded W1 returns its keys grouped by shard, not in table order (table-wise over 2 ranks)."""
    torch.manual_seed(0)
    module = MLETEmbeddingBagCollection(_tables(), inner_dim=inner)
    kjt = _kjt()
    expected = module(kjt).values()
    plain_forward = module.w1.forward

    def shuffled_forward(features):
        kt = plain_forward(features)
        order = ["e", "c", "a", "b"]
        parts = kt.to_dict()
        return KeyedTensor(
            keys=order,
            length_per_key=[parts[k].shape[1] for k in order],
            values=torch.cat([parts[k] for k in order], dim=1),
        )

    module.w1.forward = shuffled_forward
    got = module(kjt)
    assert got.keys() == ["a", "b", "c", "e"]
    torch.testing.assert_close(got.values(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("inner", [16, None, {"t_a": 16, "t_b": None, "t_e": 8}])
def test_extra_tables_share_the_lookup_and_leave_the_output_alone(inner):
    """Extra single-layer tables reading the same features ride along in W1: the module's output is what it is
    without them, and the extra pooled values are a plain lookup of those tables."""
    extra = [
        EmbeddingBagConfig(
            name=f"lin_{t.name}", embedding_dim=4, num_embeddings=t.num_embeddings, feature_names=list(t.feature_names)
        )
        for t in _tables()
    ]
    torch.manual_seed(0)
    alone = MLETEmbeddingBagCollection(_tables(), inner_dim=inner, sigma=0.5)
    torch.manual_seed(0)
    both = MLETEmbeddingBagCollection(_tables(), inner_dim=inner, sigma=0.5, extra_tables=extra)
    state = both.state_dict()
    alone.load_state_dict({k: v for k, v in state.items() if ".lin_" not in k})
    assert [t.name for t in both.embedding_bag_configs()] == [t.name for t in alone.embedding_bag_configs()]
    assert [t.name for t in both.extra_bag_configs()] == [t.name for t in extra]
    kjt = _kjt()
    out, pooled = both.forward_with_extra(kjt)
    ref = alone(kjt)
    assert out.keys() == ref.keys() and torch.allclose(out.values(), ref.values(), atol=1e-6)
    plain = EmbeddingBagCollection(tables=extra)
    plain.load_state_dict({k.replace("w1.", ""): v for k, v in state.items() if ".lin_" in k})
    expected = plain(kjt)
    assert torch.equal(pooled, torch.cat([expected[f] for f in ("a", "b", "c", "e")], dim=1))
    pooled.sum().backward()  # the extra tables get gradients through the shared lookup
    assert both.w1.embedding_bags["lin_t_a"].weight.grad is not None


def test_extra_table_names_must_be_new():
    with pytest.raises(ValueError, match="extra table names"):
        MLETEmbeddingBagCollection(_tables(), inner_dim=16, extra_tables=[_tables()[0]])
