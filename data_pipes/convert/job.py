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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from data_pipes.convert.checks import DENSE_TRANSFORM, BlockChecker, IssueCounter
from data_pipes.convert.options import ConvertOptions
from data_pipes.convert.splits import SplitFractions, assign_splits
from data_pipes.convert.text import RawBlock, TextSource, iter_blocks
from data_pipes.convert.vocab import OOV_ID, Encoder, HashEncoder, VocabCounter
from data_pipes.convert.writer import SplitWriter, progress_bar
from data_pipes.errors import DataError, OptionError
from data_pipes.schema import SPLITS, TRANSFORM_DIR, DatasetMeta, SparseFeature
from mlet_torchrec.io import atomic_output

if TYPE_CHECKING:  # data_pipes.transform imports data_pipes.convert: imported where used
    from data_pipes.transform import FeatureTransform


@dataclass
class FeatureSpec:
    """A categorical feature: its raw ``column`` (default: ``name``), possibly a value ``derive``d from it."""

    name: str
    multi_hot: bool = False
    column: str | None = None
    derive: str | None = None  # "hour_of_day" | "weekday" (see data_pipes.transform)


@dataclass
class ParsedBlock:
    """What a format's parser makes of one block (``n`` rows, before lenient drops)."""

    label: np.ndarray  # float32 (n,)
    dense: dict[str, np.ndarray]  # float32 (n,) each, already transformed
    sparse: dict[str, pa.Array]  # raw values: string/binary, or list<string> for multi-hot features
    oov: dict[str, np.ndarray] = field(default_factory=dict)  # rows whose value is forced to the OOV id


Parser = Callable[[RawBlock, BlockChecker], ParsedBlock]


@dataclass
class InputPart:
    """One input file and where its rows go: a fixed split, or (``split=None``) the job's random split."""

    source: TextSource
    parse: Parser
    split: str | None = None
    stream: int = 0  # distinguishes the random streams of several randomly split files


@dataclass
class ConvertJob:
    dataset: str
    parts: list[InputPart]
    dense: list[str]
    sparse: list[FeatureSpec]
    options: ConvertOptions
    fractions: SplitFractions | None = None  # for parts with split=None
    split_rule: str = ""
    extra_source: dict[str, Any] = field(default_factory=dict)
    extra_inputs: list[Path] = field(default_factory=list)  # files read besides the parts (side tables)
    raw_columns: list[tuple[str, str]] = field(default_factory=list)  # (name, type) as in data_pipes.transform
    label: tuple[str, str] | None = None  # (column, rule)

    def inputs(self) -> list[Path]:
        """Every file the job reads: the output may neither be nor contain one of them."""
        extra = [Path(self.options.features_from)] if self.options.features_from is not None else []
        return [p.source.path for p in self.parts] + list(self.extra_inputs) + extra


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


def _part_has_train(job: ConvertJob, part: InputPart) -> bool:
    return part.split == "train" if part.split is not None else bool(job.fractions and job.fractions[0] > 0)


def _split_codes(job: ConvertJob, part: InputPart, block: RawBlock) -> np.ndarray:
    n = len(block)
    if job.options.features_from is not None:  # every row, in input order, to the one split
        return np.full(n, SPLITS.index(job.options.split_name), dtype=np.int8)
    if part.split is not None:
        return np.full(n, SPLITS.index(part.split), dtype=np.int8)
    assert job.fractions is not None
    return assign_splits(job.fractions, job.options.seed, part.stream, block.start_row, n)


def _parse(
    part: InputPart, block: RawBlock, opts: ConvertOptions, issues: IssueCounter
) -> tuple[ParsedBlock, np.ndarray]:
    check = BlockChecker(part.source.prefix, block.first_line, len(block), opts.lenient, issues)
    parsed = part.parse(block, check)
    check.finish()
    return parsed, ~check.drop


