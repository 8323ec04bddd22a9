"""Pieces the DeepCTR-style models share: field embeddings, the first-order ("wide") term, the DNN, FM pooling.

Every model takes the embedding module it is given (an ``MLETEmbeddingBagCollection`` while training, a
stock d-dim ``EmbeddingBagCollection`` after collapse) and reads it only through TorchRec's
``SparseArch``: ``(B, F, d)`` field embeddings. The single-layer baseline (k=None) is the same module.

The first-order term of DeepCTR-Torch (``Linear``: a 1-dim embedding per id plus a weight per dense
feature) lives in tables named ``lin_<feature>``. While training they ride along in the MLET module's W1
(``extra_tables``: one lookup and one sharded module for both, which saves a second input/output
distribution per step); the collapsed model keeps them in a plain ``EmbeddingBagCollection`` of
:class:`LinearArch`, and collapse copies them there unchanged.
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

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from typing import TypeAlias

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import SparseArch
from torchrec.modules.deepfm import DeepFM, FactorizationMachine
from torchrec.modules.mlp import Perceptron

from mlet_torchrec.config import ConfigError
from mlet_torchrec.modules.mlet_ebc import MLETEmbeddingBagCollection

Embeddings: TypeAlias = MLETEmbeddingBagCollection | EmbeddingBagCollection
"""What every model is built on: the MLET module while training, a stock d-dim EBC after collapse."""

LINEAR_TABLE_DIM = 4
LINEAR_PREFIX = "lin_"


def embedding_dim(embeddings: Embeddings) -> int:
    """The common d of the module's tables (every model here needs one d for all fields)."""
    dims: set[int] = {t.embedding_dim for t in embeddings.embedding_bag_configs()}
    if len(dims) != 1:
        raise ConfigError(f"all embedding tables must share one d, got {sorted(dims)}")
    return dims.pop()


def num_fields(embeddings: Embeddings) -> int:
    return sum(len(t.feature_names) for t in embeddings.embedding_bag_configs())


def table_device(embeddings: Embeddings) -> torch.device:
    """Where the module's tables live (``meta`` when the sharder will materialise them)."""
    ebc = embeddings.w1 if isinstance(embeddings, MLETEmbeddingBagCollection) else embeddings
    device: torch.device = ebc.device
    return device


@contextlib.contextmanager
def no_dense_quietly() -> Iterator[None]:
    """Build TorchRec's DLRM bottom MLP for a data set without dense features (MovieLens) without torch's warning
    that initialising its first layer's empty weight does nothing: that layer's output is its bias, a learned
    constant vector."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op", UserWarning)
        yield


def linear_tables(tables: Sequence[EmbeddingBagConfig]) -> list[EmbeddingBagConfig]:
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
    """DeepCTR-Torch's linear part plus its output bias: ``b + sum_f w_f[x_f] + dense @ v`` -> (B, 1).

    ``tables``: the model's tables, for which it keeps its own ``lin_*`` tables; None when the pooled
    first-order rows come from elsewhere (the MLET module's extra tables) and are passed to ``forward``.
    """

    def __init__(
        self, tables: Sequence[EmbeddingBagConfig] | None, num_dense: int, device: torch.device | None = None
    ) -> None:
        super().__init__()
        self.embedding_bag_collection = (
            EmbeddingBagCollection(tables=linear_tables(tables), device=device) if tables is not None else None
        )
        self.dense = nn.Linear(num_dense, 1, bias=False) if num_dense > 0 else None
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(
        self, dense: torch.Tensor, sparse: KeyedJaggedTensor, pooled: torch.Tensor | None = None
    ) -> torch.Tensor:
        if pooled is None:
            assert self.embedding_bag_collection is not None, "no first-order tables: pass their pooled rows"
            pooled = self.embedding_bag_collection(sparse).values()
        # (B, F * 4) in any key order (it is summed); column 0 of each 4 is the weight
        logit = pooled[:, ::LINEAR_TABLE_DIM].sum(dim=1, keepdim=True) + self.bias
        if self.dense is not None:
            logit = logit + self.dense(dense)
        return logit


def dnn(in_features: int, hidden: Sequence[int], dropout: float = 0.0) -> nn.Sequential:
    """DeepCTR's DNN: Linear -> ReLU (-> Dropout) per hidden size, from TorchRec ``Perceptron`` blocks."""
    layers: list[nn.Module] = []
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
        pairwise: torch.Tensor = self.fm([per_coordinate])
        return pairwise.view(b, d)


def deep_arch(in_features: int, hidden: Sequence[int], dropout: float = 0.0) -> DeepFM | None:
    """TorchRec's ``DeepFM`` block (flatten + concat a list of tensors) around :func:`dnn`; None if no layers."""
    return DeepFM(dense_module=dnn(in_features, hidden, dropout)) if hidden else None


class FieldModel(nn.Module):
    """Base of the DeepCTR-style models: :meth:`embed` gives the (B, F, d) field embeddings and the first-order
    logit with the bias. Subclasses add their interaction and return logits (B, 1).

    With an MLET module that carries the ``lin_*`` tables (``build_model`` adds them as its extra tables) one
    lookup serves both; with a stock EBC (the collapsed model) ``linear_arch`` holds them itself.
    """

    def __init__(self, embeddings: Embeddings, num_dense: int) -> None:
        super().__init__()
        self.d = embedding_dim(embeddings)
        self.num_fields = num_fields(embeddings)
        self.num_dense = num_dense
        self.sparse_arch = SparseArch(embeddings)  # MLET has the EBC interface
        self._shared = isinstance(embeddings, MLETEmbeddingBagCollection) and bool(embeddings.extra_bag_configs())
        if self._shared:
            expected = {t.name for t in linear_tables(embeddings.embedding_bag_configs())}
            got = {t.name for t in embeddings.extra_bag_configs()}
            if got != expected:
                raise ValueError(
                    f"the MLET module's extra tables {sorted(got)} are not the first-order tables {sorted(expected)}"
                )
        tables = None if self._shared else embeddings.embedding_bag_configs()
        self.linear_arch = LinearArch(tables, num_dense, table_device(embeddings))

    def embed(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(field embeddings (B, F, d), first-order logit with the bias (B, 1))."""
        if not self._shared:
            return self.sparse_arch(sparse), self.linear_arch(dense, sparse)
        mlet: MLETEmbeddingBagCollection = self.sparse_arch.embedding_bag_collection
        kt, first_order = mlet.forward_with_extra(sparse)
        # the module's output is in SparseArch's feature order (its tables' features), each d wide
        fields = kt.values().reshape(-1, self.num_fields, self.d)
        return fields, self.linear_arch(dense, sparse, first_order)

    @property
    def dnn_in_features(self) -> int:
        """Width of DeepCTR's DNN input: the flattened field embeddings and the dense features."""
        return self.num_fields * self.d + self.num_dense
