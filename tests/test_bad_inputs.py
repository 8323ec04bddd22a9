"""Bad inputs end to end, through the ``mlet`` command: one line naming the culprit, exit 2, nothing left.

Each case runs the real command in a subprocess (no mocks): raw Criteo/Avazu/MovieLens files that are
truncated, have the wrong number of columns or labels that are not 0/1 (``mlet convert``); outputs that
would clobber foreign files, an input, the working directory or the root (``mlet synth``, ``mlet
convert``); a SIGKILL in the middle of a write; and broken Parquet data sets fed to ``mlet train``.
"""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipes.convert.avazu import COLUMNS as AVAZU_COLUMNS
from data_pipes.schema import METADATA_FILE, DatasetMeta
from mlet_torchrec.io import MARKER

MLET = [sys.executable, "-m", "mlet_torchrec.cli"]


def mlet(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*MLET, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def one_error_line(p: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one error line on stderr holding every fragment; returns it."""
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if "error:" in ln]
    assert len(errors) == 1, p.stderr[-3000:]
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    return errors[0]


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---------------------------------------------------------------------------------- raw text -> convert


def criteo_line(label: str = "0", i: int = 0) -> str:
    return "\t".join([label] + [str(i + j) for j in range(13)] + [f"{(i * 31 + j) % 97:08x}" for j in range(26)])


def criteo_text(n: int) -> str:
    return "".join(criteo_line(str(i % 2), i) + "\n" for i in range(n))


AVAZU_HEADER = ",".join(AVAZU_COLUMNS)


def avazu_line(click: str = "0", i: int = 0) -> str:
    return ",".join([str(i), click, f"141021{i % 24:02d}"] + [f"v{(i + j) % 7}" for j in range(21)])


def avazu_text(n: int) -> str:
    return AVAZU_HEADER + "\n" + "".join(avazu_line(str(i % 2), i) + "\n" for i in range(n))


def movielens_dir(root: Path, inter_body: str) -> Path:
    d = root / "ml"
    d.mkdir()
    (d / "ml.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + inter_body)
    (d / "ml.user").write_text("user_id:token\tage:token\n1\t20\n2\t30\n")
    (d / "ml.item").write_text("item_id:token\tclass:token_seq\n10\tAction\n11\tComedy Drama\n")
    return d


def _truncated(text: str, drop: int) -> str:
    return text[:-drop]  # cut inside the last row (no newline at the end)


RAW_CASES = [
    # id, dataset, file name, contents (str, or bytes already encoded), expected fragments of the error line
    (
        "criteo truncated row",
        "criteo",
        "train.tsv",
        _truncated(criteo_text(50), 120),
        ["train.tsv", "row 50", "expected 40 tab-separated columns"],
    ),
    (
        "criteo truncated gzip",
        "criteo",
        "day.tsv.gz",
        gzip.compress(criteo_text(3000).encode())[:-4000],
        ["day.tsv.gz", "cannot read after row"],
    ),
    (
        "criteo label 2",
        "criteo",
        "train.tsv",
        criteo_text(20) + criteo_line("2", 99) + "\n",
        ["train.tsv", "row 21", "column label", "'2' is not 0 or 1"],
    ),
    (
        "criteo extra column",
        "criteo",
        "train.tsv",
        criteo_text(7) + criteo_line("1") + "\tx\n",
        ["train.tsv", "row 8", "expected 40 tab-separated columns, got 41"],
    ),
    (
        "avazu truncated row",
        "avazu",
        "train.csv",
        _truncated(avazu_text(30), 40),
        ["train.csv", "row 31", "expected 24 comma-separated columns"],
    ),
    (
        "avazu click 0.5",
        "avazu",
        "train.csv",
        avazu_text(10) + avazu_line("0.5", 3) + "\n",
        ["train.csv", "row 12", "column click", "'0.5' is not 0 or 1"],
    ),
    (
        "movielens truncated row",
        "movielens",
        "ml",
        "1\t10\t5\t0\n2\t11\t3\t0\n1\t1",
        ["ml.inter", "row 4", "expected 4 tab-separated columns, got 2"],
    ),
    (
        "movielens rating text",
        "movielens",
        "ml",
        "1\t10\t5\t0\n2\t11\tgood\t0\n",
        ["ml.inter", "row 3", "column rating", "'good' is not a number"],
    ),
]


@pytest.mark.parametrize("dataset,name,contents,fragments", [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES])
def test_convert_bad_raw_input(tmp_path, dataset, name, contents, fragments):
    if dataset == "movielens":
        src = movielens_dir(tmp_path, contents)
    else:
        src = tmp_path / name
        src.write_bytes(contents if isinstance(contents, bytes) else contents.encode())
    before = listing(tmp_path)
    p = mlet(
        "convert",
        dataset,
        "--input",
        str(src),
        "--output",
        str(tmp_path / "out" / "data"),
        "--min-count",
        "1",
        cwd=tmp_path,
    )
    one_error_line(p, *fragments)
    assert listing(tmp_path) == before, "partial output or temporaries left behind"


# ---------------------------------------------------------------------------------- output safety


def _foreign(out: Path) -> None:
    (out / "sub").mkdir(parents=True)
    (out / "precious.txt").write_text("years of work")
    (out / "sub" / "thesis.tex").write_text("\\chapter{One}")


def _foreign_intact(out: Path) -> bool:
    return (
        (out / "precious.txt").read_text() == "years of work"
        and (out / "sub" / "thesis.tex").read_text() == "\\chapter{One}"
        and listing(out) == ["precious.txt", "sub", "sub/thesis.tex"]
    )


SYNTH = ["rows=300", "num_sparse=2", "max_cardinality=50"]


def test_overwrite_never_deletes_foreign_files(tmp_path):
    out = tmp_path / "mine"
    _foreign(out)
    src = tmp_path / "train.tsv"
    src.write_text(criteo_text(30))
    p = mlet("synth", "--output", str(out), "--overwrite", *SYNTH, cwd=tmp_path)
    one_error_line(p, str(out), "mlet did not write")
    p = mlet("convert", "criteo", "--input", str(src), "--output", str(out), "--overwrite", cwd=tmp_path)
    one_error_line(p, str(out), "mlet did not write")
    assert _foreign_intact(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "train.tsv"]


def test_refused_outputs(tmp_path):
    work = tmp_path / "work"
    (work / "in").mkdir(parents=True)
    src = work / "in" / "train.tsv"
    src.write_text(criteo_text(30))
    before = listing(tmp_path)
    for output, why in (
        (".", "the working directory"),
        (str(tmp_path), "a parent of the working directory"),
        ("/", "the file-system root"),
    ):
        one_error_line(mlet("synth", "--output", output, "--overwrite", *SYNTH, cwd=work), why)
        one_error_line(mlet("convert", "criteo", "--input", str(src), "--output", output, "--overwrite", cwd=work), why)
    for output, why in ((src, "is the input"), (work / "in", "contains the input")):
        one_error_line(
            mlet("convert", "criteo", "--input", str(src), "--output", str(output), "--overwrite", cwd=tmp_path),
            why,
            str(src),
        )
    assert listing(tmp_path) == before


def _kill_when_writing(cmd: Sequence[str], cwd: Path, out: Path, timeout: float = 120) -> None:
    """Start ``cmd``, SIGKILL it once its hidden temporary output holds a Parquet file (mid-write)."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a full pipe would stall the writer
        proc = subprocess.Popen([*MLET, *cmd], cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if any(any(t.rglob("*.parquet")) for t in out.parent.glob(f".{out.name}.mlet-tmp-*")):
                    break
                time.sleep(0.005)
            if proc.poll() is not None:
                err.seek(0)
                pytest.fail(f"the command ended before it could be killed: {err.read().decode()[-2000:]}")
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _same_dataset(out: Path, meta_before: str, files_before: list[str]) -> None:
    assert (out / METADATA_FILE).read_text() == meta_before and listing(out) == files_before
    assert not [p for p in out.rglob("*") if ".mlet-tmp-" in p.name or ".mlet-old-" in p.name]


@pytest.mark.slow
def test_sigkill_mid_write_keeps_the_previous_output(tmp_path):
    # synth: a long write (many small row groups), killed as soon as its first Parquet file exists
    out = tmp_path / "synth"
    assert mlet("synth", "--output", str(out), *SYNTH, cwd=tmp_path).returncode == 0
    meta, files = (out / METADATA_FILE).read_text(), listing(out)
    _kill_when_writing(
        [
            "synth",
            "--output",
            str(out),
            "--overwrite",
            "rows=400000",
            "num_sparse=2",
            "max_cardinality=50",
            "row_group_size=256",
            "row_groups_per_file=1",
            "seed=5",
        ],
        tmp_path,
        out,
    )
    _same_dataset(out, meta, files)
    assert list(tmp_path.glob(".synth.mlet-tmp-*")), "the killed write's temporary sibling should be hidden beside"
    # the next write sweeps the dead process's temporary directory and replaces the output
    assert mlet("synth", "--output", str(out), "--overwrite", *SYNTH, "seed=2", cwd=tmp_path).returncode == 0
    assert DatasetMeta.load(out).source["config"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]

    # convert: tiny text blocks and one-row-group files make a slow write of a small input
    src = tmp_path / "train.tsv"
    src.write_text(criteo_text(20_000))
    out = tmp_path / "criteo"
    fast = ["convert", "criteo", "--input", str(src), "--output", str(out), "--hash-buckets", "50"]
    assert mlet(*fast, "--rows-per-file", "5000", cwd=tmp_path).returncode == 0
    meta, files = (out / METADATA_FILE).read_text(), listing(out)
    _kill_when_writing(
        [
            *fast,
            "--overwrite",
            "--seed",
            "4",
            "--block-size-mb",
            "0.004",
            "--row-group-rows",
            "64",
            "--rows-per-file",
            "64",
        ],
        tmp_path,
        out,
    )
    _same_dataset(out, meta, files)
    assert json.loads((out / MARKER).read_text())["command"] == "convert criteo"
    # a killed first write (no previous output) leaves nothing under the output name
    fresh = tmp_path / "fresh"
    _kill_when_writing(
        [
            *fast[:5],
            str(fresh),
            "--hash-buckets",
            "50",
            "--block-size-mb",
            "0.004",
            "--row-group-rows",
            "64",
            "--rows-per-file",
            "64",
        ],
        tmp_path,
        fresh,
    )
    assert not fresh.exists()


# ---------------------------------------------------------------------------------- Parquet -> train


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory) -> Path:
    from data_pipes.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("bad_inputs") / "good"
    generate(
        SynthConfig(rows=2000, num_dense=2, num_sparse=3, max_cardinality=100, row_group_size=256, seed=3),
        out,
        progress=False,
    )
    return out


def _rewrite(path: Path, edit) -> None:
    t = pq.read_table(path)
    pq.write_table(edit(t), path, row_group_size=256)


def _set_column(t: pa.Table, name: str, values: np.ndarray) -> pa.Table:
    i = t.schema.get_field_index(name)
    return t.set_column(i, t.schema.field(i), pa.array(values, t.schema.field(i).type))


def _break_truncated(root: Path) -> list[str]:
    f = root / "train" / "part-00000.parquet"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ["train/part-00000.parquet", "truncated or corrupt"]


def _break_id_out_of_range(root: Path) -> list[str]:
    def edit(t: pa.Table) -> pa.Table:
        ids = t.column("C3").to_numpy().copy()
        ids[7] = 100_000
        return _set_column(t, "C3", ids)

    _rewrite(root / "train" / "part-00000.parquet", edit)
    return ["train/part-00000.parquet", "row 7", "'C3'", "100000 outside [0, 100)"]


def _break_label(root: Path) -> list[str]:
    def edit(t: pa.Table) -> pa.Table:
        labels = t.column("label").to_numpy().copy()
        labels[5] = 2.0
        return _set_column(t, "label", labels)

    _rewrite(root / "train" / "part-00000.parquet", edit)
    return ["train/part-00000.parquet", "row 5", "'label'", "not 0 or 1"]


def _break_schema(root: Path) -> list[str]:
    _rewrite(root / "train" / "part-00000.parquet", lambda t: t.drop_columns(["C2"]))
    return ["train/part-00000.parquet", "'C2'", "missing"]


def _break_dtype(root: Path) -> list[str]:
    def edit(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index("C1")
        return t.set_column(i, pa.field("C1", pa.float64()), t.column("C1").cast(pa.float64()))

    _rewrite(root / "train" / "part-00000.parquet", edit)
    return ["train/part-00000.parquet", "'C1'", "expected type int64"]


def _break_metadata(root: Path) -> list[str]:
    (root / METADATA_FILE).unlink()
    return [f"{root}/{METADATA_FILE}", "no metadata.json"]


TRAIN_CASES = [
    ("truncated parquet", _break_truncated),
    ("id out of range", _break_id_out_of_range),
    ("label not 0/1", _break_label),
    ("missing column", _break_schema),
    ("wrong column type", _break_dtype),
    ("missing metadata", _break_metadata),
]


@pytest.mark.slow
@pytest.mark.parametrize("breaker", [c[1] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_on_a_broken_dataset(tmp_path, good_dataset, breaker):
    data = tmp_path / "data"
    shutil.copytree(good_dataset, data)
    fragments = breaker(data)
    run_dir = tmp_path / "run"
    args = ["train", "--config", "tiny", f"data.path={data}", f"run.dir={run_dir}", "train.epochs=1"]
    p = mlet(*args, cwd=tmp_path)
    one_error_line(p, str(data), *fragments)
    # the run failed before its first checkpoint: its run directory is gone, not left half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"], listing(run_dir) if run_dir.exists() else ""


@pytest.mark.slow
def test_two_local_ranks_on_bad_ids_leave_no_run_directory(tmp_path, good_dataset):
    """A rank that meets a bad id mid-training fails the job with one line; the launcher's parent
    removes the run directory the job created, since it holds no checkpoint."""
    data = tmp_path / "data"
    shutil.copytree(good_dataset, data)
    fragments = _break_id_out_of_range(data)
    run_dir = tmp_path / "run"
    args = ["train", "--config", "tiny", f"data.path={data}", f"run.dir={run_dir}", "train.epochs=1"]
    p = mlet(*args, "--nproc-per-node", "2", cwd=tmp_path)
    one_error_line(p, str(data), *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"], listing(run_dir) if run_dir.exists() else ""
