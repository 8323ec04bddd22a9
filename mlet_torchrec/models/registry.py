"""Model registry: a config's name -> its network's ``build``, and the wrapper that gives every model one signature.

The model named X is built by ``mlet_torchrec.models.X.build(embeddings, num_dense, config)``, its config class
being ``mlet_torchrec.models.configs.MODEL_CONFIGS[X]``: nothing else lists the models.

Example:
    >>> builder("deepfm").__module__
    'mlet_torchrec.models.deepfm'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from data_pipes.schema import DatasetMeta, table_name
from mlet_torchrec.config import EmbeddingConfig
from mlet_torchrec.models.blocks import Embeddings, linear_tables
from mlet_torchrec.models.configs import MODEL_CONFIGS, ModelConfig
from mlet_torchrec.modules.mlet_ebc import MLETEmbeddingBagCollection

# (embeddings: an MLETEmbeddingBagCollection or a stock EmbeddingBagCollection, #dense, the model's config) -> model
ModelBuilder = Callable[[Embeddings, int, Any], nn.Module]


def builder(name: str) -> ModelBuilder:
    """The ``build`` function of the model called ``name`` (its module ``mlet_torchrec.models.<name>``)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"model.name={name!r} is unknown; known models: {sorted(MODEL_CONFIGS)}")
    build: ModelBuilder = importlib.import_module(f"mlet_torchrec.models.{name}").build
    return build


class CTRModel(nn.Module):
    """``(dense, sparse) -> logits (B,)`` around any registered model; the embeddings stay reachable."""

    _embeddings: nn.Module

    def __init__(self, net: nn.Module, embeddings: nn.Module) -> None:
        super().__init__()
        self.net = net
        # not a second registration: the net owns the module, this is a typed shortcut
        object.__setattr__(self, "_embeddings", embeddings)

    @property
    def embeddings(self) -> nn.Module:
        return self._embeddings

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(dense, sparse)
        return logits.squeeze(-1)


def table_configs(meta: DatasetMeta, d: int, pooling: str = "sum") -> list[EmbeddingBagConfig]:
    """One d-dim table per sparse feature of the data set, sized from its cardinality."""
    from torchrec.modules.embedding_configs import PoolingType

    pool = PoolingType.SUM if pooling == "sum" else PoolingType.MEAN
    return [
        EmbeddingBagConfig(
            name=table_name(f.name),
            embedding_dim=d,
            num_embeddings=f.cardinality,
            feature_names=[f.name],
            pooling=pool,
        )
        for f in meta.sparse
    ]


def build_model(
    model_cfg: ModelConfig,
    emb_cfg: EmbeddingConfig,
    meta: DatasetMeta,
    device: torch.device | None = None,
    collapsed: bool = False,
) -> CTRModel:
    """Build the configured model; ``collapsed=True`` gives its serving twin on a stock d-dim EBC.

    Dense parts and W2 are drawn from the global torch RNG: seed it identically on every rank.
    ``device="meta"`` builds W1 for the sharder to materialise.
    """
    tables = table_configs(meta, emb_cfg.d, emb_cfg.pooling)
    embeddings: Embeddings
    if collapsed:
        embeddings = EmbeddingBagCollection(tables=tables, device=device)
    else:
        inner = {table_name(f.name): emb_cfg.k_for(f.name) for f in meta.sparse}
        extra = linear_tables(tables) if model_cfg.first_order else []
        embeddings = MLETEmbeddingBagCollection(
            tables,
            inner_dim=inner,
            sigma=emb_cfg.sigma,
            allow_k_below_d=emb_cfg.allow_k_below_d,
            device=device,
            extra_tables=extra,
            w1_dtype=emb_cfg.w1_dtype,
        )
    return CTRModel(builder(model_cfg.name)(embeddings, len(meta.dense), model_cfg), embeddings)
