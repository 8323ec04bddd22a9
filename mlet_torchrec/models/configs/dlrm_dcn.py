"""``model.name: dlrm_dcn``: DLRM with a DCN-v2 interaction (mlet_torchrec/models/dlrm_dcn.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mlet_torchrec.models.configs.base import MLPConfig


class DLRMDCNConfig(MLPConfig):
    """DLRM whose interaction is a stack of low-rank cross layers (TorchRec's ``DLRM_DCN``)."""

    name: Literal["dlrm_dcn"] = "dlrm_dcn"
    dcn_num_layers: int = Field(3, gt=0)
    """Low-rank cross layers of the DCN-v2 interaction (TorchRec's DLRM-DCN reference: 3)."""
    dcn_low_rank_dim: int = Field(512, gt=0)
    """Rank r of each cross layer's W = U V (TorchRec's DLRM-DCN reference: 512)."""
