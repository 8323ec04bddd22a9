"""NFM (Neural Factorization Machine) as DeepCTR-Torch builds it, on MLET embeddings.

``logit = linear(x) + w^T dnn([BiInteraction(e_1..e_F); dense])`` with the bi-interaction pooling
``sum_{f<g} e_f * e_g`` (a d-vector). DeepCTR-Torch defaults: DNN (128, 128), bi_dropout 0.

Example:
    >>> import torch
    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    >>> ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10,
    ...                                                  feature_names=["a"])])
    >>> model = NFM(ebc, num_dense=2, dnn_hidden_units=[8])
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]))
    >>> model(torch.zeros(2, 2), kjt).shape
    torch.Size([2, 1])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.modules.deepfm import DeepFM

from mlet_torchrec.config import ConfigError
from mlet_torchrec.models.blocks import BiInteraction, Embeddings, FieldModel, dnn
from mlet_torchrec.models.configs.nfm import NFMConfig


class NFM(FieldModel):
    def __init__(
        self,
        embeddings: Embeddings,
        num_dense: int,
        dnn_hidden_units: Sequence[int] = (128, 128),
        dnn_dropout: float = 0.0,
        bi_dropout: float = 0.0,
    ) -> None:
        super().__init__(embeddings, num_dense)
        if not dnn_hidden_units:
            raise ConfigError("model nfm needs a non-empty model.dnn_hidden_units")
        self.bi_pooling = BiInteraction()
        self.bi_dropout = nn.Dropout(bi_dropout) if bi_dropout > 0 else nn.Identity()
        self.deep = DeepFM(dense_module=dnn(self.d + num_dense, dnn_hidden_units, dnn_dropout))  # never empty here
        self.out = nn.Linear(dnn_hidden_units[-1], 1, bias=False)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        fields, wide = self.embed(dense, sparse)
        pooled = self.bi_dropout(self.bi_pooling(fields))
        deep: torch.Tensor = self.out(self.deep([pooled, dense]))
        return wide + deep


def build(embeddings: Embeddings, num_dense: int, cfg: NFMConfig) -> NFM:
    return NFM(embeddings, num_dense, cfg.dnn_units(), cfg.dnn_dropout, cfg.bi_dropout)
