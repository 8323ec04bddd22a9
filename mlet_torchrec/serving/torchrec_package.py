"""TorchRec's inference package of a collapsed model: the dict-signature module TorchRec's predictor calls.

TorchRec's inference stack (``torchrec.inference``: ``PredictFactory``/``PredictModule``, the C++
predictor) calls a model with one ``Dict[str, Tensor]`` and reads the probabilities from ``["default"]``.
:class:`MLETPredictModule` gives every model of the project that signature::

    {"float_features": float32 (B, #dense),
     "id_list_features.lengths": int64 (#sparse * B,),   # feature-major, as KeyedJaggedTensor keeps them
     "id_list_features.values": int64 (sum of lengths,)}
      -> {"default": probabilities float32 (B,), "logits": float32 (B,)}

:class:`MLETPredictFactory` builds it the way TorchRec's DLRM example does: FP32 as it is, or INT8 through
``quantize_inference_model``, optionally sharded table-wise over ``shards`` devices through
``shard_quant_model``; then ``torchrec.fx`` tracing and ``torch.jit.script``. The scripted file carries the
factory's batching metadata (``batching_metadata.json``) and result type (``result_metadata``) as extra
files; a process that imports only ``torch`` and ``torchrec`` loads and calls it.

Example:
    >>> ids = torch.tensor([[3, 7], [4, 0]])             # (B=2 rows, 2 sparse features)
    >>> batch = batch_from_ids(torch.zeros(2, 1), ids)
    >>> batch["id_list_features.values"].tolist(), batch["id_list_features.lengths"].tolist()
    ([3, 4, 7, 0], [1, 1, 1, 1])
"""

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.inference.modules import BatchingMetadata, PredictFactory, PredictModule

PREDICT_FP32 = "predict_fp32.pt"
PREDICT_INT8 = "predict_int8.pt"
BATCHING_METADATA_FILE = "batching_metadata.json"
RESULT_METADATA_FILE = "result_metadata"
RESULT_METADATA = "dict_of_tensor"
SHARDED_TOLERANCE = 1e-6  # sharded vs unsharded INT8: the same kernels on the same rows, so equal up to order
# the sharding types shard_quant_model can place on CPU in torchrec 1.8 (row-wise fails in
# assign_weights_to_tbe, column-wise in forward; see docs and STACK-NOTES)
CPU_SHARDING_TYPES = ("table_wise",)


def sharded_file(shards: int) -> str:
    """The file name of the INT8 model sharded over ``shards`` devices."""
    return f"predict_int8_shards{shards}.pt"


