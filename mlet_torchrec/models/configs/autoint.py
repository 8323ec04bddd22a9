"""``model.name: autoint``: DeepCTR-Torch's AutoInt (mlet_torchrec/models/autoint.py)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from mlet_torchrec.models.configs.base import DeepCTRConfig


class AutoIntConfig(DeepCTRConfig):
    """AutoInt: first-order term + interacting (multi-head self-attention) layers + DNN."""

    name: Literal["autoint"] = "autoint"
    dnn_default: ClassVar[tuple[int, ...]] = (256, 128)
    att_layer_num: int = Field(3, ge=0)
    """Interacting (multi-head self-attention) layers."""
    att_head_num: int = Field(2, gt=0)
    """Attention heads; must divide embedding.d."""
    att_res: bool = True
    """Residual connection in every interacting layer."""
