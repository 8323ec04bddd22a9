"""Pieces the DeepCTR-style models share: field embeddings, the first-order ("wide") term, the DNN, FM pooling.

Every model takes the embedding module it is given (an ``MLETEmbeddingBagCollection`` while training, a
stock d-dim ``EmbeddingBagCollection`` after collapse) and reads it only through TorchRec's
``SparseArch``: ``(B, F, d)`` field embeddings. The single-layer baseline (k=None) is the same module.

The first-order term of DeepCTR-Torch (``Linear``: a 1-dim embedding per id plus a weight per dense
feature) is a second, plain ``EmbeddingBagCollection`` whose tables are named ``lin_<feature>``: the
planner shards it and the fused optimizer trains it like W1; collapse copies it unchanged.
TorchRec's fused (FBGEMM) kernels need table widths divisible by 4, on CPU as well, so these tables are
``LINEAR_TABLE_DIM`` = 4 wide and column 0 is the weight: the other columns get no gradient and never
reach the logit (with row-wise Adagrad the row's step is therefore 2x that of a true 1-dim table).

Example:
    >>> import torch
    >>> from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
    >>> tables = [EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"])]
    >>> wide = LinearArch(tables, num_dense=2)
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2]), torch.tensor([1, 1]))
    >>> wide(torch.zeros(2, 2), kjt).shape
    torch.Size([2, 1])
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import SparseArch
from torchrec.modules.deepfm import DeepFM, FactorizationMachine
from torchrec.modules.mlp import Perceptron

from mlet_torchrec.config import ConfigError
from mlet_torchrec.modules.mlet_ebc import MLETEmbeddingBagCollection

LINEAR_TABLE_DIM = 4
LINEAR_PREFIX = "lin_"


def embedding_dim(embeddings: nn.Module) -> int:
    """The common d of the module's tables (every model here needs one d for all fields)."""
    dims = {t.embedding_dim for t in embeddings.embedding_bag_configs()}
    if len(dims) != 1:
        raise ConfigError(f"all embedding tables must share one d, got {sorted(dims)}")
    return dims.pop()


def num_fields(embeddings: nn.Module) -> int:
    return sum(len(t.feature_names) for t in embeddings.embedding_bag_configs())


def table_device(embeddings: nn.Module) -> torch.device:
    """Where the module's tables live (``meta`` when the sharder will materialise them)."""
    ebc = embeddings.w1 if isinstance(embeddings, MLETEmbeddingBagCollection) else embeddings
    return ebc.device


def linear_tables(tables: Sequence[EmbeddingBagConfig]) -> List[EmbeddingBagConfig]:
    """One ``lin_<feature>`` table per table of the model (same rows, features, pooling; width 4)."""
    out = []
    for t in tables:
        suffix = t.feature_names[0] if len(t.feature_names) == 1 else t.name
        out.append(dataclasses.replace(t, name=LINEAR_PREFIX + suffix, embedding_dim=LINEAR_TABLE_DIM))
    clash = {t.name for t in out} & {t.name for t in tables}
    if clash:
        raise ValueError(f"first-order table names {sorted(clash)} clash with the embedding tables")
    return out


class LinearArch(nn.Module):
    """DeepCTR-Torch's linear part plus its output bias: ``b + sum_f w_f[x_f] + dense @ v`` -> (B, 1)."""

    def __init__(
        self, tables: Sequence[EmbeddingBagConfig], num_dense: int, device: Optional[torch.device] = None
    ) -> None:
        super().__init__()
        self.embedding_bag_collection = EmbeddingBagCollection(tables=linear_tables(tables), device=device)
        self.dense = nn.Linear(num_dense, 1, bias=False) if num_dense > 0 else None
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.embedding_bag_collection(sparse).values()  # (B, F * 4), any key order: it is summed
        logit = pooled[:, ::LINEAR_TABLE_DIM].sum(dim=1, keepdim=True) + self.bias
        if self.dense is not None:
            logit = logit + self.dense(dense)
        return logit


def dnn(in_features: int, hidden: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """DeepCTR's DNN: Linear -> ReLU (-> Dropout) per hidden size, from TorchRec ``Perceptron`` blocks."""
    layers: List[nn.Module] = []
    for i, width in enumerate(hidden):
        layers.append(Perceptron(hidden[i - 1] if i else in_features, width, bias=True, activation=torch.relu))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class BiInteraction(nn.Module):
    """NFM's bi-interaction pooling ``sum_{f<g} e_f * e_g`` (B, F, D) -> (B, D); summed over D it is the FM term.

    TorchRec's ``FactorizationMachine`` takes the pairwise products of *all* scalars of its input, so it
    is applied to each embedding coordinate separately (rows ``(b, d)`` of F values): that is the
    field-wise FM of DeepFM / DeepCTR-Torch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fm = FactorizationMachine()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        b, f, d = embeddings.shape
        per_coordinate = embeddings.transpose(1, 2).reshape(b * d, f)
        return self.fm([per_coordinate]).view(b, d)


def deep_arch(in_features: int, hidden: Sequence[int], dropout: float = 0.0) -> Optional[DeepFM]:
    """TorchRec's ``DeepFM`` block (flatten + concat a list of tensors) around :func:`dnn`; None if no layers."""
    return DeepFM(dense_module=dnn(in_features, hidden, dropout)) if hidden else None


class FieldModel(nn.Module):
    """Base of the DeepCTR-style models: ``sparse_arch`` gives (B, F, d) field embeddings, ``linear_arch`` the
    first-order logit with the bias. Subclasses add their interaction and return logits (B, 1)."""

    def __init__(self, embeddings: nn.Module, num_dense: int) -> None:
        super().__init__()
        self.d = embedding_dim(embeddings)
        self.num_fields = num_fields(embeddings)
        self.num_dense = num_dense
        self.sparse_arch = SparseArch(embeddings)  # type: ignore[arg-type]  # MLET has the EBC interface
        self.linear_arch = LinearArch(embeddings.embedding_bag_configs(), num_dense, table_device(embeddings))

    @property
    def dnn_in_features(self) -> int:
        """Width of DeepCTR's DNN input: the flattened field embeddings and the dense features."""
        return self.num_fields * self.d + self.num_dense
