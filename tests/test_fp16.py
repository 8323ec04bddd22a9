"""FP16 W1 (``embedding.w1_dtype=fp16``): trains with the fused optimizer on 2 gloo ranks and collapses to fp32."""

from pathlib import Path

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from mlet_torchrec.config import ConfigError, load_config
from mlet_torchrec.modules.mlet_ebc import MLETEmbeddingBagCollection
from mlet_torchrec.serving.artifact import load_collapsed, load_factored
from mlet_torchrec.serving.collapse import collapse
from mlet_torchrec.training.launcher import train_local

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_fp16_w1_module_outputs_fp32():
    tables = [EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"])]
    ebc = MLETEmbeddingBagCollection(tables, inner_dim=16, w1_dtype="fp16")
    assert ebc.w1.embedding_bags["t_a"].weight.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in ebc.w2.values())
    kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2, 3]), torch.tensor([1, 2]))
    assert ebc(kjt).values().dtype == torch.float32


def test_w1_dtype_is_validated():
    with pytest.raises(ConfigError, match="w1_dtype"):
        load_config(None, ["embedding.w1_dtype=bf16"])


@pytest.mark.slow
def test_fp16_w1_trains_on_2_ranks_and_collapses_to_fp32(synth_dataset, tmp_path):
    data = synth_dataset()
    cfg = load_config(
        TINY,
        [
            f"data.path={data}",
            f"run.dir={tmp_path / 'run'}",
            "embedding.w1_dtype=fp16",
            "run.device=cpu",
            "train.max_steps=20",
            "sparse_optimizer.lr=1.0",
        ],
    )
    summary = train_local(cfg, 2)
    assert summary["steps"] == 20 and summary["test"]["auc"] > 0.5
    factored, _, _, _ = load_factored(tmp_path / "run")
    state = factored.state_dict()
    w1_key = next(k for k in state if k.endswith("w1.embedding_bags.t_C1.weight"))
    assert state[w1_key].dtype == torch.float16

    # the fused optimizer moved the fp16 rows away from their initial values
    from data_pipes.schema import DatasetMeta
    from mlet_torchrec.models.registry import build_model
    from mlet_torchrec.modules.table_init import init_tables

    fresh = build_model(cfg.model, cfg.embedding, DatasetMeta.load(data))
    init_tables(fresh, cfg.train.seed, cfg.embedding.init, cfg.embedding.init_std)
    assert not torch.equal(fresh.state_dict()[w1_key], state[w1_key])

    report = collapse(tmp_path / "run", tmp_path / "collapsed", check_split="test")
    assert report.max_abs_diff <= report.tolerance
    plain, _, _ = load_collapsed(tmp_path / "collapsed")
    for key, w in plain.state_dict().items():
        if ".embedding_bags." not in key:
            continue
        table = key.split(".embedding_bags.")[1].split(".")[0]
        w1 = state[next(k for k in state if k.endswith(f"w1.embedding_bags.{table}.weight"))]
        w2 = state[next(k for k in state if k.endswith(f"w2.{table}"))]
        assert w.dtype == torch.float32
        torch.testing.assert_close(w, w1.float() @ w2, rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_w1_with_uvm_caching_trains_on_one_gpu(synth_dataset, tmp_path):
    """The two memory levers on a real GPU (nccl, one process): fp16 W1 behind a UVM cache."""
    from mlet_torchrec.training.train import train

    data = synth_dataset()
    cfg = load_config(
        TINY,
        [
            f"data.path={data}",
            f"run.dir={tmp_path / 'run'}",
            "embedding.w1_dtype=fp16",
            "embedding.uvm_caching=true",
            "run.device=cuda",
            "train.max_steps=10",
        ],
    )
    result = train(cfg)
    assert result.steps == 10 and result.test is not None
    report = collapse(tmp_path / "run", tmp_path / "collapsed", check_split="test")
    assert report.max_abs_diff <= report.tolerance
