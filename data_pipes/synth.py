"""Planted synthetic Criteo-shaped data: Zipf-distributed ids, low-rank ground truth, known ceiling.

Every row has ``num_dense`` dense features ``I1..`` and ``num_sparse`` categorical features
``C1..`` whose cardinalities are log-spaced from ``min_cardinality`` (C1) to ``max_cardinality``
(the last one). The last ``multi_hot_features`` of them are bags of 1..``max_bag_size`` ids.

Ids follow a discretised power law over the feature's cardinality (rank k has probability
proportional to ``(k + 1.5) ** -zipf_exponent``, approximately), and ranks are mapped through a
fixed pseudo-random permutation of ``[0, cardinality)`` so that the id value is not the frequency
rank. Labels are Bernoulli(sigmoid(logit)) of a planted model::

    logit = intercept
            + dense_coef       * w . z                                (z: the dense features' normal draws)
            + interaction_coef * sum_{f<g} <E_f[x_f], E_g[x_g]>       (rank-``latent_rank`` vectors)
            + id_bias_coef     * sum_f b_f[x_f]                       (per-id biases)

where a bag uses the mean of its ids' vectors and biases. ``E_f`` and ``b_f`` are not stored:
their entries are a keyed hash of (feature, id), so memory does not depend on cardinalities and
rare ids have their own (hard to learn) parameters. The three coefficients are set so that each
term has the standard deviation ``dense_scale`` / ``interaction_scale`` / ``id_bias_scale`` over
rows, and the intercept so that the positive rate is ``positive_rate``; both are calibrated on a
separate sample, so everything depends only on the config (``seed`` included).

``metadata.json``'s ``source`` records the config, the planted coefficients and, per split, the
oracle metrics (AUC and LogLoss of the true probabilities, and the label-entropy LogLoss of
always predicting the split's positive rate): the ceiling a model can reach.

Example:
    >>> from data_pipes.synth import SynthConfig, generate
    >>> meta = generate(SynthConfig(rows=10_000, num_sparse=4), "data/tiny", progress=False)  # doctest: +SKIP
    >>> meta.source["oracle"]["test"]["auc"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from data_pipes.hashing import mix64, splitmix64, unit_interval
from data_pipes.schema import SPLITS, DatasetMeta, SparseFeature
from mlet_torchrec.io import atomic_output, check_output_path

GENERATOR = "data_pipes.synth"
_CALIBRATION_ROWS = 32_768
_AUC_BINS = 1 << 16  # oracle AUC from a logit histogram over [-_AUC_RANGE, _AUC_RANGE]
_AUC_RANGE = 20.0


class SynthConfig(BaseModel):
    """Settings of the generator. Every field has a default; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid")

    rows: int = Field(200_000, ge=1, le=10**11, description="rows over all splits")
    num_dense: int = Field(13, ge=0, le=4096, description="dense float32 features I1..")
    num_sparse: int = Field(26, ge=1, le=4096, description="categorical features C1..")
    min_cardinality: int = Field(10, ge=1, le=2**40, description="cardinality of C1")
    max_cardinality: int = Field(1_000_000, ge=1, le=2**40, description="cardinality of the last feature")
    zipf_exponent: float = Field(1.1, ge=0.0, le=5.0, description="power-law exponent of id frequencies (0: uniform)")
    multi_hot_features: int = Field(0, ge=0, description="how many of the last sparse features are bags")
    max_bag_size: int = Field(4, ge=1, le=1024, description="bags hold 1..max_bag_size ids (uniform)")
    latent_rank: int = Field(4, ge=1, le=256, description="rank of the planted embedding vectors")
    positive_rate: float = Field(0.25, gt=0.0, lt=1.0, description="target share of label 1")
    interaction_scale: float = Field(1.5, ge=0.0, le=20.0, description="std of the pairwise-interaction logit term")
    id_bias_scale: float = Field(0.5, ge=0.0, le=20.0, description="std of the per-id bias logit term")
    dense_scale: float = Field(0.5, ge=0.0, le=20.0, description="std of the dense logit term")
    train_fraction: float = Field(0.8, gt=0.0, le=1.0)
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    row_group_size: int = Field(8192, ge=1, le=1 << 24, description="rows per Parquet row group")
    row_groups_per_file: int = Field(
        64, ge=1, description="row groups per Parquet file (a split has one or more files)"
    )
    seed: int = Field(0, ge=0, le=2**63 - 1)

    @model_validator(mode="after")
    def _consistent(self) -> SynthConfig:
        if self.max_cardinality < self.min_cardinality:
            raise ValueError(
                f"max_cardinality ({self.max_cardinality}) must be >= min_cardinality ({self.min_cardinality})"
            )
        if self.multi_hot_features > self.num_sparse:
            raise ValueError(
                f"multi_hot_features ({self.multi_hot_features}) must be <= num_sparse ({self.num_sparse})"
            )
        total = self.train_fraction + self.valid_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train_fraction + valid_fraction + test_fraction must be 1, got {total:g} "
                f"({self.train_fraction:g} + {self.valid_fraction:g} + {self.test_fraction:g})"
            )
        if self.split_rows()["train"] < 1:
            raise ValueError(f"rows={self.rows} x train_fraction={self.train_fraction:g} leaves no training row")
        return self

    def split_rows(self) -> dict[str, int]:
        """Rows per split (train and valid rounded, test takes the rest)."""
        train = int(round(self.rows * self.train_fraction))
        valid = min(int(round(self.rows * self.valid_fraction)), self.rows - train)
        return {"train": train, "valid": valid, "test": self.rows - train - valid}

    def cardinalities(self) -> list[int]:
        """Cardinality of C1..C{num_sparse}, log-spaced from min_cardinality to max_cardinality."""
        if self.num_sparse == 1:
            return [self.max_cardinality]
        c = np.geomspace(self.min_cardinality, self.max_cardinality, self.num_sparse)
        out = [int(round(v)) for v in c]
        out[0], out[-1] = self.min_cardinality, self.max_cardinality
        return out


