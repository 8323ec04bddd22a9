"""A conversion: its inputs and features (:class:`ConvertJob`), and the two-pass run that writes it.

A :class:`ConvertJob` lists input files (each with a fixed split or a seeded random split,
:mod:`.splits`), a per-format ``parse`` function turning a block of text columns into labels, dense
values and raw categorical values, and the feature list. :func:`run_job` then

1. streams the train inputs once to count categorical values (:class:`~data_pipes.convert.vocab.VocabCounter`;
   skipped when every feature is hashed),
2. streams every input again (:mod:`.text`), checks values (:mod:`.checks`), encodes ids and appends
   rows to per-split Parquet writers (:mod:`.writer`), one set per shard of the inputs,
3. writes ``metadata.json``; :func:`mlet_torchrec.io.atomic_output` moves the finished directory into
   place, so the output appears complete or not at all and never replaces foreign files or an input.

Both passes run over shards of the inputs in ``options.jobs`` processes (:mod:`.passes`: by file and
by byte range of ``options.shard_size`` of uncompressed files), or over the ranks of a torchrun/TorchX
job when ``options.world_size`` > 1 (:mod:`.ranks`); the output is the same for any number of jobs or ranks.
What the data set holds besides the rows (transform, metadata) comes from :mod:`.output`.

Memory does not depend on the input size: text is read in blocks, all per-row work is vectorised
(Arrow compute and NumPy), and each process's split writers buffer at most one row group each. Only the vocabularies
grow, with the number of distinct values (see :mod:`data_pipes.convert.vocab`); hashed features need no
memory at all. Measured (``benchmarks/convert_memory.py``, synthetic Criteo text): peak RSS ~235 MiB for
1M rows and the same for 4M and 10M rows with hashing; ~240-270 MiB with vocabularies.

Example (the per-format modules build the job):
    >>> from data_pipes.convert.criteo import convert_criteo                 # doctest: +SKIP
    >>> convert_criteo("train.txt", "data/criteo", min_count=10).summary()   # doctest: +SKIP
"""

from __future__ import annotations

import time
from pathlib import Path

from data_pipes.convert.output import ConvertResult, dataset_schema, finish, plan_encoding
from data_pipes.convert.passes import collect, count_pass, encode_pass, plan_shards
from data_pipes.convert.ranks import run_on_ranks
from data_pipes.convert.spec import ConvertJob, FeatureSpec, InputPart, ParsedBlock, Parser
from data_pipes.convert.writer import progress_bar
from mlet_torchrec.io import atomic_output


def run_job(job: ConvertJob, output: str | Path) -> ConvertResult:
    """Run a conversion (see the module docstring); returns the written data set's metadata."""
    if job.options.world_size > 1:
        return run_on_ranks(job, output)
    t0, opts = time.perf_counter(), job.options
    enc = plan_encoding(job)
    input_rows = dict[int, int]()
    passes = 2 if enc.vocab else 1
    with atomic_output(output, command=f"convert {job.dataset}", inputs=job.inputs(), overwrite=opts.overwrite) as tmp:
        shards = plan_shards(job)
        if enc.vocab:  # pass 1: vocabularies from the train rows
            with progress_bar(None, f"{job.dataset}: counting values (pass 1/2)", opts.progress) as bar:
                counters, input_rows = count_pass(job, shards, enc.vocab, bar)
            enc.encoders |= {n: counters.pop(n).finalize(opts.min_count) for n in enc.vocab}
        schema = dataset_schema(job, enc.encoders)[1]
        total = sum(input_rows.values()) if len(input_rows) == len(job.parts) else None
        desc = f"{job.dataset}: writing Parquet (pass {passes}/{passes})"
        with progress_bar(total, desc, opts.progress) as bar:  # pass 2: encode and write
            written = collect(job, shards, encode_pass(job, shards, enc.encoders, schema, tmp, bar))
        meta = finish(job, tmp, written, enc)
    return ConvertResult(
        output=Path(output),
        meta=meta,
        seconds=time.perf_counter() - t0,
        rows_read=sum(written.input_rows.values()),
        issues=written.issues if opts.lenient else None,
    )


__all__ = ["ConvertJob", "ConvertResult", "FeatureSpec", "InputPart", "ParsedBlock", "Parser", "run_job"]
