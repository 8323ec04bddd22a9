"""MLET embeddings: every d-dim table W is trained as W1 (n x k) @ W2 (k x d).

W1 is a stock TorchRec ``EmbeddingBagCollection`` of k-dim tables, so the planner shards it
(table-, row-, column-wise) and FBGEMM's fused optimizer trains it. W2 is one small dense
k x d projection per table, replicated on every rank and trained by the dense optimizer.
Because pooling is linear, ``pool(W1 @ W2) == pool(W1) @ W2``: the module pools k-dim rows and
then projects all features in one batched matmul, so the projection costs O(batch x features x k x d),
independent of the bag sizes.

After training, ``collapse`` stores W = W1 @ W2 as an ordinary d-dim table.

Example:
    >>> import torch
    >>> from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
    >>> tables = [EmbeddingBagConfig(name="t_a", embedding_dim=4, num_embeddings=10, feature_names=["a"])]
    >>> ebc = MLETEmbeddingBagCollection(tables, inner_dim=16, sigma=0.25)
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(["a"], torch.tensor([1, 2, 3]), torch.tensor([1, 2]))
    >>> ebc(kjt).values().shape
    torch.Size([2, 4])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import get_embedding_names_by_table

from mlet_torchrec.modules.product import mlet_product

InnerDims = None | int | Mapping[str, int | None]


class InnerDimensionError(ValueError):
    """k < d was asked for without ``allow_k_below_d``."""


@dataclasses.dataclass(frozen=True)
class _ProjectionGroup:
    """Features whose tables share (k, d): projected together by one batched matmul."""

    k: int
    d: int
    tables: tuple[str, ...]  # W2 parameters stacked in this order
    features: tuple[str, ...]  # the group's W1 output keys (embedding names), in the module's feature order
    feature_table: tuple[int, ...]  # for each feature: index into ``tables``
    out_columns: tuple[int, ...]  # where the group's d-dim outputs go in the module's output


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where each group's k-dim columns sit in W1's pooled output, for one order of its keys."""

    in_columns: tuple[None | slice | torch.Tensor, ...]  # per group: its W1 columns (None: all of them)
    w2_rows: tuple[tuple[int, ...], ...]  # per group: its tables' W2 for each feature, in W1's key order
    out_order: tuple[torch.Tensor | None, ...]  # per group: key-order position of each feature (None: same)
    passthrough: tuple[torch.Tensor, torch.Tensor] | None  # single-layer features: (src, dst) columns
    extra: torch.Tensor | None  # columns of the extra tables, in their order


@dataclasses.dataclass(frozen=True)
class _LayoutPlan:
    """What the projection needs of the tables, whatever order W1's output keys come in."""

    passthrough: tuple[tuple[str, int, int], ...]  # single-layer features: (W1 key, output column, width)
    extra: tuple[str, ...]  # the extra tables' W1 keys, in their order
    feature_names: tuple[str, ...]  # the module's output keys


