"""What every conversion writes, however its passes run (one process, ``--jobs N``, or the ranks of a
job): the encoders, the split writers of each shard, and the finished data set (transform, ``metadata.json``).

:func:`data_pipes.convert.job.run_job` and :func:`data_pipes.convert.ranks.run_on_ranks` call these in
the same order, so both write the same data set.

Example (run_job's steps):
    >>> enc = plan_encoding(job)                                           # doctest: +SKIP
    >>> schema = dataset_schema(job, enc.encoders)[1]                      # doctest: +SKIP
    >>> outputs = encode_pass(job, shards, enc.encoders, schema, tmp, bar)  # doctest: +SKIP
    >>> meta = finish(job, tmp, collect(job, shards, outputs), enc)        # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from data_pipes.convert.checks import DENSE_TRANSFORM, IssueCounter
from data_pipes.convert.options import ConvertOptions
from data_pipes.convert.spec import ConvertJob
from data_pipes.convert.vocab import OOV_ID, Encoder, HashEncoder
from data_pipes.convert.writer import SplitWriter
from data_pipes.errors import DataError, OptionError
from data_pipes.schema import SPLITS, TRANSFORM_DIR, DatasetMeta, SparseFeature

if TYPE_CHECKING:  # data_pipes.transform imports data_pipes.convert: imported where used
    from data_pipes.transform import FeatureTransform


@dataclass
class ConvertResult:
    output: Path
    meta: DatasetMeta
    seconds: float
    rows_read: int
    issues: IssueCounter | None

    def summary(self) -> str:
        m = self.meta
        splits = " / ".join(f"{s} {m.rows.get(s, 0):,}" for s in SPLITS if s in m.splits)
        total_card = sum(m.cardinalities().values())
        rate = self.rows_read / self.seconds if self.seconds > 0 else float("inf")
        line = (
            f"{m.source.get('converter', 'convert')}: {self.rows_read:,} rows -> {self.output} ({splits}); "
            f"{len(m.dense)} dense, {len(m.sparse)} sparse features, total cardinality {total_card:,}; "
            f"{self.seconds:.1f} s ({rate:,.0f} rows/s)"
        )
        if self.issues is not None:

            def per_column(table: dict[str, dict[str, int]]) -> str:
                totals = sorted(((sum(k.values()), c) for c, k in table.items()), key=lambda x: (-x[0], x[1]))
                parts = [f"{c}: {n:,}" for n, c in totals]
                return f" ({', '.join(parts)})" if parts else ""

            line += (
                f"; lenient: {self.issues.total_values_replaced:,} values replaced"
                f"{per_column(self.issues.values_replaced)}, {self.issues.total_rows_dropped:,} rows dropped"
                f"{per_column(self.issues.rows_dropped)} (details in metadata.json)"
            )
        return line


@dataclass
class Written:
    """The data set's files and rows per split, the input rows of each part, and the lenient tallies."""

    files: dict[str, list[str]]
    rows: dict[str, int]
    input_rows: dict[int, int]
    issues: IssueCounter


@dataclass
class Encoding:
    """A conversion's encoders before pass 1: hashed features' and a reused transform's are ready;
    pass 1 counts the ``vocab`` features (their encoders are added after it)."""

    encoders: dict[str, Encoder]
    vocab: list[str]
    reused: FeatureTransform | None


def _encoders_plan(job: ConvertJob) -> dict[str, int | None]:
    """feature -> hash buckets, or None for a vocabulary."""
    names = [f.name for f in job.sparse]
    hb = job.options.hash_buckets
    assert not isinstance(hb, int), "ConvertOptions turns an int into {'*': int}"
    buckets = dict(hb or {})
    unknown = sorted(set(buckets) - set(names) - {"*"})
    if unknown:
        raise OptionError(f"--hash-buckets names unknown features {unknown}; {job.dataset} has {names}")
    default = buckets.get("*")
    return {n: buckets.get(n, default) for n in names}


def plan_encoding(job: ConvertJob) -> Encoding:
    """The encoders of ``job`` that need no counting, and the features that do."""
    plan = _encoders_plan(job)
    reused = reused_transform(job)
    if reused is not None:
        return Encoding(dict(reused.encoders), [], reused)
    encoders: dict[str, Encoder] = {n: HashEncoder(b) for n, b in plan.items() if b is not None}
    return Encoding(encoders, [n for n, b in plan.items() if b is None], None)


def new_transform(job: ConvertJob, encoders: dict[str, Encoder]) -> FeatureTransform:
    """The feature transform of a conversion that counted its own vocabularies."""
    from data_pipes.transform import DenseSpec, FeatureTransform, LabelSpec, RawColumn, SparseSource

    raw = [RawColumn.model_validate({"name": n, "type": t}) for n, t in job.raw_columns]
    label = LabelSpec(column=job.label[0], rule=job.label[1]) if job.label else None
    sources = [(SparseSource(f.name, f.column or f.name, f.derive, f.multi_hot), encoders[f.name]) for f in job.sparse]
    dense = [DenseSpec(name=n, column=n) for n in job.dense]
    return FeatureTransform.from_encoders(job.dataset, raw, label, dense, sources)


