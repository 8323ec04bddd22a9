"""FM, the model added as one config module and one network module: it trains on MLET embeddings, collapses
exactly, exports for serving, and its config round-trips."""

from pathlib import Path

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from mlet_torchrec.config import ConfigError, load_config
from mlet_torchrec.models.fm import FM
from mlet_torchrec.serving.artifact import load_artifact, load_collapsed
from mlet_torchrec.serving.collapse import collapse
from mlet_torchrec.serving.export import export

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_config_round_trips_and_refuses_other_models_keys(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.name=fm", "embedding.d=8", "embedding.k=32"])
    assert cfg.model.model_dump() == {"name": "fm"} and type(cfg.model).first_order
    cfg.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    with pytest.raises(ConfigError, match=r"model.dnn_hidden_units: unknown key of model fm \(its keys: name\)"):
        load_config(None, ["model.name=fm", "model.dnn_hidden_units=[8]"])


def test_logit_is_first_order_plus_pairwise_dot_products():
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=4, num_embeddings=6, feature_names=[f]) for f in "abc"]
    torch.manual_seed(0)
    model = FM(EmbeddingBagCollection(tables), num_dense=2)
    kjt = KeyedJaggedTensor.from_lengths_sync(list("abc"), torch.tensor([1, 2, 3, 4, 5, 0]), torch.ones(6).long())
    dense = torch.randn(2, 2)
    state = model.state_dict()
    e = torch.stack(
        [state[f"sparse_arch.embedding_bag_collection.embedding_bags.t_{f}.weight"][kjt[f].values()] for f in "abc"], 1
    )
    lin = sum(
        state[f"linear_arch.embedding_bag_collection.embedding_bags.lin_{f}.weight"][kjt[f].values(), 0] for f in "abc"
    )
    pairs = sum((e[:, f] * e[:, g]).sum(1) for f in range(3) for g in range(f + 1, 3))
    expected = lin + model.linear_arch.bias + model.linear_arch.dense(dense).squeeze(1) + pairs
    torch.testing.assert_close(model(dense, kjt).squeeze(1), expected)


@pytest.mark.slow
def test_trains_collapses_exactly_and_exports(synth_dataset, tmp_path):
    """A few steps on the synthetic data in this process; collapse gives the MLET model's logits; the export
    (TorchRec's INT8 model) loads and scores the test split."""
    from mlet_torchrec.training.train import train

    data = synth_dataset()
    run = tmp_path / "run"
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        [
            f"data.path={data}",
            f"run.dir={run}",
            "model.name=fm",
            "embedding.d=8",
            "embedding.k=32",
            "train.max_steps=20",
        ],
    )
    result = train(cfg).summary()
    test = result["test"]
    assert result["steps"] == 20 and test["logloss"] < test["label_entropy"]

    report = collapse(run, tmp_path / "collapsed", check_split="test")
    assert report.rows_checked == test["rows"] and report.max_abs_diff <= 1e-5
    factored = load_artifact(run).materialize()
    plain = load_collapsed(tmp_path / "collapsed")[0]
    assert type(factored.net) is type(plain.net) is FM
    dense = torch.randn(16, 3)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        [f"C{i}" for i in range(1, 5)], torch.zeros(64, dtype=torch.long), torch.ones(64, dtype=torch.long)
    )
    with torch.no_grad():
        torch.testing.assert_close(plain(dense, kjt), factored(dense, kjt), atol=1e-5, rtol=0)

    out = export(tmp_path / "collapsed", tmp_path / "export", int8=True, auc_tolerance=1.0)
    assert out.rows_checked == test["rows"] and out.max_abs_prob_diff is not None
    assert out.max_abs_prob_diff < 0.02
