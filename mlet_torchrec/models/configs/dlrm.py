"""``model.name: dlrm``: TorchRec's DLRM (mlet_torchrec/models/dlrm.py)."""

from __future__ import annotations

from typing import Literal

from mlet_torchrec.models.configs.base import MLPConfig


class DLRMConfig(MLPConfig):
    """DLRM: bottom MLP on the dense features, pairwise dot products with the embeddings, top MLP."""

    name: Literal["dlrm"] = "dlrm"
