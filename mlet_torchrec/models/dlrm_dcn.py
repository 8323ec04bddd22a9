"""DLRM with a DCN-v2 interaction (TorchRec's ``DLRM_DCN``) on MLET embeddings.

The pairwise dot-product interaction of DLRM is replaced by a stack of low-rank cross layers
(``LowRankCrossNet``) over ``[bottom_mlp(dense); e_1..e_F]``; the top MLP reads its (F + 1) * d output.
Defaults follow TorchRec's DLRM-DCN reference: 3 cross layers of rank 512.

Example:
    >>> import torch
    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    >>> ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10,
    ...                                                  feature_names=["a"])])
    >>> model = build_dlrm_dcn(ebc, 2, bottom_mlp=[8], top_mlp=[8], num_layers=2, low_rank_dim=4)
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]))
    >>> model(torch.zeros(2, 2), kjt).shape
    torch.Size([2, 1])
"""

from __future__ import annotations

from torchrec.models.dlrm import DLRM_DCN

from mlet_torchrec.models.blocks import Embeddings, embedding_dim, no_dense_quietly
from mlet_torchrec.models.configs.dlrm_dcn import DLRMDCNConfig


def build_dlrm_dcn(
    embeddings: Embeddings,
    num_dense: int,
    bottom_mlp: list[int],
    top_mlp: list[int],
    num_layers: int,
    low_rank_dim: int,
) -> DLRM_DCN:
    with no_dense_quietly():
        return DLRM_DCN(
            embedding_bag_collection=embeddings,  # same interface as an EBC
            dense_in_features=num_dense,
            dense_arch_layer_sizes=[*bottom_mlp, embedding_dim(embeddings)],
            over_arch_layer_sizes=[*top_mlp, 1],
            dcn_num_layers=num_layers,
            dcn_low_rank_dim=low_rank_dim,
        )


def build(embeddings: Embeddings, num_dense: int, cfg: DLRMDCNConfig) -> DLRM_DCN:
    return build_dlrm_dcn(embeddings, num_dense, cfg.bottom_mlp, cfg.top_mlp, cfg.dcn_num_layers, cfg.dcn_low_rank_dim)
