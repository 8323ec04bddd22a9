"""``model.name: nfm``: DeepCTR-Torch's Neural Factorization Machine (mlet_torchrec/models/nfm.py)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from mlet_torchrec.models.configs.base import DeepCTRConfig


class NFMConfig(DeepCTRConfig):
    """NFM: first-order term + DNN over the bi-interaction pooling; its DNN is its only non-linear part,
    so ``dnn_hidden_units: []`` is refused when the model is built."""

    name: Literal["nfm"] = "nfm"
    dnn_default: ClassVar[tuple[int, ...]] = (128, 128)
    bi_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the bi-interaction pooling output."""
