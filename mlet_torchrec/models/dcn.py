"""DCN (Deep & Cross Network) as DeepCTR-Torch builds it, on MLET embeddings.

``logit = linear(x) + w^T [cross(x0); dnn(x0)]`` with ``x0 = [flattened field embeddings; dense features]``.
The cross network is TorchRec's: ``VectorCrossNet`` (DCN, DeepCTR's ``cross_parameterization='vector'``)
or ``CrossNet`` (DCN-M, ``'matrix'``). DeepCTR-Torch defaults: cross_num 2, DNN (128, 128).

Example:
    >>> import torch
    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    >>> ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10,
    ...                                                  feature_names=["a"])])
    >>> model = DCN(ebc, num_dense=2, dnn_hidden_units=[8])
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]))
    >>> model(torch.zeros(2, 2), kjt).shape
    torch.Size([2, 1])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.modules.crossnet import CrossNet, VectorCrossNet

from mlet_torchrec.config import ConfigError
from mlet_torchrec.models.blocks import Embeddings, FieldModel, dnn
from mlet_torchrec.models.configs.dcn import DCNConfig


class DCN(FieldModel):
    def __init__(
        self,
        embeddings: Embeddings,
        num_dense: int,
        cross_num: int = 2,
        cross_parameterization: str = "vector",
        dnn_hidden_units: Sequence[int] = (128, 128),
        dnn_dropout: float = 0.0,
    ) -> None:
        super().__init__(embeddings, num_dense)
        width = self.dnn_in_features
        cross_cls = VectorCrossNet if cross_parameterization == "vector" else CrossNet
        self.cross = cross_cls(in_features=width, num_layers=cross_num) if cross_num > 0 else None
        self.deep = dnn(width, dnn_hidden_units, dnn_dropout) if dnn_hidden_units else None
        out_width = (width if self.cross is not None else 0) + (dnn_hidden_units[-1] if dnn_hidden_units else 0)
        if out_width == 0:
            raise ConfigError("model dcn needs model.cross_num > 0 or a non-empty model.dnn_hidden_units")
        self.out = nn.Linear(out_width, 1, bias=False)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        fields, wide = self.embed(dense, sparse)
        x0 = torch.cat([fields.flatten(1), dense], dim=1)
        parts: list[torch.Tensor] = []
        if self.cross is not None:
            parts.append(self.cross(x0))
        if self.deep is not None:
            parts.append(self.deep(x0))
        head: torch.Tensor = self.out(torch.cat(parts, dim=1))
        return wide + head


def build(embeddings: Embeddings, num_dense: int, cfg: DCNConfig) -> DCN:
    return DCN(embeddings, num_dense, cfg.cross_num, cfg.cross_parameterization, cfg.dnn_units(), cfg.dnn_dropout)