class W2Projection(nn.Module):
    """Everything after W1's lookup: pooled k-dim rows -> the d-dim output (one batched matmul per (k, d)).

    Its own submodule so that TorchRec's fx tracer (the pipelined training loop) treats it as a leaf:
    the column layout depends on the key order of W1's (sharded) output, known only at run time. W2
    stays a parameter of the MLET module (its checkpoint keys do not move) and comes in as arguments.
    """

    def __init__(
        self,
        groups: Sequence[_ProjectionGroup],
        out_dims: Sequence[int],
        w2_order: Sequence[str],
        plan: _LayoutPlan,
        w1_half: bool,
    ) -> None:
        super().__init__()
        self._groups = list(groups)
        self._out_dims = list(out_dims)
        self._plan = plan
        self._w1_half = w1_half
        index = {name: i for i, name in enumerate(w2_order)}
        self._group_w2 = [[index[name] for name in g.tables] for g in self._groups]
        self._layouts: dict[tuple[tuple[str, ...], tuple[int, ...]], _Layout] = {}

    def forward(self, pooled: KeyedTensor, *w2: torch.Tensor) -> tuple[KeyedTensor, torch.Tensor | None]:
        if self._w1_half:  # fp16 W1 pools to fp16 when unsharded (TorchRec's sharded kernels emit fp32)
            pooled = KeyedTensor(
                keys=pooled.keys(), length_per_key=pooled.length_per_key(), values=pooled.values().float(), key_dim=1
            )
        if not self._groups and not self._plan.extra:
            return pooled, None
        values = pooled.values()
        batch = values.shape[0]
        layout = self._layout(pooled.keys(), pooled.length_per_key())
        fast = len(self._groups) == 1 and layout.passthrough is None
        out = None if fast else values.new_empty(batch, sum(self._out_dims))
        if layout.passthrough is not None:
            assert out is not None
            src, dst = layout.passthrough
            out[:, dst.to(values.device)] = values.index_select(1, src.to(values.device))
        for g, cols, rows, order, w2_index in zip(
            self._groups, layout.in_columns, layout.w2_rows, layout.out_order, self._group_w2, strict=True
        ):
            if cols is None:
                group_values = values
            elif isinstance(cols, slice):
                group_values = values[:, cols]  # a view: W1's columns are not copied
            else:
                group_values = values.index_select(1, cols.to(values.device))
            # project in W1's key order (a sharded EBC orders keys by shard), then put the d-wide results,
            # not the k-wide inputs, in the module's order
            projected = self._project(group_values, g, [w2[i] for i in w2_index], rows)
            if order is not None:
                projected = projected.reshape(batch, -1, g.d).index_select(1, order.to(values.device))
            projected = projected.reshape(batch, -1)
            if fast:
                out = projected  # the group covers every feature, already in output order
            else:
                assert out is not None
                out[:, list(g.out_columns)] = projected
        extra = None if layout.extra is None else values.index_select(1, layout.extra.to(values.device))
        kt = KeyedTensor(
            keys=list(self._plan.feature_names), length_per_key=list(self._out_dims), values=out, key_dim=1
        )
        return kt, extra

    @staticmethod
    def _project(
        values: torch.Tensor, group: _ProjectionGroup, tables: list[torch.Tensor], rows: tuple[int, ...]
    ) -> torch.Tensor:
        """(B, F*k) pooled W1 rows -> (B, F, d): one batched matmul over all features of the group;
        ``rows[f]``: the table (index into ``tables``) of the f-th feature of ``values``."""
        w2 = torch.stack(tables)  # (T, k, d)
        if list(rows) != list(range(len(tables))):
            w2 = w2[list(rows)]  # features in another order, or tables shared by several features
        per_feature = values.reshape(values.shape[0], -1, group.k).transpose(0, 1)  # (F, B, k) view
        return mlet_product(per_feature, w2).transpose(0, 1)

    def _layout(self, keys: Sequence[str], lengths: Sequence[int]) -> _Layout:
        """Column indices for W1's output key order (a sharded EBC may order keys by shard, not by table)."""
        cache_key = (tuple(keys), tuple(lengths))
        cached = self._layouts.get(cache_key)
        if cached is not None:
            return cached
        start = dict(zip(keys, [sum(lengths[:i]) for i in range(len(lengths))], strict=True))
        width = dict(zip(keys, lengths, strict=True))

        def columns(key: str) -> range:
            return range(start[key], start[key] + width[key])

        in_columns: list[None | slice | torch.Tensor] = []
        w2_rows: list[tuple[int, ...]] = []
        out_order: list[torch.Tensor | None] = []
        for g in self._groups:
            by_key = sorted(range(len(g.features)), key=lambda i: start[g.features[i]])  # features in key order
            cols = [c for i in by_key for c in columns(g.features[i])]
            lo = cols[0]
            if cols == list(range(sum(lengths))) and len(self._groups) == 1:
                in_columns.append(None)
            elif cols == list(range(lo, lo + len(cols))):
                in_columns.append(slice(lo, lo + len(cols)))
            else:
                in_columns.append(torch.tensor(cols, dtype=torch.long))
            w2_rows.append(tuple(g.feature_table[i] for i in by_key))
            position = {f: p for p, f in enumerate(by_key)}
            order = [position[i] for i in range(len(g.features))]
            out_order.append(None if order == list(range(len(order))) else torch.tensor(order, dtype=torch.long))
        src: list[int] = []
        dst: list[int] = []
        for key, out_col, d in self._plan.passthrough:
            src.extend(columns(key))
            dst.extend(range(out_col, out_col + d))
        passthrough = (torch.tensor(src), torch.tensor(dst)) if src else None
        extra = [c for key in self._plan.extra for c in columns(key)]
        layout = _Layout(
            tuple(in_columns), tuple(w2_rows), tuple(out_order), passthrough, torch.tensor(extra) if extra else None
        )
        self._layouts[cache_key] = layout
        return layout