def batch_from_ids(dense: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The dict-signature batch of ``dense`` float32 (B, #dense) and one id per sparse feature ``ids`` (B, #sparse)."""
    ids = ids.to(torch.int64)
    return {
        "float_features": dense.to(torch.float32),
        "id_list_features.lengths": torch.ones(ids.numel(), dtype=torch.int64),
        "id_list_features.values": ids.t().reshape(-1).contiguous(),
    }


def batch_from_kjt(dense: torch.Tensor, sparse: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
    """The dict-signature batch of a (dense, KeyedJaggedTensor) pair in the manifest's feature order."""
    return {
        "float_features": dense,
        "id_list_features.lengths": sparse.lengths().to(torch.int64),
        "id_list_features.values": sparse.values().to(torch.int64),
    }


class MLETPredictModule(PredictModule):
    """A model's ``net`` (``(dense, KeyedJaggedTensor) -> logits (B, 1)``) behind TorchRec's dict signature."""

    def __init__(self, net: nn.Module, sparse_features: list[str]) -> None:
        super().__init__(net, "cpu")
        self.sparse_features: list[str] = list(sparse_features)

    def predict_forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sparse = KeyedJaggedTensor(
            keys=self.sparse_features,
            lengths=batch["id_list_features.lengths"],
            values=batch["id_list_features.values"],
        )
        logits = self.predict_module(batch["float_features"], sparse).reshape(-1).float()
        return {"default": torch.sigmoid(logits), "logits": logits}


class MLETPredictFactory(PredictFactory):
    """Builds the scripted dict-signature module of a collapsed model's ``net``.

    ``int8``: TorchRec's row-wise INT8 tables (``quantize_inference_model``); ``shards`` > 0: those tables
    placed table-wise on ``shards`` devices by ``shard_quant_model`` (CPU here; CUDA devices on a GPU host).
    """

    def __init__(
        self, net: nn.Module, sparse_features: list[str], num_dense: int, int8: bool = False, shards: int = 0
    ) -> None:
        if shards and not int8:
            raise ValueError("shard_quant_model shards INT8 models only")
        self.net, self.sparse_features, self.num_dense = net, list(sparse_features), num_dense
        self.int8, self.shards = int8, shards
        self.plan: str | None = None
        self.table_bytes = 0  # INT8 rows with their scale/bias, as FBGEMM's kernels hold them

    def sample_batch(self) -> dict[str, torch.Tensor]:
        """One row of zeros (id 0 exists in every table): what the sharded model's lazy input dist needs."""
        return batch_from_ids(torch.zeros(1, self.num_dense), torch.zeros(1, len(self.sparse_features)))

    def create_predict_module(self) -> nn.Module:
        from torchrec.distributed.global_settings import get_propogate_device, set_propogate_device
        from torchrec.inference.modules import (
            assign_weights_to_tbe,
            get_table_to_weights_from_tbe,
            quantize_inference_model,
            shard_quant_model,
        )

        module: nn.Module = MLETPredictModule(copy.deepcopy(self.net).eval(), self.sparse_features)
        if not self.int8:
            return module
        module = quantize_inference_model(module)
        weights = get_table_to_weights_from_tbe(module)
        self.table_bytes = sum(t.numel() * t.element_size() for ws in weights.values() for t in ws if t is not None)
        if not self.shards:
            return module
        was = get_propogate_device()
        set_propogate_device(True)  # place the shards on sharding_device ("cpu"), as TorchRec's DLRM example does
        try:
            sharded, plan = shard_quant_model(
                module, world_size=self.shards, compute_device="cpu", sharding_device="cpu"
            )
            assign_weights_to_tbe(sharded, weights)
            sharded(self.sample_batch())  # builds the input dist, which tracing cannot
        finally:
            set_propogate_device(was)
        self.plan = str(plan)
        return sharded

    def batching_metadata(self) -> dict[str, BatchingMetadata]:
        return {
            "float_features": BatchingMetadata(type="dense", device="cpu", pinned=[]),
            "id_list_features": BatchingMetadata(type="sparse", device="cpu", pinned=[]),
        }

    def result_metadata(self) -> str:
        return RESULT_METADATA

    def run_weights_independent_tranformations(self, predict_module: nn.Module) -> nn.Module:
        """``torchrec.fx`` tracing with FBGEMM's INT8 kernels as leaves (TorchRec's DLRM example)."""
        from torchrec.fx.tracer import Tracer

        tracer = Tracer(leaf_modules=["IntNBitTableBatchedEmbeddingBagsCodegen"])
        return torch.fx.GraphModule(predict_module, tracer.trace(predict_module))

    def run_weights_dependent_transformations(self, predict_module: nn.Module) -> nn.Module:
        scripted: nn.Module = torch.jit.script(predict_module)
        return scripted

    def build(self) -> torch.jit.ScriptModule:
        """create → weights-independent → weights-dependent transformations: the scripted module."""
        module = self.run_weights_dependent_transformations(
            self.run_weights_independent_tranformations(self.create_predict_module())
        )
        assert isinstance(module, torch.jit.ScriptModule)
        return module

    def extra_files(self) -> dict[str, str]:
        """The metadata TorchRec's packager stores next to the model, as ``torch.jit.save`` extra files."""
        return {BATCHING_METADATA_FILE: self.batching_metadata_json(), RESULT_METADATA_FILE: self.result_metadata()}

    def describe(self) -> dict[str, Any]:
        """The manifest's entry for this module (without its file name)."""
        out: dict[str, Any] = {
            "precision": "int8" if self.int8 else "fp32",
            "inputs": {
                "float_features": f"float32 (B, {self.num_dense})",
                "id_list_features.lengths": f"int64 ({len(self.sparse_features)} * B,), feature-major",
                "id_list_features.values": "int64 (sum of lengths,)",
            },
            "outputs": {"default": "probabilities float32 (B,)", "logits": "float32 (B,)"},
            "id_list_features_keys": self.sparse_features,
            "batching_metadata": {k: asdict(v) for k, v in self.batching_metadata().items()},
            "result_metadata": self.result_metadata(),
        }
        if self.int8:
            out["builder"] = "torchrec.inference.modules.quantize_inference_model"
            out["weights"] = "row-wise INT8 with per-row scale and bias (FBGEMM IntNBit TBE)"
            out["table_bytes"] = self.table_bytes
        if self.shards:
            out["sharding"] = {
                "builder": "torchrec.inference.modules.shard_quant_model",
                "shards": self.shards,
                "sharding_types": list(CPU_SHARDING_TYPES),
                "plan": self.plan,
            }
        return out


def save_predict_module(factory: MLETPredictFactory, path: Path) -> torch.jit.ScriptModule:
    """Build ``factory``'s module and save it with its metadata to ``path``; returns the scripted module."""
    scripted = factory.build()
    with open(path, "wb") as f:  # a file object: a full disk is an OSError, not a C++ abort of the process
        torch.jit.save(scripted, f, _extra_files=factory.extra_files())
    return scripted


def load_predict_module(path: Path | str) -> torch.jit.ScriptModule:
    """``torch.jit.load`` of a dict-signature module (importing torchrec registers FBGEMM's INT8 kernels)."""
    import torchrec  # noqa: F401

    loaded: torch.jit.ScriptModule = torch.jit.load(str(path), map_location="cpu")
    return loaded


def read_extra_files(path: Path | str) -> dict[str, Any]:
    """The batching and result metadata saved with a dict-signature module."""
    import torchrec  # noqa: F401

    files: dict[str, Any] = {BATCHING_METADATA_FILE: "", RESULT_METADATA_FILE: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return {
        "batching_metadata": json.loads(files[BATCHING_METADATA_FILE]),
        "result_metadata": bytes(files[RESULT_METADATA_FILE]).decode(),
    }


class DictLogits(nn.Module):
    """``(dense, KeyedJaggedTensor) -> logits (B,)`` around a dict-signature module, as ``score_split`` calls."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        logits: torch.Tensor = self.module(batch_from_kjt(dense, sparse))["logits"]
        return logits
