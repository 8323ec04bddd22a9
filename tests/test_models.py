"""Every model on MLET embeddings: shapes, exact collapse, one code path for baseline and MLET,
the DeepCTR-Torch layer definitions, and (slow) 2-rank sharded training of every model."""

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchrec import KeyedJaggedTensor

from data_pipes.schema import DatasetMeta, SparseFeature
from mlet_torchrec.config import ConfigError, load_config
from mlet_torchrec.models.autoint import InteractingLayer
from mlet_torchrec.models.blocks import LINEAR_TABLE_DIM, BiInteraction
from mlet_torchrec.models.configs import MODEL_CONFIGS
from mlet_torchrec.models.registry import build_model, builder
from mlet_torchrec.models.xdeepfm import CIN
from mlet_torchrec.modules.mlet_ebc import MLETEmbeddingBagCollection
from mlet_torchrec.serving.collapse import collapse_state_dict, extra_table_keys

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NAMES = sorted(MODEL_CONFIGS)
CARDS = [5, 20, 60, 200]
# tiny shapes of every model; each model gets those of its keys (tiny())
TINY_SHAPES = [
    "model.bottom_mlp=[8]",
    "model.top_mlp=[8]",
    "model.dnn_hidden_units=[16]",
    "model.cin_layer_size=[8, 4]",
    "model.dcn_low_rank_dim=4",
    "model.dcn_num_layers=2",
    "model.att_layer_num=2",
]


def tiny(name: str) -> list[str]:
    """``model.name=NAME`` and the tiny shapes of the keys that model has."""
    keys = MODEL_CONFIGS[name].model_fields
    return [f"model.name={name}", *(o for o in TINY_SHAPES if o.split("=")[0].removeprefix("model.") in keys)]


def _meta() -> DatasetMeta:
    sparse = [SparseFeature(name=f"C{i + 1}", cardinality=c, multi_hot=i == 3) for i, c in enumerate(CARDS)]
    return DatasetMeta(dense=["I1", "I2", "I3"], sparse=sparse, splits={"train": []})


