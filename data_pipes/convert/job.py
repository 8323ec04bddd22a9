"""A conversion: its inputs and features (:class:`ConvertJob`), and the two-pass run that writes it.

A :class:`ConvertJob` lists input files (each with a fixed split or a seeded random split,
:mod:`.splits`), a per-format ``parse`` function turning a block of text columns into labels, dense
values and raw categorical values, and the feature list. :func:`run_job` then

1. streams the train inputs once to count categorical values (:class:`~data_pipes.convert.vocab.VocabCounter`;
   skipped when every feature is hashed),
2. streams every input again (:mod:`.text`), checks values (:mod:`.checks`), encodes ids and appends
   rows to per-split Parquet writers (:mod:`.writer`),
3. writes ``metadata.json``; :func:`mlet_torchrec.io.atomic_output` moves the finished directory into
   place, so the output appears complete or not at all and never replaces foreign files or an input.

Both passes run over shards of the inputs in ``options.jobs`` processes (:mod:`.passes`: by file and
by byte range of uncompressed files); the output is the same for any number of jobs.

Memory does not depend on the input size: text is read in blocks, all per-row work is vectorised
(Arrow compute and NumPy), and each split writer buffers at most one row group. Only the vocabularies
grow, with the number of distinct values (see :mod:`data_pipes.convert.vocab`); hashed features need no
memory at all. Measured (``benchmarks/convert_memory.py``, synthetic Criteo text): peak RSS ~235 MiB for
1M rows and the same for 4M and 10M rows with hashing; ~240-270 MiB with vocabularies.

Example (the per-format modules build the job):
    >>> from data_pipes.convert.criteo import convert_criteo                 # doctest: +SKIP
    >>> convert_criteo("train.txt", "data/criteo", min_count=10).summary()   # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_pipes.convert.checks import DENSE_TRANSFORM, IssueCounter
from data_pipes.convert.passes import count_pass, encode_pass, plan_shards
from data_pipes.convert.spec import ConvertJob, FeatureSpec, InputPart, ParsedBlock, Parser
from data_pipes.convert.vocab import OOV_ID, Encoder, HashEncoder
from data_pipes.convert.writer import SplitWriter, progress_bar
from data_pipes.errors import DataError, OptionError
from data_pipes.schema import SPLITS, TRANSFORM_DIR, DatasetMeta, SparseFeature
from mlet_torchrec.io import atomic_output

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


def run_job(job: ConvertJob, output: str | Path) -> ConvertResult:
    """Run a conversion (see the module docstring); returns the written data set's metadata."""
    t0, opts = time.perf_counter(), job.options
    plan = _encoders_plan(job)
    reused = reused_transform(job)
    vocab_features = [n for n, b in plan.items() if b is None] if reused is None else []
    encoders: dict[str, Encoder] = {n: HashEncoder(b) for n, b in plan.items() if b is not None}
    if reused is not None:
        encoders = dict(reused.encoders)
    issues, input_rows = IssueCounter(), dict[int, int]()
    passes = 2 if vocab_features else 1
    with atomic_output(output, command=f"convert {job.dataset}", inputs=job.inputs(), overwrite=opts.overwrite) as tmp:
        shards = plan_shards(job)
        if vocab_features:  # pass 1: vocabularies from the train rows
            with progress_bar(None, f"{job.dataset}: counting values (pass 1/2)", opts.progress) as bar:
                counters, input_rows = count_pass(job, shards, vocab_features, bar)
            encoders |= {n: counters.pop(n).finalize(opts.min_count) for n in vocab_features}
        sparse_meta = [
            SparseFeature(name=f.name, cardinality=encoders[f.name].cardinality, multi_hot=f.multi_hot)
            for f in job.sparse
        ]
        schema = DatasetMeta(dense=list(job.dense), sparse=sparse_meta, splits={}).arrow_schema()
        writers = {
            s: SplitWriter(
                tmp,
                s,
                schema,
                rows_per_file=opts.rows_per_file,
                row_group_rows=opts.row_group_rows,
                compression=opts.compression,
            )
            for s in SPLITS
        }
        total = sum(input_rows.values()) if len(input_rows) == len(job.parts) else None
        desc = f"{job.dataset}: writing Parquet (pass {passes}/{passes})"
        with progress_bar(total, desc, opts.progress) as bar:  # pass 2: encode and write
            input_rows = encode_pass(job, shards, encoders, writers, issues, bar)
        for w in writers.values():
            w.close()
        target = opts.split_name if reused is not None else "train"
        if writers[target].rows == 0:
            raise DataError(
                f"{job.dataset}: no rows were left for the {target} split "
                f"(inputs: {', '.join(str(p.source.path) for p in job.parts)})"
            )
        transform = (reused or new_transform(job, encoders)).save(tmp / TRANSFORM_DIR)
        used = [s for s in SPLITS if writers[s].rows > 0]
        meta = DatasetMeta(
            dense=list(job.dense),
            sparse=sparse_meta,
            splits={s: writers[s].files for s in used},
            rows={s: writers[s].rows for s in used},
            source=_source(job, input_rows, encoders, transform.identity, issues),
        )
        meta.save(tmp)
    return ConvertResult(
        output=Path(output),
        meta=meta,
        seconds=time.perf_counter() - t0,
        rows_read=sum(input_rows.values()),
        issues=issues if opts.lenient else None,
    )


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


__all__ = ["ConvertJob", "ConvertResult", "FeatureSpec", "InputPart", "ParsedBlock", "Parser", "run_job"]
