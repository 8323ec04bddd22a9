"""``model.name: wdl``: DeepCTR-Torch's Wide & Deep (mlet_torchrec/models/wdl.py)."""

from __future__ import annotations

from typing import ClassVar, Literal

from mlet_torchrec.models.configs.base import DeepCTRConfig


class WDLConfig(DeepCTRConfig):
    """Wide & Deep: the first-order (wide) term + DNN."""

    name: Literal["wdl"] = "wdl"
    dnn_default: ClassVar[tuple[int, ...]] = (256, 128)