# ----------------------------------------------------------------------------------------------
# keyed hashing: the planted tables and the id permutation without materialising anything


def _uniform_centered(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> uniform values with mean 0 and variance 1 (float32)."""
    return ((unit_interval(h) - 0.5) * math.sqrt(12.0)).astype(np.float32)


@dataclass(frozen=True)
class _Feature:
    name: str
    cardinality: int
    multi_hot: bool
    half_bits: int  # the permutation is a Feistel network over 2 * half_bits bits, cycle-walked
    round_keys: tuple[int, ...]
    table_key: int

    def permute(self, ranks: np.ndarray) -> np.ndarray:
        """A fixed pseudo-random bijection of [0, cardinality) (int64 in, int64 out)."""
        x = ranks.astype(np.uint64)
        x = self._feistel(x)
        n = np.uint64(self.cardinality)
        out = x >= n
        while out.any():  # cycle walking: terminates because every cycle holds an in-range value
            x[out] = self._feistel(x[out])
            out[out] = x[out] >= n
        return x.astype(np.int64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        half = np.uint64(self.half_bits)
        mask = np.uint64((1 << self.half_bits) - 1)
        left, right = x >> half, x & mask
        for k in self.round_keys:
            left, right = right, left ^ (mix64(right + np.uint64(k)) & mask)
        return (left << half) | right

    def params(self, ids: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(latent vectors (n, rank), biases (n,)) of ``ids``: entries of the planted tables."""
        x = ids.astype(np.uint64)[:, None] * np.uint64(rank + 1) + np.arange(rank + 1, dtype=np.uint64)
        vals = _uniform_centered(splitmix64(x, self.table_key))
        return vals[:, :rank], vals[:, rank]


@dataclass(frozen=True)
class _Planted:
    features: list[_Feature]
    dense_mu: np.ndarray
    dense_sigma: np.ndarray
    dense_w: np.ndarray
    rank: int
    zipf: float
    max_bag: int


def _planted(cfg: SynthConfig) -> _Planted:
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(0,)))
    features = []
    first_multi = cfg.num_sparse - cfg.multi_hot_features
    for i, card in enumerate(cfg.cardinalities()):
        bits = max(2, int(card - 1).bit_length())
        bits += bits % 2
        keys = rng.integers(0, 2**62, size=5, dtype=np.int64)
        features.append(
            _Feature(f"C{i + 1}", card, i >= first_multi, bits // 2, tuple(int(k) for k in keys[:4]), int(keys[4]))
        )
    return _Planted(
        features=features,
        dense_mu=rng.uniform(0.0, 3.0, cfg.num_dense),
        dense_sigma=rng.uniform(0.5, 1.5, cfg.num_dense),
        dense_w=rng.standard_normal(cfg.num_dense),
        rank=cfg.latent_rank,
        zipf=cfg.zipf_exponent,
        max_bag=cfg.max_bag_size,
    )


def _zipf_ranks(rng: np.random.Generator, size: int, n: int, s: float) -> np.ndarray:
    """Ranks in [0, n): floor of a power-law draw on [1, n + 1) minus one (inverse CDF, vectorised)."""
    u = rng.random(size)
    a = 1.0 - s
    log_top = math.log(n + 1.0)
    if abs(a) < 1e-12:
        x = np.exp(u * log_top)
    else:
        x = np.exp(np.log1p(u * math.expm1(a * log_top)) / a)
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, n - 1)


