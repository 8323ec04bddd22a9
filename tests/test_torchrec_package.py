"""TorchRec's dict signature for every model: FP32 and INT8 scripted modules against the model's own forward."""

import pytest
import torch
from test_models import NAMES, _batch, _cfg, _meta

from mlet_torchrec.models.registry import build_model
from mlet_torchrec.serving.torchrec_package import MLETPredictFactory, batch_from_kjt, load_predict_module


@pytest.mark.parametrize("name", NAMES)
def test_every_model_scripts_with_the_dict_signature(name, tmp_path):
    cfg, meta = _cfg(name), _meta()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.embedding, meta, collapsed=True).eval()
    with torch.no_grad():
        for key, p in model.state_dict().items():
            if ".embedding_bags." in key:
                p.normal_(0.0, 0.3)  # large enough that the tables move the predictions
    dense, kjt = _batch()  # C4 holds bags of 0..3 ids: lengths other than 1 go through too
    with torch.no_grad():
        expected = torch.sigmoid(model(dense, kjt))
    batch = batch_from_kjt(dense, kjt)
    for int8, tolerance in ((False, 1e-6), (True, 0.05)):
        factory = MLETPredictFactory(model.net, meta.sparse_names(), len(meta.dense), int8=int8)
        path = tmp_path / f"{int8}.pt"
        torch.jit.save(factory.build(), str(path), _extra_files=factory.extra_files())
        out = load_predict_module(path)(batch)
        assert set(out) == {"default", "logits"} and out["default"].shape == (32,)
        assert torch.equal(out["default"], torch.sigmoid(out["logits"]))
        diff = float((out["default"] - expected).abs().max())
        assert diff <= tolerance, (int8, diff)
        if int8:
            assert diff > 0 and factory.table_bytes > 0  # really the INT8 tables
