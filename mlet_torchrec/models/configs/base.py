"""The base classes of the model configs: the strict schema, and the keys a family of models shares.

Torch-free (the config layer imports it). A model's config subclasses one of these and adds its own keys;
class variables (not config keys) tell the registry what the model needs.

Example:
    >>> from typing import Literal
    >>> class Tiny(FieldModelConfig):
    ...     name: Literal["tiny"] = "tiny"
    >>> Tiny().first_order, Tiny().model_dump()
    (True, {'name': 'tiny'})
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


def _takes_bool(annotation: Any) -> bool:
    return annotation is bool or annotation is Any or any(_takes_bool(a) for a in get_args(annotation))


class Strict(BaseModel):
    """Every config section: unknown keys are errors, assignments are validated, and a boolean is no number
    (YAML reads ``true`` and ``yes`` as booleans, which pydantic would otherwise take as 1)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and not _takes_bool(field.annotation):
            raise ValueError("a boolean is not a value of this key")
        return value


def check_sizes(config: BaseModel, keys: Sequence[str]) -> None:
    """Raise ``ValueError`` when a layer-size list among ``keys`` holds a size <= 0."""
    for key in keys:
        sizes = getattr(config, key)
        if any(n <= 0 for n in sizes or []):
            raise ValueError(f"model.{key}: layer sizes must be positive, got {sizes}")


class ModelConfigBase(Strict):
    """A model's ``model:`` section. ``name`` picks the model (and so the class that validates the section)."""

    name: str
    first_order: ClassVar[bool] = False
    """Whether the model adds DeepCTR-Torch's first-order term: its ``lin_*`` tables ride in the MLET module."""


class MLPConfig(ModelConfigBase):
    """The keys of the DLRM family: the bottom (dense-feature) MLP and the top (over-arch) MLP."""

    bottom_mlp: list[int] = Field(default_factory=lambda: [512, 256, 128])
    """Hidden sizes of the dense-feature MLP; a final layer of size embedding.d is appended."""
    top_mlp: list[int] = Field(default_factory=lambda: [512, 256])
    """Hidden sizes of the over-arch MLP; a final layer of size 1 is appended."""

    @model_validator(mode="after")
    def _mlp_sizes(self) -> MLPConfig:
        check_sizes(self, ("bottom_mlp", "top_mlp"))
        return self


class FieldModelConfig(ModelConfigBase):
    """A DeepCTR-style model: field embeddings plus DeepCTR-Torch's first-order term. Defaults are
    DeepCTR-Torch's (the MLET paper's setup); its ``l2_reg_*`` penalties are not offered: use
    ``*_optimizer.weight_decay``."""

    first_order: ClassVar[bool] = True


class DeepCTRConfig(FieldModelConfig):
    """A DeepCTR-style model with a DNN over the flattened field embeddings and the dense features."""

    dnn_default: ClassVar[tuple[int, ...]] = ()
    """DeepCTR-Torch's default ``dnn_hidden_units`` for the model (what ``dnn_hidden_units: null`` means)."""

    dnn_hidden_units: list[int] | None = None
    """Hidden sizes of the DNN; null: DeepCTR-Torch's default for the model; [] drops the DNN."""
    dnn_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout after every DNN layer."""

    @model_validator(mode="after")
    def _dnn_sizes(self) -> DeepCTRConfig:
        check_sizes(self, ("dnn_hidden_units",))
        return self

    def dnn_units(self) -> list[int]:
        """``dnn_hidden_units``, or DeepCTR-Torch's default for this model when it is null."""
        return list(self.dnn_hidden_units if self.dnn_hidden_units is not None else self.dnn_default)
