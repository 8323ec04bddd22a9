"""convert --jobs N (data_pipes/convert/passes.py): byte-range and per-file shards counted and encoded
in N processes give exactly the --jobs 1 data set (ids, rows, files, row groups, metadata, transform)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import data_pipes.convert.job as job_mod
import data_pipes.convert.passes as passes
from data_pipes.convert.criteo import DENSE, SPARSE, convert_criteo, criteo_source, parse_block
from data_pipes.convert.options import ConvertOptions
from data_pipes.convert.passes import plan_shards
from data_pipes.convert.spec import ConvertJob, FeatureSpec, InputPart
from data_pipes.convert.text import Span, count_lines, line_start
from data_pipes.errors import DataError, OptionError
from data_pipes.schema import DatasetMeta


def criteo_text(n: int, seed: int, day: int = 0) -> bytes:
    """Criteo-format rows with skewed categorical values (so min_count drops some) and empty fields."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        dense = ["" if rng.random() < 0.2 else str(int(rng.integers(-3, 5000))) for _ in range(13)]
        sparse = ["" if rng.random() < 0.1 else f"{int(rng.zipf(1.5)) % (7 + 40 * j):08x}" for j in range(26)]
        sparse[0] = f"d{day:07d}"
        lines.append("\t".join([str(int(rng.random() < 0.3)), *dense, *sparse]))
    return ("\n".join(lines) + "\n").encode()


def criteo_days(days: Path, rows: int = 60) -> Path:
    """day_0 .. day_23 as Criteo 1TB ships them (.gz), every third one plain (cut in byte ranges)."""
    days.mkdir()
    for d in range(24):
        text = criteo_text(rows, seed=10 + d, day=d)
        (days / f"day_{d}.gz").write_bytes(gzip.compress(text)) if d % 3 else (days / f"day_{d}").write_bytes(text)
    return days


def layout(root: Path) -> tuple:
    """Everything a data set is: metadata (input paths aside), transform files, and per Parquet file
    its row groups' sizes and its content."""
    meta = json.loads((root / "metadata.json").read_text())
    for i in meta["source"]["inputs"]:
        i.pop("path")
    transform = sorted(
        (p.relative_to(root).as_posix(), p.read_bytes()) for p in (root / "transform").rglob("*") if p.is_file()
    )
    files = []
    for split, names in DatasetMeta.load(root).splits.items():
        for name in names:
            pf = pq.ParquetFile(root / name)
            groups = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            files.append((split, name, groups, pf.read().to_pydict()))
    return json.dumps(meta, sort_keys=True), transform, files


SMALL = dict(block_size=4096, shard_size=32768, rows_per_file=1500, row_group_rows=256, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [dict(min_count=2), dict(hash_buckets=97)])
def test_byte_ranges_give_the_jobs_1_data_set(tmp_path, monkeypatch, mode):
    text = criteo_text(1500, seed=1)
    src = tmp_path / "train.txt"
    src.write_bytes(text[:-1])  # no line end after the last row
    one = convert_criteo(src, tmp_path / "one", seed=3, **mode, **SMALL)
    planned = []
    monkeypatch.setattr(job_mod, "plan_shards", lambda job: planned.extend(plan_shards(job)) or planned)
    many = convert_criteo(src, tmp_path / "many", seed=3, jobs=3, **mode, **SMALL)
    assert len(planned) == 13 and planned[-1].span.row > 1300  # 32 KiB byte ranges, numbered as in the whole file
    assert one.meta.rows == many.meta.rows and sum(one.meta.rows.values()) == 1500
    assert layout(tmp_path / "one") == layout(tmp_path / "many")
    assert not (tmp_path / "many" / ".shards").exists()
    assert one.meta.splits["train"][:2] == ["train/part-00000-00000.parquet", "train/part-00001-00000.parquet"]


@pytest.mark.slow
def test_criteo_1tb_day_layout_gzip_and_plain_gives_the_jobs_1_data_set(tmp_path):
    days = criteo_days(tmp_path / "days")
    one = convert_criteo(days, tmp_path / "one", min_count=1, **SMALL)
    convert_criteo(days, tmp_path / "two", min_count=1, jobs=2, **SMALL)
    assert one.meta.rows["train"] == 23 * 60 and one.meta.cardinalities()["C1"] == 24
    assert layout(tmp_path / "one") == layout(tmp_path / "two")


