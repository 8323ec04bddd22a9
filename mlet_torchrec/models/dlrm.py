"""DLRM on MLET embeddings, with the MLET papers' shapes.

Criteo: bottom MLP 512-256-128-d, top MLP 512-256-1; Avazu-like data: bottom 256-128-d.
The model is TorchRec's own ``DLRM``; MLET only changes the embedding module it is given.
"""

from __future__ import annotations

from torch import nn
from torchrec.models.dlrm import DLRM

from mlet_torchrec.models.blocks import Embeddings, no_dense_quietly
from mlet_torchrec.models.configs.dlrm import DLRMConfig

CRITEO_BOTTOM_MLP: list[int] = [512, 256, 128]
AVAZU_BOTTOM_MLP: list[int] = [256, 128]
TOP_MLP: list[int] = [512, 256]


def build_dlrm(
    embeddings: Embeddings,
    num_dense: int,
    bottom_mlp: list[int],
    top_mlp: list[int],
) -> nn.Module:
    """TorchRec DLRM whose bottom MLP ends in the embedding dimension d and top MLP in one logit."""
    d = embeddings.embedding_bag_configs()[0].embedding_dim
    with no_dense_quietly():
        model: nn.Module = DLRM(
            embedding_bag_collection=embeddings,  # same interface as an EBC
            dense_in_features=num_dense,
            dense_arch_layer_sizes=[*bottom_mlp, d],
            over_arch_layer_sizes=[*top_mlp, 1],
        )
    return model


def build(embeddings: Embeddings, num_dense: int, cfg: DLRMConfig) -> nn.Module:
    return build_dlrm(embeddings, num_dense, cfg.bottom_mlp, cfg.top_mlp)
