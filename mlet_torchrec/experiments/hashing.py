"""The hashing trick of the papers' compression studies (appendix A.4), applied at training time.

The ids of chosen features are taken modulo m, a fraction of their cardinality (or a row count), so
those tables have m rows. :func:`write_hashed_dataset` writes a hashed copy of a data set (ids modulo
m, new cardinalities and the original ones in its metadata), which every command then uses unchanged
through ``data.path``; :func:`hash_batch` / :func:`hashed_meta` do the same on the fly for a trainer
that wires them in. ``mlet compression hash`` is its command line.

Example:
    >>> hash_moduli({"C1": 1000, "C2": 10}, {"C1": 0.25, "C2": 3})
    {'C1': 250, 'C2': 3}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from data_pipes.schema import DatasetMeta, SparseFeature
from mlet_torchrec.errors import UserError
from mlet_torchrec.io import atomic_output

if TYPE_CHECKING:  # imported where used: torchrec is slow to import
    from torchrec import KeyedJaggedTensor
    from torchrec.datasets.utils import Batch

HashSpec = Mapping[str, int | float]


class HashSpecError(UserError, ValueError):
    """A hashing spec naming a feature the data set lacks, or a fraction/row count that is not one."""


def hash_moduli(cardinalities: Mapping[str, int], spec: HashSpec) -> dict[str, int]:
    """Rows after hashing for every feature named in ``spec``.

    A float in (0, 1] is a fraction of the feature's cardinality (rounded up, at least 1 row), an
    int a row count; either is capped at the cardinality.
    """
    out: dict[str, int] = {}
    for feature, value in spec.items():
        if feature not in cardinalities:
            raise HashSpecError(f"hashing names feature {feature!r}, not one of {sorted(cardinalities)}")
        n = cardinalities[feature]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise HashSpecError(f"hashing {feature}={value!r}: give a fraction in (0, 1] or a row count")
        if isinstance(value, float):
            if value > 1:
                raise HashSpecError(f"hashing {feature}={value!r}: a fraction must be in (0, 1]; an int is a row count")
            m = max(1, math.ceil(n * value))
        else:
            m = int(value)
        out[feature] = min(n, m)
    return out


def hashed_meta(meta: DatasetMeta, spec: HashSpec) -> tuple[DatasetMeta, dict[str, int]]:
    """``meta`` with the hashed features' cardinalities replaced, and the moduli per feature."""
    moduli = hash_moduli(meta.cardinalities(), spec)
    sparse = [
        SparseFeature(name=f.name, cardinality=moduli.get(f.name, f.cardinality), multi_hot=f.multi_hot)
        for f in meta.sparse
    ]
    source = dict(meta.source)
    previous = source.get("hashing")
    previous = previous if isinstance(previous, dict) else {}
    original = dict(previous.get("original_cardinalities") or meta.cardinalities())
    source["hashing"] = {"moduli": {**(previous.get("moduli") or {}), **moduli}, "original_cardinalities": original}
    return meta.model_copy(update={"sparse": sparse, "source": source}), moduli


def unhashed_cardinalities(meta: DatasetMeta) -> dict[str, int]:
    """The cardinalities before any hashing (what A.4.4 sizes are relative to)."""
    hashing = meta.source.get("hashing") if isinstance(meta.source, dict) else None
    if isinstance(hashing, dict) and hashing.get("original_cardinalities"):
        return {k: int(v) for k, v in hashing["original_cardinalities"].items()}
    return meta.cardinalities()


def hash_kjt(kjt: KeyedJaggedTensor, moduli: Mapping[str, int]) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor with the values of the features in ``moduli`` taken modulo their m."""
    from torchrec import KeyedJaggedTensor

    if not moduli:
        return kjt
    values = kjt.values().clone()
    start = 0
    for key, length in zip(kjt.keys(), kjt.length_per_key(), strict=True):
        if key in moduli:
            values[start : start + length] = torch.remainder(values[start : start + length], moduli[key])
        start += length
    return KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=values, lengths=kjt.lengths(), weights=kjt.weights_or_none()
    )


def hash_batch(batch: Batch, moduli: Mapping[str, int]) -> Batch:
    """A ``torchrec.datasets.utils.Batch`` with hashed sparse features (see :func:`hash_kjt`)."""
    from torchrec.datasets.utils import Batch

    if not moduli:
        return batch
    return Batch(
        dense_features=batch.dense_features,
        sparse_features=hash_kjt(batch.sparse_features, moduli),
        labels=batch.labels,
    )


def _hash_table(table: Any, schema: Any, moduli: Mapping[str, int]) -> Any:
    """One row group with the ids of the features in ``moduli`` taken modulo their m."""
    import pyarrow as pa

    for feature, m in moduli.items():
        idx = table.schema.get_field_index(feature)
        col = table.column(idx).combine_chunks()
        if pa.types.is_list(col.type):
            flat = np.remainder(col.values.to_numpy(zero_copy_only=False), m)
            new = pa.ListArray.from_arrays(col.offsets, pa.array(flat, pa.int64()))
        else:
            new = pa.array(np.remainder(col.to_numpy(zero_copy_only=False), m), pa.int64())
        table = table.set_column(idx, schema.field(feature), new)
    return table


def write_hashed_dataset(
    source: str | Path, output: str | Path, spec: HashSpec, overwrite: bool = False
) -> DatasetMeta:
    """A copy of data set ``source`` with the ids of the features in ``spec`` modulo m (row group by row group).

    The copy's ``metadata.json`` has the new cardinalities and, under ``source.hashing``, the moduli
    and the original cardinalities. Train on it by pointing ``data.path`` at ``output``.
    """
    import pyarrow.parquet as pq

    source, output = Path(source), Path(output)
    meta = DatasetMeta.load(source)
    new_meta, moduli = hashed_meta(meta, spec)
    with atomic_output(output, "mlet compression hash", inputs=[source], overwrite=overwrite) as tmp:
        schema = meta.arrow_schema()
        for files in meta.splits.values():
            for rel in files:
                src = pq.ParquetFile(source / rel)
                dst_path = tmp / rel
                dst_path.parent.mkdir(parents=True, exist_ok=True)
                with pq.ParquetWriter(dst_path, schema) as writer:
                    for g in range(src.num_row_groups):
                        table = _hash_table(src.read_row_group(g), schema, moduli)
                        writer.write_table(table, row_group_size=table.num_rows)
        new_meta.save(tmp)
    return new_meta
