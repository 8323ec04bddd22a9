"""A conversion run by every rank of a torchrun/TorchX job (``-j NODESxPROCS``), kept in step through
files on a file system that every node sees.

Every rank calls :func:`run_on_ranks` with the same job (``options.rank`` of ``options.world_size``).
They share a work directory beside the output, ``.NAME.mlet-convert-KEY``, and the output's temporary
directory, ``.NAME.mlet-tmp-convert-KEY`` (:class:`~mlet_torchrec.io.AtomicOutput`), both named by a
key of the conversion (:func:`job_key`: output, options, each input's path, size and mtime), so a
restarted job (torchrun ``--max-restarts``, the scheduler's ``max_retries``, or the same command run
again, with any number of ranks) finds what a failed attempt finished:

1. **plan**: every rank cuts the inputs into byte ranges (:func:`~.passes.shard_ranges`, the same for any
   number of ranks) and counts the lines of every ``W``-th one into ``lines/R-of-W.json``; rank 0 numbers the shards
   (:func:`~.passes.number_shards`) into ``plan.json``, which every later step and attempt reads.
2. **pass 1** (vocabularies only): shard ``todo[j]`` (the shards with train rows) is counted by rank
   ``j % W`` into ``counts/i.npz``; rank 0 adds them up (:meth:`~.vocab.VocabCounter.add_hashes`, the
   exact merge of ``--jobs``), finalises the vocabularies and saves the transform into the output; the
   other ranks load it from there.
3. **pass 2**: shard ``i`` is encoded by rank ``i % W`` straight into its final Parquet files in the
   output's temporary directory (:func:`~.passes.encode_shard`; ``done/i.json``, written last, marks it
   complete and lists its files); rank 0 collects the marks in input order, writes the metadata
   (:mod:`.output`, as ``run_job`` does), commits the output and removes the work directory.

Every mark and counter file appears by rename, complete or not at all, and a shard with a mark is not
encoded again (a shard without one is: its partial files are replaced). Nothing is spooled: the work
directory holds only small files, and every row is encoded and written once, by one rank. A rank that
waits for another's file watches that rank's heartbeat (``alive/R``, bumped every :data:`HEARTBEAT_S`
by a thread): unchanged for :data:`STALE_S` seconds (``MLET_CONVERT_STALE_S``), it stops with one line
naming the rank.

    >>> run_on_ranks(job, "data/criteo1tb")       # on every rank; job.options.rank/world_size set  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from data_pipes.convert.checks import IssueCounter
from data_pipes.convert.output import ConvertResult, Encoding, dataset_schema, finish, new_transform, plan_encoding
from data_pipes.convert.passes import (
    Shard,
    ShardOutput,
    collect,
    count_shards,
    encode_shard,
    number_shards,
    part_has_train,
    shard_ranges,
)
from data_pipes.convert.spec import ConvertJob
from data_pipes.convert.text import Span, count_lines
from data_pipes.convert.vocab import Encoder, VocabCounter
from data_pipes.convert.writer import progress_bar
from data_pipes.schema import TRANSFORM_DIR, DatasetMeta
from mlet_torchrec.errors import UserError
from mlet_torchrec.io import AtomicOutput, atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:  # data_pipes.transform imports data_pipes.convert: imported where used
    from data_pipes.transform import FeatureTransform

log = logging.getLogger("mlet.convert")

HEARTBEAT_S = 2.0
"""How often each rank bumps its heartbeat file."""
STALE_S = 120.0
"""How long a rank waits on another whose heartbeat does not change (``MLET_CONVERT_STALE_S`` overrides)."""
POLL_S = 0.05
"""How soon a waiting rank first looks again for the file it waits for; each later look waits
:data:`POLL_GROWTH` times longer, up to :data:`POLL_MAX_S` (a long wait polls the shared file system
twice a second, a short one is not slowed down)."""
POLL_GROWTH = 1.5
POLL_MAX_S = 0.5


class RankStopped(UserError):
    """Another rank of the job stopped (killed, failed, or its node lost) before it wrote what this one needs."""


def job_key(job: ConvertJob, output: str | Path) -> str:
    """A key of the conversion: the same for every rank and attempt, another for other inputs or options.

    The number of ranks is not part of it: a job restarted with another ``-j`` resumes too.
    """
    inputs = []
    for p in job.inputs():
        st = Path(p).stat()
        inputs.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    blob = {"output": str(Path(output).resolve()), "dataset": job.dataset, "options": job.options.as_dict()}
    text = json.dumps({**blob, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Heartbeat:
    """Bumps ``path`` every :data:`HEARTBEAT_S` from a thread while the block runs: created once, then
    rewritten in place, so no new file appears once the work directory is being removed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlet-convert-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        atomic_write_text(self.path, f"{os.getpid()} 0\n")
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        beat = 0
        while not self._stop.wait(HEARTBEAT_S):
            beat += 1
            with contextlib.suppress(OSError), open(self.path, "r+") as f:  # gone: the job is over
                f.write(f"{os.getpid()} {beat}\n")


