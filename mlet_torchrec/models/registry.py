"""Model registry: config name -> builder, and the wrapper that gives every model one signature."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor

from data_pipes.schema import DatasetMeta, table_name
from mlet_torchrec.config import EmbeddingConfig, ModelConfig
from mlet_torchrec.models import autoint, dcn, deepfm, dlrm_dcn, nfm, wdl, xdeepfm
from mlet_torchrec.models.blocks import Embeddings, linear_tables
from mlet_torchrec.models.dlrm import build_dlrm
from mlet_torchrec.modules.mlet_ebc import MLETEmbeddingBagCollection

# (embeddings: an MLETEmbeddingBagCollection or a stock EmbeddingBagCollection, #dense, config) -> model
ModelBuilder = Callable[[Embeddings, int, ModelConfig], nn.Module]

MODELS: dict[str, ModelBuilder] = {
    "dlrm": lambda emb, num_dense, cfg: build_dlrm(emb, num_dense, cfg.bottom_mlp, cfg.top_mlp),
    "dlrm_dcn": dlrm_dcn.build,
    # the DeepCTR-Torch models of the MLET paper; each adds a first-order term on `lin_*` tables
    "dcn": dcn.build,
    "deepfm": deepfm.build,
    "wdl": wdl.build,
    "nfm": nfm.build,
    "autoint": autoint.build,
    "xdeepfm": xdeepfm.build,
}
# models with DeepCTR-Torch's first-order term: their `lin_*` tables ride along in the MLET module's W1
FIRST_ORDER_MODELS = frozenset({"dcn", "deepfm", "wdl", "nfm", "autoint", "xdeepfm"})


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
        extra = linear_tables(tables) if model_cfg.name in FIRST_ORDER_MODELS else []
        embeddings = MLETEmbeddingBagCollection(
            tables,
            inner_dim=inner,
            sigma=emb_cfg.sigma,
            allow_k_below_d=emb_cfg.allow_k_below_d,
            device=device,
            extra_tables=extra,
            w1_dtype=emb_cfg.w1_dtype,
        )
    if model_cfg.name not in MODELS:
        raise ValueError(f"model.name={model_cfg.name!r} is unknown; known models: {sorted(MODELS)}")
    return CTRModel(MODELS[model_cfg.name](embeddings, len(meta.dense), model_cfg), embeddings)