@pytest.mark.slow
def test_errors_in_a_worker_name_the_line_of_the_whole_file(tmp_path):
    lines = criteo_text(1200, seed=2).decode().splitlines()
    lines[1100] = lines[1100].replace("\t", "", 1)  # one column short
    src = tmp_path / "bad.txt"
    src.write_text("\n".join(lines) + "\n")
    for jobs in (1, 2):
        with pytest.raises(DataError, match=r"row 1101: expected 40 tab-separated columns, got 39"):
            convert_criteo(src, tmp_path / f"out{jobs}", jobs=jobs, **SMALL)
        assert not (tmp_path / f"out{jobs}").exists()


def test_line_starts_and_counts(tmp_path):
    p = tmp_path / "t"
    p.write_bytes(b"ab\ncd\n\nef")
    assert [line_start(p, o) for o in range(10)] == [0, 3, 3, 3, 6, 6, 6, 7, 9, 9]
    assert count_lines(p, 0, 9) == 4 and count_lines(p, 3, 7) == 2 and count_lines(p, 7, 9) == 1
    assert Span().whole and not Span(0, 9).whole
    with pytest.raises(OptionError, match="--jobs"):
        ConvertOptions(jobs=0)


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_finished_shards_are_not_redone(tmp_path, monkeypatch):
    src = tmp_path / "train.txt"
    src.write_bytes(criteo_text(1500, seed=4))
    convert_criteo(src, tmp_path / "one", hash_buckets=97, **SMALL)
    log, real = tmp_path / "encoded.log", passes.ShardOutput.save

    def dying(out, mark):  # runs in the forked workers, once a shard's files are written
        i = int(mark.stem)
        if i == 5 and not (tmp_path / "died").exists():
            (tmp_path / "died").write_text(" ".join(out.files["train"]))
            (mark.parents[1] / out.files["train"][0]).write_bytes(b"PAR1 half")  # as if killed while writing
            os._exit(1)
        real(out, mark)
        with open(log, "a") as f:
            f.write(f"{i}\n")

    monkeypatch.setattr(passes.ShardOutput, "save", dying)
    convert_criteo(src, tmp_path / "two", hash_buckets=97, jobs=2, **SMALL)
    finished = log.read_text().split()
    assert (tmp_path / "died").read_text() == "train/part-00005-00000.parquet"
    assert sorted(finished, key=int) == [str(i) for i in range(13)]  # each shard's mark written once
    assert layout(tmp_path / "one") == layout(tmp_path / "two")  # shard 5's half file was written again


def criteo_job(root: Path, **options) -> ConvertJob:
    """A Criteo job over ``root``'s day_0 (plain) and day_1.gz, both train."""
    parts = [InputPart(criteo_source(root / n), parse_block, split="train") for n in ("day_0", "day_1.gz")]
    return ConvertJob("criteo", parts, DENSE, [FeatureSpec(n) for n in SPARSE], ConvertOptions(**options))


def test_the_shards_depend_on_the_inputs_and_shard_size_only(tmp_path):
    plain, packed = tmp_path / "day_0", tmp_path / "day_1.gz"
    plain.write_bytes(criteo_text(300, seed=5))
    packed.write_bytes(gzip.compress(criteo_text(300, seed=6)))
    size = plain.stat().st_size
    for jobs in (1, 3):
        job = criteo_job(tmp_path, shard_size=size // 4, jobs=jobs, progress=False)
        ranges = passes.shard_ranges(job)
        assert [r[0] for r in ranges] == [0] * 5 + [1] and ranges[-1][1:3] == (0, None)  # 4-5 cuts; gzip whole
        assert sum(n for k, _, _, n in ranges if k == 0) == size and ranges[0][1] == 0
        assert [line_start(plain, a) for _, a, _, _ in ranges[:5]] == [a for _, a, _, _ in ranges[:5]]
        lenient = passes.shard_ranges(criteo_job(tmp_path, shard_size=size // 4, jobs=jobs, lenient=True))
        assert [(k, a, b) for k, a, b, _ in lenient] == [(0, 0, None), (1, 0, None)]
    with pytest.raises(OptionError, match="--shard-size-mb must be at least 4096 bytes"):
        ConvertOptions(shard_size=100)