@dataclass(frozen=True)
class Peers:
    """This rank's view of the others: where they write, and how to wait for them."""

    work: Path
    rank: int
    world: int
    stale_s: float = STALE_S

    def beat(self, rank: int) -> str | None:
        try:
            return (self.work / "alive" / str(rank)).read_text()
        except OSError:
            return None

    def wait(self, path: Path, owner: int, what: str) -> bool:
        """Wait until ``path`` exists (True) or the work directory is gone (False: rank 0 committed);
        :class:`RankStopped` when rank ``owner``'s heartbeat stays the same for ``stale_s`` seconds."""
        last, since, poll = self.beat(owner), time.monotonic(), POLL_S
        while not path.exists():
            if not self.work.is_dir():
                return False
            time.sleep(poll)
            poll = min(poll * POLL_GROWTH, POLL_MAX_S)
            beat = self.beat(owner)
            if beat != last:
                last, since = beat, time.monotonic()
            elif time.monotonic() - since > self.stale_s:
                raise RankStopped(
                    f"rank {owner} of {self.world} stopped before it wrote {what} (no heartbeat for "
                    f"{self.stale_s:.0f} s); run the job again: it resumes from what is finished in {self.work}"
                )
        return True

    def need(self, path: Path, owner: int, what: str) -> None:
        """:meth:`wait` for a file the job cannot go on without."""
        if not self.wait(path, owner, what):
            raise RankStopped(f"{self.work} vanished while rank {self.rank} waited for {what} of rank {owner}")


# ------------------------------------------------------------------------------------------ the steps


def _plan(job: ConvertJob, peers: Peers) -> list[Shard]:
    """The shards, as rank 0 numbered them (once: a restarted job reads ``plan.json``)."""
    plan = peers.work / "plan.json"
    if not plan.is_file():
        ranges = shard_ranges(job)
        split = [(k, a, b) for k, a, b, _ in ranges if b is not None]
        mine = peers.work / "lines" / f"{peers.rank}-of-{peers.world}.json"
        if not mine.is_file():
            own = [
                [k, a, b, count_lines(job.parts[k].source.path, a, b)] for k, a, b in split[peers.rank :: peers.world]
            ]
            atomic_write_text(mine, json.dumps(own))
        if peers.rank == 0:
            lines: dict[tuple[int, int, int], int] = {}
            for r in range(peers.world):
                theirs = peers.work / "lines" / f"{r}-of-{peers.world}.json"
                peers.need(theirs, r, "its line counts")
                lines |= {(k, a, b): n for k, a, b, n in json.loads(theirs.read_text())}
            shards = number_shards(job, ranges, lines)
            atomic_write_text(plan, json.dumps([asdict(s) for s in shards]))
    peers.need(plan, 0, "the plan of shards")
    return [Shard(s["part"], Span(**s["span"]), s["nbytes"]) for s in json.loads(plan.read_text())]


def _count_own(job: ConvertJob, shards: list[Shard], todo: list[int], features: list[str], peers: Peers) -> None:
    """Pass 1 on this rank: the counters of its shards, one file each (complete ones are kept)."""
    for i in todo[peers.rank :: peers.world]:
        path = peers.work / "counts" / f"{i}.npz"
        if path.is_file():
            continue
        counters, _ = count_shards(job, [shards[i]], features)
        arrays: dict[str, Any] = {}
        for n, c in counters.items():
            arrays[f"{n}.keys"], arrays[f"{n}.values"] = c.counts()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())


def _merge_counts(job: ConvertJob, todo: list[int], features: list[str], peers: Peers) -> dict[str, Encoder]:
    """Rank 0: every shard's counters added up, and the vocabularies they give."""
    total = {n: VocabCounter() for n in features}
    for j, i in enumerate(todo):
        path = peers.work / "counts" / f"{i}.npz"
        peers.need(path, j % peers.world, f"the counts of shard {i}")
        with np.load(path, allow_pickle=False) as z:
            for n in features:
                total[n].add_hashes(z[f"{n}.keys"], z[f"{n}.values"])
    return {n: total.pop(n).finalize(job.options.min_count) for n in features}