def _sparse_column(values: pa.Array, enc: Encoder, oov: np.ndarray | None, multi_hot: bool) -> pa.Array:
    ids = enc.encode(values)
    if not multi_hot:
        if oov is not None:
            ids[oov] = OOV_ID
        return pa.array(ids, pa.int64())
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    offsets = np.asarray(values.offsets, dtype=np.int64)
    offsets = offsets - offsets[0]
    if oov is not None and oov.any():
        ids[np.repeat(oov, np.diff(offsets))] = OOV_ID
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(ids, pa.int64()))


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
    t0 = time.perf_counter()
    opts = job.options
    plan = _encoders_plan(job)
    reused = reused_transform(job)
    vocab_features = [n for n, b in plan.items() if b is None] if reused is None else []
    encoders: dict[str, Encoder] = {n: HashEncoder(b) for n, b in plan.items() if b is not None}
    if reused is not None:
        encoders = dict(reused.encoders)
    issues = IssueCounter()
    input_rows: dict[int, int] = {}

    with atomic_output(output, command=f"convert {job.dataset}", inputs=job.inputs(), overwrite=opts.overwrite) as tmp:
        # pass 1: vocabularies from the train rows
        if vocab_features:
            counters = {n: VocabCounter() for n in vocab_features}
            scratch = IssueCounter()  # lenient counts are taken in pass 2, which sees every row
            with progress_bar(None, f"{job.dataset}: counting values (pass 1/2)", opts.progress) as bar:
                for k, part in enumerate(job.parts):
                    if not _part_has_train(job, part):
                        continue
                    rows = 0
                    for block in iter_blocks(
                        part.source, lenient=opts.lenient, issues=scratch, block_size=opts.block_size
                    ):
                        parsed, keep = _parse(part, block, opts, scratch)
                        train = keep & (_split_codes(job, part, block) == 0)
                        all_train = bool(train.all())
                        mask_arr = None if all_train else pa.array(train)
                        for n in vocab_features:
                            values = parsed.sparse[n]
                            oov = parsed.oov.get(n)
                            if oov is not None and oov.any():
                                m = pa.array(train & ~oov)
                            else:
                                m = mask_arr
                            counters[n].add(values if m is None else values.filter(m))
                        rows += len(block)
                        bar.update(len(block))
                    input_rows[k] = rows
            for n in vocab_features:
                encoders[n] = counters.pop(n).finalize(opts.min_count)

        sparse_meta = [
            SparseFeature(name=f.name, cardinality=encoders[f.name].cardinality, multi_hot=f.multi_hot)
            for f in job.sparse
        ]
        draft = DatasetMeta(dense=list(job.dense), sparse=sparse_meta, splits={})
        schema = draft.arrow_schema()
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

        # pass 2: encode and write
        total = sum(input_rows.values()) if len(input_rows) == len(job.parts) else None
        rows_read = 0
        with progress_bar(
            total,
            f"{job.dataset}: writing Parquet (pass {2 if vocab_features else 1}/{2 if vocab_features else 1})",
            opts.progress,
        ) as bar:
            for k, part in enumerate(job.parts):
                rows = 0
                for block in iter_blocks(part.source, lenient=opts.lenient, issues=issues, block_size=opts.block_size):
                    parsed, keep = _parse(part, block, opts, issues)
                    codes = _split_codes(job, part, block)
                    cols = [pa.array(parsed.label, pa.float32())]
                    cols += [pa.array(parsed.dense[n], pa.float32()) for n in job.dense]
                    cols += [
                        _sparse_column(parsed.sparse[f.name], encoders[f.name], parsed.oov.get(f.name), f.multi_hot)
                        for f in job.sparse
                    ]
                    table = pa.Table.from_arrays(cols, schema=schema)
                    for code, split in enumerate(SPLITS):
                        m = keep & (codes == code)
                        if m.all():
                            writers[split].write(table)
                        elif m.any():
                            writers[split].write(table.filter(pa.array(m)))
                    rows += len(block)
                    bar.update(len(block))
                input_rows[k] = rows
                rows_read += rows
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
            "features": {n: encoders[n].describe() for n in plan},
            "transform": {"dir": TRANSFORM_DIR, "identity": transform.identity},
            **job.extra_source,
        }
        if reused is not None:
            source["features_from"] = str(Path(str(opts.features_from)).absolute())
        if opts.lenient:
            source["lenient"] = issues.as_dict()
        meta = DatasetMeta(
            dense=list(job.dense),
            sparse=sparse_meta,
            splits={s: writers[s].files for s in used},
            rows={s: writers[s].rows for s in used},
            source=source,
        )
        meta.save(tmp)
    return ConvertResult(
        output=Path(output),
        meta=meta,
        seconds=time.perf_counter() - t0,
        rows_read=rows_read,
        issues=issues if opts.lenient else None,
    )


__all__ = ["ConvertJob", "ConvertResult", "FeatureSpec", "InputPart", "ParsedBlock", "Parser", "run_job"]