class MLETEmbeddingBagCollection(nn.Module):
    """A drop-in for a d-dim ``EmbeddingBagCollection`` that trains each table as W1 @ W2.

    Args:
        tables: the d-dim tables as the model sees them (what ``embedding_bag_configs()``
            reports and what collapse produces).
        inner_dim: k for every table (int), per table name (mapping; a missing name or None means
            single-layer for that table), or None for the single-layer baseline. The baseline runs
            through the same module so comparisons are fair.
        sigma: std of the N(0, sigma^2) initialisation of W2.
        allow_k_below_d: permit k < d (a low-rank factorisation, not MLET).
        device: where W1 is built; ``torch.device("meta")`` lets the TorchRec sharder
            materialise only each rank's shards.
        extra_tables: single-layer tables that ride along in W1 (one lookup, one sharded module, one
            fused optimizer) but are not part of the module's output: :meth:`forward_with_extra` returns
            their pooled values separately. They may read the same features as ``tables`` (the DeepCTR
            models' first-order ``lin_*`` tables do).
        w1_dtype: "fp32" or "fp16": storage of every W1 table (the extra tables included); W2 stays fp32.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        inner_dim: InnerDims,
        sigma: float = 0.25,
        allow_k_below_d: bool = False,
        device: torch.device | None = None,
        extra_tables: Sequence[EmbeddingBagConfig] = (),
        w1_dtype: str = "fp32",
    ) -> None:
        super().__init__()
        if not tables:
            raise ValueError("MLETEmbeddingBagCollection needs at least one table")
        self._tables: list[EmbeddingBagConfig] = list(tables)
        self._extra: list[EmbeddingBagConfig] = list(extra_tables)
        clash = {t.name for t in self._extra} & {t.name for t in self._tables}
        if clash or len({t.name for t in self._extra}) != len(self._extra):
            raise ValueError(f"extra table names must be unique and differ from the tables' ({sorted(clash)})")
        self._inner: dict[str, int | None] = {}
        for t in self._tables:
            k = inner_dim.get(t.name) if isinstance(inner_dim, Mapping) else inner_dim
            if k is not None and k < t.embedding_dim and not allow_k_below_d:
                raise InnerDimensionError(
                    f"table {t.name}: inner dimension k={k} is below d={t.embedding_dim}; MLET needs "
                    "k >= d (pass allow_k_below_d=True for a low-rank factorisation)"
                )
            if k is not None and k <= 0:
                raise InnerDimensionError(f"table {t.name}: inner dimension k={k} must be positive")
            self._inner[t.name] = k
        if isinstance(inner_dim, Mapping):
            unknown = set(inner_dim) - set(self._inner)
            if unknown:
                raise KeyError(f"inner_dim names unknown tables {sorted(unknown)}; tables are {sorted(self._inner)}")
        self.sigma = sigma

        if w1_dtype not in ("fp32", "fp16"):
            raise ValueError(f"w1_dtype must be 'fp32' or 'fp16', got {w1_dtype!r}")
        data_type = DataType.FP16 if w1_dtype == "fp16" else DataType.FP32
        self._w1_half = w1_dtype == "fp16"
        w1_tables = [
            dataclasses.replace(t, embedding_dim=self._inner[t.name] or t.embedding_dim, data_type=data_type)
            for t in self._tables
        ]
        w1_extra = [dataclasses.replace(t, data_type=data_type) for t in self._extra]
        self.w1 = EmbeddingBagCollection(tables=w1_tables + w1_extra, device=device)
        # W1's output keys: the feature name, or "feature@table" where tables share a feature
        names = get_embedding_names_by_table(w1_tables + self._extra)
        self._key: dict[tuple[str, str], str] = {
            (t.name, f): n
            for t, ns in zip(w1_tables + self._extra, names, strict=True)
            for f, n in zip(t.feature_names, ns, strict=True)
        }
        self.w2 = nn.ParameterDict(
            {
                t.name: nn.Parameter(torch.empty(k, t.embedding_dim))
                for t in self._tables
                if (k := self._inner[t.name]) is not None
            }
        )
        self.reset_projections()
        self._groups, out_dims = self._plan_groups()
        self._w2_order: tuple[str, ...] = tuple(self.w2.keys())
        self.projection = W2Projection(self._groups, out_dims, self._w2_order, self._layout_plan(), self._w1_half)

    def _layout_plan(self) -> _LayoutPlan:
        passthrough = []
        out_col = 0
        for t in self._tables:
            for f in t.feature_names:
                if self._inner[t.name] is None:
                    passthrough.append((self._key[(t.name, f)], out_col, t.embedding_dim))
                out_col += t.embedding_dim
        extra = tuple(self._key[(t.name, f)] for t in self._extra for f in t.feature_names)
        return _LayoutPlan(tuple(passthrough), extra, tuple(f for t in self._tables for f in t.feature_names))

    def _plan_groups(self) -> tuple[list[_ProjectionGroup], list[int]]:
        by_shape: dict[tuple[int, int], dict[str, list]] = {}
        out_col = 0
        out_dims: list[int] = []
        for t in self._tables:
            k, d = self._inner[t.name], t.embedding_dim
            for feature in t.feature_names:
                if k is not None:
                    g = by_shape.setdefault((k, d), {"tables": [], "features": [], "ft": [], "out": []})
                    if t.name not in g["tables"]:
                        g["tables"].append(t.name)
                    g["features"].append(self._key[(t.name, feature)])
                    g["ft"].append(g["tables"].index(t.name))
                    g["out"].extend(range(out_col, out_col + d))
                out_col += d
                out_dims.append(d)
        groups = [
            _ProjectionGroup(k, d, tuple(g["tables"]), tuple(g["features"]), tuple(g["ft"]), tuple(g["out"]))
            for (k, d), g in by_shape.items()
        ]
        return groups, out_dims

    @torch.no_grad()
    def reset_projections(self) -> None:
        """Draw every W2 from N(0, sigma^2) (uses the global torch RNG: seed it identically on all ranks)."""
        for p in self.w2.values():
            nn.init.normal_(p, mean=0.0, std=self.sigma)

    @property
    def is_factored(self) -> bool:
        return len(self.w2) > 0

    def inner_dims(self) -> dict[str, int | None]:
        """Table name -> k (None for single-layer tables)."""
        return dict(self._inner)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The d-dim tables this module stands for (what a stock model and collapse see)."""
        return list(self._tables)

    def extra_bag_configs(self) -> list[EmbeddingBagConfig]:
        """The single-layer tables that ride along in W1 (see ``extra_tables``)."""
        return list(self._extra)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.forward_with_extra(features)[0]

    def forward_with_extra(self, features: KeyedJaggedTensor) -> tuple[KeyedTensor, torch.Tensor | None]:
        """The module's output and the extra tables' pooled values (B, their total width; None without any)."""
        pooled = self.w1(features)
        if not self._groups and not self._extra and not self._w1_half:
            return pooled, None
        # W2 goes in as arguments: the projection is a leaf of TorchRec's fx tracer (pipelined training)
        return self.projection(pooled, *[self.w2[name] for name in self._w2_order])

    @torch.no_grad()
    def collapse_table(self, name: str, w1: torch.Tensor, block_rows: int = 65536) -> torch.Tensor:
        """W = W1 @ W2 for one table, in row blocks so memory stays bounded; single-layer tables pass through."""
        if self._inner[name] is None:
            return w1.clone()
        w2 = self.w2[name].to(device=w1.device, dtype=w1.dtype)
        return mlet_product(w1, w2, block_rows=block_rows)
