"""xDeepFM as DeepCTR-Torch builds it, on MLET embeddings.

``logit = linear(x) + w^T dnn([e_1..e_F; dense]) + u^T CIN(e_1..e_F)``. The Compressed Interaction
Network (no TorchRec block exists) follows DeepCTR-Torch's ``CIN``: layer l takes the outer products of
its input maps with the fields per embedding coordinate, mixes them with a 1x1 convolution (a Linear
here), applies ReLU and, with ``split_half``, passes half of the maps on and half to the output, which
is summed over the embedding coordinates. DeepCTR-Torch defaults: CIN (256, 128), split_half, DNN (256, 256).

Example:
    >>> import torch
    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    >>> ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10,
    ...                                                  feature_names=["a"])])
    >>> model = XDeepFM(ebc, num_dense=2, dnn_hidden_units=[8], cin_layer_size=[4, 2])
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]))
    >>> model(torch.zeros(2, 2), kjt).shape
    torch.Size([2, 1])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from mlet_torchrec.models.blocks import Embeddings, FieldModel, deep_arch
from mlet_torchrec.models.configs.xdeepfm import XDeepFMConfig


class CIN(nn.Module):
    """(B, F, d) -> (B, sum of output maps)."""

    def __init__(self, num_fields: int, layer_size: Sequence[int] = (256, 128), split_half: bool = True) -> None:
        super().__init__()
        self.layer_size = list(layer_size)
        if split_half and any(n % 2 for n in self.layer_size[:-1]):
            raise ValueError(f"cin_layer_size={self.layer_size}: with split_half every layer but the last must be even")
        self.split_half = split_half
        maps = [num_fields]
        self.mix = nn.ModuleList()
        for i, size in enumerate(self.layer_size):
            self.mix.append(nn.Linear(maps[-1] * num_fields, size))
            maps.append(size // 2 if split_half and i < len(self.layer_size) - 1 else size)
        last = len(self.layer_size) - 1
        self.out_features = sum(s // 2 if split_half and i < last else s for i, s in enumerate(self.layer_size))

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        b, f, d = fields.shape
        x0 = fields.transpose(1, 2)  # (B, d, F): coordinates first, so the mixing is one matmul
        hidden, outputs = x0, []
        for i, mix in enumerate(self.mix):
            z = (hidden.unsqueeze(3) * x0.unsqueeze(2)).reshape(b, d, -1)  # (B, d, H * F), DeepCTR's channel order
            maps = torch.relu(mix(z))  # (B, d, size)
            if self.split_half and i < len(self.mix) - 1:
                hidden, direct = torch.split(maps, self.layer_size[i] // 2, dim=2)
            else:
                hidden, direct = maps, maps
            outputs.append(direct)
        return torch.cat(outputs, dim=2).sum(dim=1)


class XDeepFM(FieldModel):
    def __init__(
        self,
        embeddings: Embeddings,
        num_dense: int,
        dnn_hidden_units: Sequence[int] = (256, 256),
        cin_layer_size: Sequence[int] = (256, 128),
        cin_split_half: bool = True,
        dnn_dropout: float = 0.0,
    ) -> None:
        super().__init__(embeddings, num_dense)
        self.deep = deep_arch(self.dnn_in_features, dnn_hidden_units, dnn_dropout)
        self.deep_out = nn.Linear(dnn_hidden_units[-1], 1, bias=False) if self.deep is not None else None
        self.cin = CIN(self.num_fields, cin_layer_size, cin_split_half) if cin_layer_size else None
        self.cin_out = nn.Linear(self.cin.out_features, 1, bias=False) if self.cin is not None else None

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        fields, logit = self.embed(dense, sparse)
        if self.deep is not None and self.deep_out is not None:  # set together
            logit = logit + self.deep_out(self.deep([fields, dense]))
        if self.cin is not None and self.cin_out is not None:  # set together
            logit = logit + self.cin_out(self.cin(fields))
        return logit


def build(embeddings: Embeddings, num_dense: int, cfg: XDeepFMConfig) -> XDeepFM:
    return XDeepFM(embeddings, num_dense, cfg.dnn_units(), cfg.cin_layer_size, cfg.cin_split_half, cfg.dnn_dropout)
