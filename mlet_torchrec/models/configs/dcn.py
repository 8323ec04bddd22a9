"""``model.name: dcn``: DeepCTR-Torch's Deep & Cross Network (mlet_torchrec/models/dcn.py)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from mlet_torchrec.models.configs.base import DeepCTRConfig


class DCNConfig(DeepCTRConfig):
    """DCN: a cross network and the DNN side by side over the field embeddings and dense features."""

    name: Literal["dcn"] = "dcn"
    dnn_default: ClassVar[tuple[int, ...]] = (128, 128)
    cross_num: int = Field(2, ge=0)
    """Cross layers."""
    cross_parameterization: Literal["vector", "matrix"] = "vector"
    """'vector': DCN (w_l is a vector); 'matrix': DCN-M / DCN-v2 (full N x N W_l)."""