def _vocabularies(
    job: ConvertJob, shards: list[Shard], enc: Encoding, tmp: Path, peers: Peers
) -> FeatureTransform | None:
    """Pass 1: the vocabularies counted, merged by rank 0 and saved as the output's transform, which every
    rank loads into ``enc.encoders``; the saved transform (None when every feature is hashed or reused)."""
    from data_pipes.transform import MANIFEST_FILE, FeatureTransform

    if not enc.vocab:
        return None
    manifest = tmp / TRANSFORM_DIR / MANIFEST_FILE
    if not manifest.is_file():
        todo = [i for i, s in enumerate(shards) if part_has_train(job, job.parts[s.part])]
        _count_own(job, shards, todo, enc.vocab, peers)
        if peers.rank == 0:
            counted = _merge_counts(job, todo, enc.vocab, peers)
            new_transform(job, enc.encoders | counted).save(tmp / TRANSFORM_DIR)
    peers.need(manifest, 0, "the vocabularies")
    saved = FeatureTransform.load(tmp / TRANSFORM_DIR)
    enc.encoders |= {n: saved.encoders[n] for n in enc.vocab}
    return saved


def _encode_own(
    job: ConvertJob, shards: list[Shard], encoders: dict[str, Encoder], schema: pa.Schema, tmp: Path, peers: Peers
) -> None:
    """Pass 2 on this rank: its shards into their Parquet files (shards with a mark are kept)."""
    fresh = 0
    for i in range(peers.rank, len(shards), peers.world):
        fresh += encode_shard(job, shards[i], i, encoders, schema, tmp, peers.work / "done").fresh
    mine = len(range(peers.rank, len(shards), peers.world))
    log.info(
        "rank %d of %d: encoded %d shards, kept %d from an earlier attempt",
        peers.rank,
        peers.world,
        fresh,
        mine - fresh,
    )


def _collect_all(job: ConvertJob, shards: list[Shard], peers: Peers) -> list[ShardOutput]:
    """Rank 0, after its own shards: every shard's mark, in input order, as its rank writes it."""
    outputs = []
    with progress_bar(None, f"{job.dataset}: writing Parquet ({peers.world} ranks)", job.options.progress) as bar:
        for i in range(len(shards)):
            mark = peers.work / "done" / f"{i}.json"
            peers.need(mark, i % peers.world, f"shard {i}")
            outputs.append(ShardOutput.load(mark))
            bar.update(outputs[-1].read)
    return outputs


# ------------------------------------------------------------------------------------------ the job


def run_on_ranks(job: ConvertJob, output: str | Path) -> ConvertResult:
    """This rank's part of the conversion (see the module docstring); every rank returns the data set's
    metadata once rank 0 committed it."""
    t0, opts = time.perf_counter(), job.options
    key = job_key(job, output)
    out = AtomicOutput(
        output, command=f"convert {job.dataset}", inputs=job.inputs(), overwrite=opts.overwrite, token=f"convert-{key}"
    )
    stale = float(os.environ.get("MLET_CONVERT_STALE_S", STALE_S))
    peers = Peers(out.output.parent / f".{out.output.name}.mlet-convert-{key}", opts.rank, opts.world_size, stale)
    tmp = out.begin()
    for sub in ("alive", "lines", "counts", "done"):
        (peers.work / sub).mkdir(parents=True, exist_ok=True)
    with Heartbeat(peers.work / "alive" / str(peers.rank)):
        enc = plan_encoding(job)
        shards = _plan(job, peers)
        saved = _vocabularies(job, shards, enc, tmp, peers)
        _encode_own(job, shards, enc.encoders, dataset_schema(job, enc.encoders)[1], tmp, peers)
        if peers.rank == 0:
            written = collect(job, shards, _collect_all(job, shards, peers))
            meta = finish(job, tmp, written, enc, saved)
            out.commit()
            atomic_write_text(peers.work / "committed", "")
            read, issues = sum(written.input_rows.values()), written.issues
    if peers.rank != 0:
        peers.wait(peers.work / "committed", 0, "the data set")
        meta = DatasetMeta.load(out.output)
        read, issues = sum(meta.rows.values()), IssueCounter()  # what rank 0 counted is in its summary
    else:
        shutil.rmtree(peers.work, ignore_errors=True)
    return ConvertResult(
        output=Path(output),
        meta=meta,
        seconds=time.perf_counter() - t0,
        rows_read=read,
        issues=issues if opts.lenient else None,
    )


__all__ = ["HEARTBEAT_S", "STALE_S", "Heartbeat", "Peers", "RankStopped", "job_key", "run_on_ranks"]
