"""Every model's config class, one torch-free module each, and the union a ``model:`` section is validated as.

A model named X is ``configs/X.py`` here (its config class: keys, defaults, docs; no torch, so loading a config
and ``mlet --help`` stay light) and ``mlet_torchrec/models/X.py`` (its network, with
``build(embeddings, num_dense, config)``). Both are found by their name: no other file lists the models.
``name`` picks the class; a key of another model is an error that names the key and the model.

Example:
    >>> sorted(MODEL_CONFIGS)[:3]
    ['autoint', 'dcn', 'deepfm']
    >>> MODEL_CONFIGS["dcn"]().dnn_units(), MODEL_CONFIGS["dcn"].first_order
    ([128, 128], True)
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Discriminator, Tag

from mlet_torchrec.models.configs.base import ModelConfigBase

DEFAULT_MODEL = "dlrm"
"""The model of a config whose ``model:`` section names none."""


def _discover() -> dict[str, type[ModelConfigBase]]:
    """{name: config class} of every module of this package (but ``base``), each declaring one class."""
    found: dict[str, type[ModelConfigBase]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        classes = [
            c
            for c in vars(module).values()
            if isinstance(c, type) and issubclass(c, ModelConfigBase) and c.__module__ == module.__name__
        ]
        if len(classes) != 1 or classes[0].model_fields["name"].default != info.name:
            raise TypeError(f"{module.__name__} must declare one model config class whose name is {info.name!r}")
        found[info.name] = classes[0]
    return found


MODEL_CONFIGS: dict[str, type[ModelConfigBase]] = _discover()
"""{model name: its config class}, sorted by name."""


def _tag(value: Any) -> str | None:
    """The model a ``model:`` section is for: its ``name`` (``DEFAULT_MODEL`` when absent)."""
    if isinstance(value, ModelConfigBase):
        return value.name
    if isinstance(value, dict):
        name = value.get("name", DEFAULT_MODEL)
        return name if isinstance(name, str) else repr(name)
    return None


if TYPE_CHECKING:
    ModelConfig = ModelConfigBase
else:
    ModelConfig = Annotated[
        Union[tuple(Annotated[cls, Tag(name)] for name, cls in MODEL_CONFIGS.items())],  # noqa: UP007
        Discriminator(_tag),
    ]
"""A ``model:`` section: the config class its ``name`` picks (typed as the base for the type checker)."""


def default_model_config() -> ModelConfigBase:
    return MODEL_CONFIGS[DEFAULT_MODEL].model_validate({})