@dataclass
class _Rows:
    dense: np.ndarray  # (n, D) float32
    sparse: list[tuple[np.ndarray, np.ndarray | None]]  # (ids, offsets (n + 1) or None) per feature
    dense_term: np.ndarray  # (n,)
    interaction: np.ndarray  # (n,)
    id_bias: np.ndarray  # (n,)


def _draw_rows(planted: _Planted, rng: np.random.Generator, n: int) -> _Rows:
    """n rows of features and the three raw logit terms (vectorised over rows)."""
    z = rng.standard_normal((n, len(planted.dense_w)))
    dense = np.log1p(np.exp(planted.dense_mu + planted.dense_sigma * z)).astype(np.float32)
    sparse: list[tuple[np.ndarray, np.ndarray | None]] = []
    for feat in planted.features:
        if feat.multi_hot:
            lengths = rng.integers(1, planted.max_bag + 1, size=n)
            offsets = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            ids = feat.permute(_zipf_ranks(rng, int(offsets[-1]), feat.cardinality, planted.zipf))
            sparse.append((ids, offsets))
        else:
            sparse.append((feat.permute(_zipf_ranks(rng, n, feat.cardinality, planted.zipf)), None))
    return _Rows(dense, sparse, *_terms(planted, z, sparse))


def _terms(
    planted: _Planted, z: np.ndarray, sparse: list[tuple[np.ndarray, np.ndarray | None]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dense term, pairwise interaction, id bias) of rows given their dense normals and ids."""
    n = z.shape[0]
    dense_term = z @ planted.dense_w if z.shape[1] else np.zeros(n)
    total = np.zeros((n, planted.rank), dtype=np.float64)
    squares = np.zeros(n, dtype=np.float64)
    id_bias = np.zeros(n, dtype=np.float64)
    for feat, (ids, offsets) in zip(planted.features, sparse, strict=True):
        vec, bias = feat.params(ids, planted.rank)
        vec, bias = vec.astype(np.float64), bias.astype(np.float64)
        if offsets is not None:  # a bag: mean of its ids' vectors and biases (an empty bag: zero)
            lengths = np.maximum(np.diff(offsets), 1)
            csum = np.zeros((len(ids) + 1, planted.rank + 1))
            np.cumsum(np.column_stack([vec, bias]), axis=0, out=csum[1:])
            sums = (csum[offsets[1:]] - csum[offsets[:-1]]) / lengths[:, None]
            vec, bias = sums[:, : planted.rank], sums[:, planted.rank]
        total += vec
        squares += np.einsum("ij,ij->i", vec, vec)
        id_bias += bias
    interaction = 0.5 * (np.einsum("ij,ij->i", total, total) - squares)  # sum over pairs f < g
    return dense_term, interaction, id_bias


@dataclass(frozen=True)
class _Coefs:
    intercept: float
    dense: float
    interaction: float
    id_bias: float

    def logit(self, rows: _Rows) -> np.ndarray:
        return (
            self.intercept
            + self.dense * rows.dense_term
            + self.interaction * rows.interaction
            + self.id_bias * rows.id_bias
        )


def _calibrate(cfg: SynthConfig, planted: _Planted) -> _Coefs:
    """Coefficients giving each term its target std and the data set its positive rate."""
    rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(1,)))
    rows = _draw_rows(planted, rng, _CALIBRATION_ROWS)

    def coef(term: np.ndarray, scale: float) -> float:
        std = float(term.std())
        return scale / std if std > 1e-12 else 0.0

    c = _Coefs(
        0.0,
        coef(rows.dense_term, cfg.dense_scale),
        coef(rows.interaction, cfg.interaction_scale),
        coef(rows.id_bias, cfg.id_bias_scale),
    )
    signal = c.logit(rows)
    lo, hi = -60.0, 60.0
    for _ in range(100):  # the mean probability is increasing in the intercept
        mid = 0.5 * (lo + hi)
        if _sigmoid(signal + mid).mean() < cfg.positive_rate:
            lo = mid
        else:
            hi = mid
    return _Coefs(0.5 * (lo + hi), c.dense, c.interaction, c.id_bias)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class _OracleMetrics:
    """Streaming AUC (logit histogram), LogLoss and positive rate of the true probabilities."""

    def __init__(self) -> None:
        self.pos = np.zeros(_AUC_BINS, dtype=np.int64)
        self.neg = np.zeros(_AUC_BINS, dtype=np.int64)
        self.logloss_sum = 0.0
        self.rows = 0

    def update(self, logit: np.ndarray, labels: np.ndarray) -> None:
        b = ((np.clip(logit, -_AUC_RANGE, _AUC_RANGE) + _AUC_RANGE) * (_AUC_BINS / (2 * _AUC_RANGE))).astype(np.int64)
        b = np.minimum(b, _AUC_BINS - 1)
        self.pos += np.bincount(b[labels], minlength=_AUC_BINS)
        self.neg += np.bincount(b[~labels], minlength=_AUC_BINS)
        # -log p(y) = softplus(logit) - y * logit; probabilities clamped like mlet_torchrec.evaluation.metrics
        p = np.clip(_sigmoid(logit), 1e-7, 1 - 1e-7)
        self.logloss_sum += float(-np.where(labels, np.log(p), np.log1p(-p)).sum())
        self.rows += len(logit)

    def result(self) -> dict[str, float]:
        npos, nneg = int(self.pos.sum()), int(self.neg.sum())
        rate = npos / self.rows if self.rows else float("nan")
        entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate)) if 0 < rate < 1 else 0.0
        if npos and nneg:
            neg_below = np.cumsum(self.neg) - self.neg
            auc = float((self.pos * (neg_below + 0.5 * self.neg)).sum()) / (npos * nneg)
        else:
            auc = float("nan")
        return {
            "auc": auc,
            "logloss": self.logloss_sum / self.rows if self.rows else float("nan"),
            "label_entropy": entropy,
            "positive_rate": rate,
            "rows": self.rows,
        }


def _table(meta: DatasetMeta, schema: pa.Schema, rows: _Rows, labels: np.ndarray) -> pa.Table:
    cols: list[pa.Array] = [pa.array(labels.astype(np.float32))]
    cols += [pa.array(rows.dense[:, j]) for j in range(len(meta.dense))]
    for ids, offsets in rows.sparse:
        if offsets is None:
            cols.append(pa.array(ids))
        else:
            cols.append(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids)))
    return pa.Table.from_arrays(cols, schema=schema)


def generate(
    config: SynthConfig,
    output: Path | str,
    progress: bool = True,
    overwrite: bool = False,
) -> DatasetMeta:
    """Write the data set of ``config`` into ``output`` and return its metadata.

    Rows are drawn and written one row group at a time (memory does not grow with ``rows``) through
    :func:`mlet_torchrec.io.atomic_output`: ``output`` appears complete or not at all. An existing
    ``output`` is replaced only with ``overwrite=True`` and only if ``mlet`` wrote it (otherwise an
    :class:`~mlet_torchrec.io.OutputError`, and nothing is touched).
    """
    output = Path(output)
    check_output_path(output, overwrite=overwrite)  # refuse before the (long) work, not after it
    planted = _planted(config)
    coefs = _calibrate(config, planted)
    dense_names = [f"I{j + 1}" for j in range(config.num_dense)]
    sparse = [SparseFeature(name=f.name, cardinality=f.cardinality, multi_hot=f.multi_hot) for f in planted.features]
    split_rows = {s: n for s, n in config.split_rows().items() if n > 0}
    layout: dict[str, list[str]] = {}
    for split, n in split_rows.items():
        groups = -(-n // config.row_group_size)
        files = -(-groups // config.row_groups_per_file)
        layout[split] = [f"{split}/part-{i:05d}.parquet" for i in range(files)]
    meta = DatasetMeta(dense=dense_names, sparse=sparse, splits=layout, rows=split_rows)
    schema = meta.arrow_schema()

    oracle: dict[str, dict[str, float]] = {}
    with atomic_output(output, command="synth", overwrite=overwrite) as tmp:
        with tqdm(
            total=sum(split_rows.values()),
            desc=f"synth {output.name}",
            unit="row",
            unit_scale=True,
            disable=not progress,
            dynamic_ncols=True,
        ) as bar:
            for split_index, split in enumerate(SPLITS):
                if split not in split_rows:
                    continue
                metrics = _OracleMetrics()
                remaining, group = split_rows[split], 0
                for rel in layout[split]:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    with pq.ParquetWriter(tmp / rel, schema, write_page_checksum=True) as writer:
                        for _ in range(config.row_groups_per_file):
                            if remaining == 0:
                                break
                            n = min(config.row_group_size, remaining)
                            rng = np.random.default_rng(
                                np.random.SeedSequence(config.seed, spawn_key=(2, split_index, group))
                            )
                            rows = _draw_rows(planted, rng, n)
                            logit = coefs.logit(rows)
                            labels = rng.random(n) < _sigmoid(logit)
                            writer.write_table(_table(meta, schema, rows, labels), row_group_size=n)
                            metrics.update(logit, labels)
                            remaining -= n
                            group += 1
                            bar.update(n)
                oracle[split] = metrics.result()
        meta = meta.model_copy(
            update={
                "source": {
                    "generator": GENERATOR,
                    "config": config.model_dump(mode="json"),
                    "planted": {
                        "intercept": coefs.intercept,
                        "dense_coef": coefs.dense,
                        "interaction_coef": coefs.interaction,
                        "id_bias_coef": coefs.id_bias,
                    },
                    "oracle": oracle,
                }
            }
        )
        meta.save(tmp)
    return meta


def true_logits(meta: DatasetMeta, table: pa.Table) -> np.ndarray:
    """The planted logits (float64) of rows read back from a data set written by ``generate``.

    ``table`` holds rows of that data set (any subset of its columns' rows, all columns present);
    ``sigmoid(true_logits(...))`` are the rows' true click probabilities, up to the float32
    rounding of the stored dense values. Useful to compare a model with the ground truth per row.
    """
    if meta.source.get("generator") != GENERATOR:
        raise ValueError(f"the data set was not written by {GENERATOR} (source: {meta.source.get('generator')!r})")
    cfg = SynthConfig.model_validate(meta.source["config"])
    coef = meta.source.get("planted")
    if not isinstance(coef, dict):
        raise ValueError(f"the data set's metadata has no planted coefficients (source: {sorted(meta.source)})")
    planted = _planted(cfg)
    d = len(meta.dense)
    dense = np.empty((table.num_rows, d))
    for j, name in enumerate(meta.dense):
        dense[:, j] = table.column(name).to_numpy().astype(np.float64)
    z = (np.log(np.expm1(dense)) - planted.dense_mu) / planted.dense_sigma if d else dense
    sparse: list[tuple[np.ndarray, np.ndarray | None]] = []
    for feat in planted.features:
        col = table.column(feat.name).combine_chunks()
        if feat.multi_hot:
            offsets = col.offsets.to_numpy().astype(np.int64)
            ids = col.values.to_numpy()[offsets[0] : offsets[-1]]
            sparse.append((ids, offsets - offsets[0]))
        else:
            sparse.append((col.to_numpy(), None))
    dense_term, interaction, id_bias = _terms(planted, z, sparse)
    return np.asarray(
        coef["intercept"]
        + coef["dense_coef"] * dense_term
        + coef["interaction_coef"] * interaction
        + coef["id_bias_coef"] * id_bias
    )


__all__ = ["GENERATOR", "SynthConfig", "generate", "true_logits"]
