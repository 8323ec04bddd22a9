"""AutoInt as DeepCTR-Torch builds it, on MLET embeddings.

``logit = linear(x) + w^T [flatten(att^L(e_1..e_F)); dnn([e_1..e_F; dense])]`` where each interacting
layer is multi-head self-attention over the fields (unscaled dot products, as DeepCTR-Torch), plus a
residual projection, then ReLU. TorchRec has no such block; attention runs through
``torch.nn.functional.scaled_dot_product_attention``. DeepCTR-Torch defaults: 3 layers, 2 heads,
residual on, DNN (256, 128).

Example:
    >>> import torch
    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    >>> ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10,
    ...                                                  feature_names=["a"])])
    >>> model = AutoInt(ebc, num_dense=2, dnn_hidden_units=[8])
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]))
    >>> model(torch.zeros(2, 2), kjt).shape
    torch.Size([2, 1])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import KeyedJaggedTensor

from mlet_torchrec.config import ConfigError
from mlet_torchrec.models.blocks import Embeddings, FieldModel, deep_arch
from mlet_torchrec.models.configs.autoint import AutoIntConfig


class InteractingLayer(nn.Module):
    """(B, F, d) -> (B, F, d): DeepCTR-Torch's ``InteractingLayer`` (weights drawn from N(0, 0.05^2) like it)."""

    def __init__(self, d: int, head_num: int = 2, use_res: bool = True) -> None:
        super().__init__()
        if d % head_num:
            raise ConfigError(f"model.att_head_num={head_num} must divide embedding.d={d}")
        self.head_num = head_num
        self.w_query = nn.Parameter(torch.empty(d, d))
        self.w_key = nn.Parameter(torch.empty(d, d))
        self.w_value = nn.Parameter(torch.empty(d, d))
        self.w_res = nn.Parameter(torch.empty(d, d)) if use_res else None
        for p in self.parameters():
            nn.init.normal_(p, mean=0.0, std=0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, d = x.shape

        def heads(w: torch.Tensor) -> torch.Tensor:  # (B, H, F, d / H)
            return (x @ w).view(b, f, self.head_num, d // self.head_num).transpose(1, 2)

        att = F.scaled_dot_product_attention(heads(self.w_query), heads(self.w_key), heads(self.w_value), scale=1.0)
        out = att.transpose(1, 2).reshape(b, f, d)
        if self.w_res is not None:
            out = out + x @ self.w_res
        return torch.relu(out)


class AutoInt(FieldModel):
    def __init__(
        self,
        embeddings: Embeddings,
        num_dense: int,
        att_layer_num: int = 3,
        att_head_num: int = 2,
        att_res: bool = True,
        dnn_hidden_units: Sequence[int] = (256, 128),
        dnn_dropout: float = 0.0,
    ) -> None:
        super().__init__(embeddings, num_dense)
        if att_layer_num <= 0 and not dnn_hidden_units:
            raise ConfigError("model autoint needs model.att_layer_num > 0 or a non-empty model.dnn_hidden_units")
        self.int_layers = nn.Sequential(
            *[InteractingLayer(self.d, att_head_num, att_res) for _ in range(att_layer_num)]
        )
        self.deep = deep_arch(self.dnn_in_features, dnn_hidden_units, dnn_dropout)
        out_width = (self.num_fields * self.d if att_layer_num > 0 else 0) + (
            dnn_hidden_units[-1] if dnn_hidden_units else 0
        )
        self.out = nn.Linear(out_width, 1, bias=False)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        fields, wide = self.embed(dense, sparse)
        parts: list[torch.Tensor] = []
        if len(self.int_layers):
            parts.append(self.int_layers(fields).flatten(1))
        if self.deep is not None:
            parts.append(self.deep([fields, dense]))
        head: torch.Tensor = self.out(torch.cat(parts, dim=1))
        return wide + head


def build(embeddings: Embeddings, num_dense: int, cfg: AutoIntConfig) -> AutoInt:
    return AutoInt(
        embeddings, num_dense, cfg.att_layer_num, cfg.att_head_num, cfg.att_res, cfg.dnn_units(), cfg.dnn_dropout
    )
