"""FM (Factorization Machine, Rendle 2010) on MLET embeddings: the CTR baseline without a DNN.

``logit = linear(x) + sum_{f<g} <e_f, e_g>``: DeepCTR-Torch's first-order term (the ``lin_*`` tables, a
weight per dense feature and the bias, :class:`~mlet_torchrec.models.blocks.LinearArch`) plus the field-wise
FM of TorchRec's ``FactorizationMachine`` per embedding coordinate
(:class:`~mlet_torchrec.models.blocks.BiInteraction`). It is DeepFM without its DNN: with MLET the field
embeddings' W = W1 W2 are all it learns besides the first-order weights.

Example:
    >>> import torch
    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    >>> ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10,
    ...                                                  feature_names=["a"])])
    >>> model = FM(ebc, num_dense=2)
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]))
    >>> model(torch.zeros(2, 2), kjt).shape
    torch.Size([2, 1])
"""

from __future__ import annotations

import torch
from torchrec import KeyedJaggedTensor

from mlet_torchrec.models.blocks import BiInteraction, Embeddings, FieldModel
from mlet_torchrec.models.configs.fm import FMConfig


class FM(FieldModel):
    def __init__(self, embeddings: Embeddings, num_dense: int) -> None:
        super().__init__(embeddings, num_dense)
        self.fm = BiInteraction()

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        fields, wide = self.embed(dense, sparse)
        pairwise: torch.Tensor = self.fm(fields)
        return wide + pairwise.sum(dim=1, keepdim=True)


def build(embeddings: Embeddings, num_dense: int, cfg: FMConfig) -> FM:
    return FM(embeddings, num_dense)