def reused_transform(job: ConvertJob) -> FeatureTransform | None:
    """``--features-from``'s transform, checked against the features this input makes (None without it)."""
    from data_pipes.transform import FeatureTransform

    path = job.options.features_from
    if path is None:
        return None
    t = FeatureTransform.load(path)
    ours = [(f.name, f.column or f.name, f.derive, f.multi_hot) for f in job.sparse]
    theirs = [(s.name, s.column, s.derive, s.multi_hot) for s in t.manifest.sparse]
    if t.dataset != job.dataset or t.dense_names != list(job.dense) or ours != theirs:
        mine = list(job.dense) + [f.name for f in job.sparse]
        want = t.dense_names + t.sparse_names
        lacks = [n for n in want if n not in mine][:5]
        extra = [n for n in mine if n not in want][:5]
        raise DataError(
            f"--features-from {path}: its transform encodes {t.dataset} features that this {job.dataset} input "
            f"does not make (missing {lacks}, unknown {extra}, or another order or kind)"
        )
    return t


def dataset_schema(job: ConvertJob, encoders: dict[str, Encoder]) -> tuple[list[SparseFeature], pa.Schema]:
    """The sparse features of the data set (with their cardinalities) and its Arrow schema."""
    sparse = [
        SparseFeature(name=f.name, cardinality=encoders[f.name].cardinality, multi_hot=f.multi_hot) for f in job.sparse
    ]
    return sparse, DatasetMeta(dense=list(job.dense), sparse=sparse, splits={}).arrow_schema()


def open_writers(tmp: Path, schema: pa.Schema, opts: ConvertOptions, stem: str) -> dict[str, SplitWriter]:
    """One Parquet appender per split, writing ``SPLIT/STEM-NNNNN.parquet`` in the output's temporary directory."""
    return {
        s: SplitWriter(
            tmp,
            s,
            schema,
            rows_per_file=opts.rows_per_file,
            row_group_rows=opts.row_group_rows,
            compression=opts.compression,
            stem=stem,
        )
        for s in SPLITS
    }


def finish(
    job: ConvertJob, tmp: Path, written: Written, enc: Encoding, saved: FeatureTransform | None = None
) -> DatasetMeta:
    """Save the transform (unless ``saved`` is the one already in ``tmp``) and ``metadata.json`` of the
    ``written`` files; the data set's metadata."""
    target = job.options.split_name if enc.reused is not None else "train"
    if written.rows[target] == 0:
        raise DataError(
            f"{job.dataset}: no rows were left for the {target} split "
            f"(inputs: {', '.join(str(p.source.path) for p in job.parts)})"
        )
    transform = saved or (enc.reused or new_transform(job, enc.encoders)).save(tmp / TRANSFORM_DIR)
    used = [s for s in SPLITS if written.rows[s] > 0]
    meta = DatasetMeta(
        dense=list(job.dense),
        sparse=dataset_schema(job, enc.encoders)[0],
        splits={s: written.files[s] for s in used},
        rows={s: written.rows[s] for s in used},
        source=_source(job, written.input_rows, enc.encoders, transform.identity, written.issues),
    )
    meta.save(tmp)
    return meta


def _source(
    job: ConvertJob, input_rows: dict[int, int], encoders: dict[str, Encoder], identity: str, issues: IssueCounter
) -> dict[str, Any]:
    """metadata.json's ``source``: the inputs and how they were converted."""
    opts = job.options
    source = {
        "converter": job.dataset,
        "inputs": [
            {"path": str(p.source.path.absolute()), "split": p.split or "random", "rows": input_rows.get(k, 0)}
            for k, p in enumerate(job.parts)
        ],
        "split_rule": job.split_rule,
        "fractions": list(job.fractions) if job.fractions else None,
        "options": opts.as_dict(),
        "oov_id": OOV_ID,
        "dense_transform": DENSE_TRANSFORM if job.dense else None,
        "features": {f.name: encoders[f.name].describe() for f in job.sparse},
        "transform": {"dir": TRANSFORM_DIR, "identity": identity},
        **job.extra_source,
    }
    if opts.features_from is not None:
        source["features_from"] = str(Path(str(opts.features_from)).absolute())
    if opts.lenient:
        source["lenient"] = issues.as_dict()
    return source


__all__ = [
    "ConvertResult",
    "Encoding",
    "Written",
    "dataset_schema",
    "finish",
    "new_transform",
    "open_writers",
    "plan_encoding",
    "reused_transform",
]
