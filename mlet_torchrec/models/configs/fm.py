"""``model.name: fm``: the Factorization Machine (mlet_torchrec/models/fm.py)."""

from __future__ import annotations

from typing import Literal

from mlet_torchrec.models.configs.base import FieldModelConfig


class FMConfig(FieldModelConfig):
    """FM: first-order term + field-wise second-order term, no DNN; its only shape is ``embedding.d``."""

    name: Literal["fm"] = "fm"
