"""``model.name: deepfm``: DeepCTR-Torch's DeepFM (mlet_torchrec/models/deepfm.py)."""

from __future__ import annotations

from typing import ClassVar, Literal

from mlet_torchrec.models.configs.base import DeepCTRConfig


class DeepFMConfig(DeepCTRConfig):
    """DeepFM: first-order term + field-wise FM + DNN."""

    name: Literal["deepfm"] = "deepfm"
    dnn_default: ClassVar[tuple[int, ...]] = (256, 128)