def _batch(batch: int = 32, seed: int = 0):
    """Dense features and a KJT with one id for C1..C3 and bags of 0..3 ids (empty ones too) for C4."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.cat([torch.ones(3 * batch, dtype=torch.long), torch.randint(0, 4, (batch,), generator=g)])
    values = torch.cat(
        [
            torch.randint(0, c, (int(lengths[i * batch : (i + 1) * batch].sum()),), generator=g)
            for i, c in enumerate(CARDS)
        ]
    )
    kjt = KeyedJaggedTensor.from_lengths_sync([f"C{i + 1}" for i in range(4)], values, lengths)
    return torch.randn(batch, 3, generator=g), kjt


def _cfg(name: str, k="16", *extra: str):
    return load_config(None, [*tiny(name), "embedding.d=8", f"embedding.k={k}", "embedding.sigma=0.5", *extra])


def test_registry_is_built_from_the_config_classes():
    assert {"autoint", "dcn", "deepfm", "dlrm", "dlrm_dcn", "nfm", "wdl", "xdeepfm"} <= set(NAMES)
    for name, cls in MODEL_CONFIGS.items():  # each model: configs/<name>.py and <name>.py with build()
        assert cls.__module__ == f"mlet_torchrec.models.configs.{name}"
        assert builder(name).__module__ == f"mlet_torchrec.models.{name}"
        assert load_config(None, [f"model.name={name}"]).model == cls()
    with pytest.raises(ValueError, match="known models"):
        builder("no_such_model")


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_collapse_is_exact(name):
    cfg, meta = _cfg(name), _meta()
    torch.manual_seed(0)
    factored = build_model(cfg.model, cfg.embedding, meta).eval()
    plain = build_model(cfg.model, cfg.embedding, meta, collapsed=True).eval()
    collapsed = collapse_state_dict(factored, plain)
    plain.load_state_dict(collapsed)
    dense, kjt = _batch()
    with torch.no_grad():
        p_factored, p_plain = torch.sigmoid(factored(dense, kjt)), torch.sigmoid(plain(dense, kjt))
    assert p_factored.shape == (32,) and torch.isfinite(p_factored).all() and p_factored.std() > 1e-4
    assert (p_factored - p_plain).abs().max() <= 1e-5
    lin = [key for key in collapsed if ".lin_" in key]
    assert len(lin) == (len(CARDS) if MODEL_CONFIGS[name].first_order else 0)
    sources = extra_table_keys(factored, plain)
    assert sorted(sources) == sorted(lin)
    for key in lin:  # first-order tables: trained inside W1 (one lookup), copied unchanged to the plain EBC
        assert ".w1.embedding_bags.lin_" in sources[key] and ".linear_arch." in key
        assert torch.equal(collapsed[key], factored.state_dict()[sources[key]])
        assert collapsed[key].shape[1] == LINEAR_TABLE_DIM
    # training: one EmbeddingBagCollection (W1) serves the fields and the first-order term
    assert sum(type(m).__name__ == "EmbeddingBagCollection" for m in factored.modules()) == 1


@pytest.mark.parametrize("name", NAMES)
def test_every_model_takes_a_data_set_without_dense_features(name):
    """MovieLens has no dense feature: every model builds without a warning and scores from the ids alone."""
    meta, cfg = _meta().model_copy(update={"dense": []}), _cfg(name)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model(cfg.model, cfg.embedding, meta).eval()
    dense, kjt = _batch()
    with torch.no_grad():
        p = torch.sigmoid(model(dense[:, :0], kjt))
    assert p.shape == (32,) and torch.isfinite(p).all() and p.std() > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_baseline_and_mlet_run_through_the_same_module(name):
    torch.manual_seed(0)
    models = {
        k: build_model(c.model, c.embedding, _meta()) for k, c in (("16", _cfg(name)), ("null", _cfg(name, "null")))
    }
    assert type(models["16"].net) is type(models["null"].net)
    for k, model in models.items():
        assert isinstance(model.embeddings, MLETEmbeddingBagCollection)
        assert model.embeddings.is_factored == (k == "16")
        dense, kjt = _batch(8)
        assert model(dense, kjt).shape == (8,)
    factored_keys = {key for key in models["16"].state_dict() if ".w2." not in key}
    assert factored_keys == set(models["null"].state_dict())


def test_dnn_defaults_follow_deepctr_and_other_models_keys_are_errors():
    cfg = load_config(None, ["model.name=xdeepfm"])
    assert cfg.model.dnn_units() == [256, 256] and cfg.model.cin_layer_size == [256, 128]
    assert load_config(None, ["model.name=dcn"]).model.dnn_units() == [128, 128]
    assert load_config(None, ["model.name=autoint"]).model.att_head_num == 2
    assert not hasattr(load_config(None).model, "dnn_units")  # dlrm reads bottom_mlp / top_mlp
    with pytest.raises(ConfigError, match=r"model.dnn_units: unknown key of model dlrm \(its keys: name, bottom_mlp"):
        load_config(None, ["model.dnn_units=[4]"])
    with pytest.raises(ConfigError, match="model.cin_layer_size: unknown key of model deepfm"):
        load_config(None, ["model.name=deepfm", "model.cin_layer_size=[4]"])
    with pytest.raises(ConfigError, match="every layer but the last must be even"):
        load_config(None, ["model.name=xdeepfm", "model.cin_layer_size=[5, 4]"])
    cfg = _cfg("autoint", "16", "model.att_head_num=3")
    with pytest.raises(ConfigError, match="att_head_num=3 must divide embedding.d=8"):
        build_model(cfg.model, cfg.embedding, _meta())
    cfg = _cfg("nfm", "16", "model.dnn_hidden_units=[]")
    with pytest.raises(ConfigError, match="nfm needs a non-empty"):
        build_model(cfg.model, cfg.embedding, _meta())


# -- the layers against DeepCTR-Torch 0.3.0's definitions (deepctr_torch/layers/interaction.py) --------------


def test_bi_interaction_is_deepctr_field_wise_fm():
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    square_of_sum = x.sum(dim=1) ** 2
    sum_of_square = (x * x).sum(dim=1)
    expected = 0.5 * (square_of_sum - sum_of_square)  # DeepCTR BiInteractionPooling; .sum(-1) is its FM
    pairs = sum(x[:, f] * x[:, g] for f in range(5) for g in range(f + 1, 5))
    got = BiInteraction()(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, pairs)


def test_cin_is_deepctr_cin():
    torch.manual_seed(0)
    cin = CIN(num_fields=5, layer_size=[6, 4], split_half=True).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    hidden, outs = [x], []
    for i, (size, mix) in enumerate(zip([6, 4], cin.mix, strict=True)):
        z = torch.einsum("bhd,bmd->bhmd", hidden[-1], hidden[0]).reshape(3, -1, 4)
        maps = torch.relu(F.conv1d(z, mix.weight.unsqueeze(-1), mix.bias))
        nxt, direct = torch.split(maps, 2 * [size // 2], 1) if i == 0 else (None, maps)
        outs.append(direct)
        hidden.append(nxt)
    expected = torch.cat(outs, dim=1).sum(-1)
    assert cin.out_features == 3 + 4
    torch.testing.assert_close(cin(x), expected)


def test_interacting_layer_is_deepctr_interacting_layer():
    torch.manual_seed(0)
    layer = InteractingLayer(d=4, head_num=2, use_res=True).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    q, k, v = (
        torch.stack(torch.split(torch.tensordot(x, w, dims=([-1], [0])), 2, dim=2))
        for w in (layer.w_query, layer.w_key, layer.w_value)
    )
    att = torch.softmax(torch.einsum("bnik,bnjk->bnij", q, k), dim=-1)
    out = torch.squeeze(torch.cat(torch.split(torch.matmul(att, v), 1), dim=-1), dim=0)
    expected = torch.relu(out + torch.tensordot(x, layer.w_res, dims=([-1], [0])))
    torch.testing.assert_close(layer(x), expected)


# -- every model trained sharded on 2 ranks --------------------------------------------------------------------


@pytest.mark.slow
def test_every_model_learns_on_two_ranks_and_collapses_exactly(tmp_path):
    from data_pipes.synth import SynthConfig, generate
    from mlet_torchrec.serving.collapse import collapse
    from mlet_torchrec.training.launcher import train_local

    data = tmp_path / "data"
    # the data of tests/test_end_to_end.py: small tables, so three epochs learn the planted signal
    generate(
        SynthConfig(
            rows=8000, num_dense=4, num_sparse=4, min_cardinality=5, max_cardinality=200, row_group_size=512, seed=2
        ),
        data,
        progress=False,
    )
    failures = {}
    for name in NAMES:
        run = tmp_path / name
        cfg = load_config(
            CONFIGS / "tiny.yaml",
            [
                f"data.path={data}",
                f"run.dir={run}",
                *tiny(name),
                "train.epochs=3",
                "embedding.sigma=0.5",
                "sparse_optimizer.name=adagrad",
                "sparse_optimizer.lr=0.05",
                "dense_optimizer.name=adagrad",
                "dense_optimizer.lr=0.05",
            ],
        )
        test = train_local(cfg, 2)["test"]
        report = collapse(run, tmp_path / f"{name}-collapsed")
        if not (
            test["logloss"] < test["label_entropy"] - 0.05
            and report.max_abs_diff <= 1e-5
            and report.rows_checked == test["rows"]
        ):
            failures[name] = (test, report.max_abs_diff)
    assert not failures, failures


@pytest.mark.parametrize(
    "kind, linear_kind", [("row_wise", "row_wise"), ("column_wise", "table_wise"), ("table_wise", "table_wise")]
)
def test_first_order_tables_follow_their_features_sharding(kind, linear_kind):
    """The planner (2 ranks, planned in this process) puts ``lin_<f>`` where the config puts f's table."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology

    from data_pipes.schema import table_name
    from mlet_torchrec.training.distributed import MLETEmbeddingBagCollectionSharder, plan_summary, sharding_constraints

    cfg = load_config(None, [*tiny("deepfm"), "embedding.d=4", "embedding.k=16", f"embedding.sharding={kind}"])
    meta = _meta()
    features = meta.sparse_names()
    model = build_model(cfg.model, cfg.embedding, meta, device=torch.device("meta"))
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=2, compute_device="cpu"),
        constraints=sharding_constraints(cfg.embedding, features, {f: table_name(f) for f in features}, 2),
    )
    plan = plan_summary(planner.plan(model, [MLETEmbeddingBagCollectionSharder()]))
    kinds = {path.rsplit(".", 1)[1]: p["sharding_type"] for path, p in plan.items()}
    assert {kinds[f"t_{f}"] for f in features} == {kind}
    assert {kinds[f"lin_{f}"] for f in features} == {linear_kind}
