"""Bytes of the embedding tables: the one model the guardrail, the planner, the results and collapse use.

While training, each table is W1 (rows x k, or rows x d for a single-layer table) at ``embedding.w1_dtype``,
the fused sparse optimizer's state (FBGEMM keeps it in fp32: Adagrad one value per weight, row-wise Adagrad
one per row, SGD none) and W2 (k x d, fp32, replicated). At serving a table is the collapsed rows x d, fp32.

    >>> from mlet_torchrec.config import load_config
    >>> from data_pipes.schema import DatasetMeta, SparseFeature
    >>> meta = DatasetMeta(sparse=[SparseFeature(name="a", cardinality=1000)], splits={})
    >>> cfg = load_config(None, ["embedding.d=4", "embedding.k=16", "embedding.w1_dtype=fp16"])
    >>> t = table_sizes(cfg, meta)[0]
    >>> t.weights, t.state, t.w2, t.serving   # 1000 x 16 fp16; SGD keeps no state; 16 x 4 fp32; 1000 x 4 fp32
    (32000, 0, 256, 16000)
"""

from __future__ import annotations

from dataclasses import dataclass

from data_pipes.schema import DatasetMeta
from mlet_torchrec.config import ExperimentConfig

FP32_BYTES = 4
W1_BYTES = {"fp32": 4, "fp16": 2}
"""Bytes of one W1 value per ``embedding.w1_dtype``."""


def fp32_table_bytes(rows: int, width: int) -> int:
    """Bytes of a rows x width fp32 table (a collapsed table at serving, W2, a plain export)."""
    return rows * width * FP32_BYTES


@dataclass(frozen=True)
class TableSize:
    """One table's bytes while training (:attr:`weights`, :attr:`state`, :attr:`w2`) and at serving."""

    feature: str
    rows: int
    d: int
    k: int | None
    """W1's width for an MLET table; None for a single-layer one (W1 is then the rows x d table)."""
    w1_dtype: str
    optimizer: str

    @property
    def width(self) -> int:
        return self.k or self.d

    @property
    def weights(self) -> int:
        """W1, at its dtype."""
        return self.rows * self.width * W1_BYTES[self.w1_dtype]

    @property
    def state(self) -> int:
        """The fused sparse optimizer's fp32 state."""
        per_row = {"adagrad": self.width, "rowwise_adagrad": 1}.get(self.optimizer, 0)
        return self.rows * per_row * FP32_BYTES

    @property
    def w2(self) -> int:
        """W2 (k x d, fp32, replicated on every rank); 0 for a single-layer table."""
        return fp32_table_bytes(self.k, self.d) if self.k else 0

    @property
    def sharded(self) -> int:
        """What the planner places on the ranks: W1 and its optimizer state."""
        return self.weights + self.state

    @property
    def serving(self) -> int:
        """The collapsed rows x d table, fp32."""
        return fp32_table_bytes(self.rows, self.d)


def table_sizes(config: ExperimentConfig, meta: DatasetMeta, mlet: bool = True) -> list[TableSize]:
    """Every table of ``config`` on ``meta``; ``mlet=False``: the single-layer model at d (same optimizer and
    W1 dtype), the reference of the MLET memory factor."""
    emb = config.embedding
    return [
        TableSize(
            f.name,
            f.cardinality,
            emb.d,
            emb.k_for(f.name) if mlet else None,
            emb.w1_dtype,
            config.sparse_optimizer.name,
        )
        for f in meta.sparse
    ]
