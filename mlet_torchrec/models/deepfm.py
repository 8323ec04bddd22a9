"""DeepFM as DeepCTR-Torch builds it, on MLET embeddings.

``logit = linear(x) + FM(e_1..e_F) + w^T dnn([e_1..e_F; dense])``: the FM term is the field-wise
``sum_{f<g} <e_f, e_g>`` (TorchRec's ``FactorizationMachine`` per embedding coordinate, see
:class:`~mlet_torchrec.models.blocks.BiInteraction`), the deep part TorchRec's ``DeepFM`` block.
DeepCTR-Torch default DNN: (256, 128).

Example:
    >>> import torch
    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    >>> ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10,
    ...                                                  feature_names=["a"])])
    >>> model = DeepFMModel(ebc, num_dense=2, dnn_hidden_units=[8])
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]))
    >>> model(torch.zeros(2, 2), kjt).shape
    torch.Size([2, 1])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from mlet_torchrec.models.blocks import BiInteraction, Embeddings, FieldModel, deep_arch
from mlet_torchrec.models.configs.deepfm import DeepFMConfig


class DeepFMModel(FieldModel):
    def __init__(
        self,
        embeddings: Embeddings,
        num_dense: int,
        dnn_hidden_units: Sequence[int] = (256, 128),
        dnn_dropout: float = 0.0,
    ) -> None:
        super().__init__(embeddings, num_dense)
        self.fm = BiInteraction()
        self.deep = deep_arch(self.dnn_in_features, dnn_hidden_units, dnn_dropout)
        self.out = nn.Linear(dnn_hidden_units[-1], 1, bias=False) if self.deep is not None else None

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        fields, wide = self.embed(dense, sparse)
        fm: torch.Tensor = self.fm(fields)
        logit = wide + fm.sum(dim=1, keepdim=True)
        if self.deep is not None and self.out is not None:  # set together
            logit = logit + self.out(self.deep([fields, dense]))
        return logit


def build(embeddings: Embeddings, num_dense: int, cfg: DeepFMConfig) -> DeepFMModel:
    return DeepFMModel(embeddings, num_dense, cfg.dnn_units(), cfg.dnn_dropout)
