"""``model.name: xdeepfm``: DeepCTR-Torch's xDeepFM (mlet_torchrec/models/xdeepfm.py)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from mlet_torchrec.models.configs.base import DeepCTRConfig, check_sizes


class XDeepFMConfig(DeepCTRConfig):
    """xDeepFM: first-order term + DNN + Compressed Interaction Network (CIN)."""

    name: Literal["xdeepfm"] = "xdeepfm"
    dnn_default: ClassVar[tuple[int, ...]] = (256, 256)
    cin_layer_size: list[int] = Field(default_factory=lambda: [256, 128])
    """Feature maps per CIN layer ([] drops the CIN)."""
    cin_split_half: bool = True
    """Half of every CIN layer but the last feeds the next layer, the other half the output."""

    @model_validator(mode="after")
    def _cin_sizes(self) -> XDeepFMConfig:
        check_sizes(self, ("cin_layer_size",))
        if self.cin_split_half and any(n % 2 for n in self.cin_layer_size[:-1]):
            raise ValueError(
                f"model.cin_layer_size={self.cin_layer_size}: with cin_split_half every layer but the last must be even"
            )
        return self
