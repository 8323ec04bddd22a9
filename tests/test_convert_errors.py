"""Bad inputs: one clear DataError naming file, row and column; nothing left behind; lenient mode; CLI."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipes.convert.avazu import COLUMNS as AVAZU_COLUMNS
from data_pipes.convert.avazu import convert_avazu
from data_pipes.convert.criteo import convert_criteo
from data_pipes.convert.movielens import convert_movielens
from data_pipes.errors import DataError
from data_pipes.schema import DatasetMeta

ROOT = Path(__file__).resolve().parents[1]


def criteo_line(label="0", dense=None, cats=None) -> str:
    dense = dense or [str(i) for i in range(1, 14)]
    cats = cats or [f"{i:08x}" for i in range(26)]
    return "\t".join([label, *dense, *cats]) + "\n"


def with_dense(col: int, value: str, label: str = "1") -> str:
    dense = [str(i) for i in range(1, 14)]
    dense[col - 1] = value
    return criteo_line(label=label, dense=dense)


def write(path: Path, lines: list[str], mode: str = "w") -> Path:
    if mode == "wb":
        path.write_bytes(b"".join(lines))
    else:
        path.write_text("".join(lines))
    return path


def assert_nothing_left(workdir: Path, inputs: list[str]) -> None:
    assert sorted(p.name for p in workdir.iterdir()) == sorted(inputs), "output or temporary dirs left behind"


GOOD = [criteo_line(label=str(i % 2)) for i in range(5)]

CRITEO_CASES = [
    # (id, lines, message regex)
    (
        "too few columns",
        GOOD[:2] + [criteo_line()[:-1].rsplit("\t", 1)[0] + "\n"] + GOOD[2:],
        r"row 3: expected 40 tab-separated columns, got 39 \(no label column",
    ),
    (
        "too many columns",
        GOOD[:3] + [criteo_line()[:-1] + "\textra\n"] + GOOD,
        r"row 4: expected 40 tab-separated columns, got 41",
    ),
    ("empty line", GOOD[:1] + ["\n"] + GOOD, r"row 2, column label: empty value is not 0 or 1"),
    ("non-numeric dense", GOOD[:1] + [with_dense(5, "abc")] + GOOD, r"row 2, column I5: 'abc' is not a number"),
    ("comma decimal", GOOD + [with_dense(13, "1,5")], r"row 6, column I13: '1,5' is not a number"),
    ("label 2", GOOD[:3] + [criteo_line(label="2")], r"row 4, column label: '2' is not 0 or 1"),
    ("label empty", GOOD[:3] + [criteo_line(label="")], r"row 4, column label: empty value is not 0 or 1"),
    ("label 1.0", [criteo_line(label="1.0")], r"row 1, column label: '1.0' is not 0 or 1"),
    ("nan dense", GOOD + [with_dense(2, "nan")], r"row 6, column I2: 'nan' is not finite"),
    ("inf dense", GOOD + [with_dense(3, "-inf")], r"row 6, column I3: '-inf' is not finite"),
    ("overflow dense", GOOD + [with_dense(4, "1e999")], r"row 6, column I4: '1e999' is not finite"),
    ("empty file", [], r"file is empty"),
]


@pytest.mark.parametrize("lines,pattern", [c[1:] for c in CRITEO_CASES], ids=[c[0] for c in CRITEO_CASES])
def test_criteo_bad_input(tmp_path, lines, pattern):
    src = write(tmp_path / "bad.tsv", lines)
    with pytest.raises(DataError, match=r"^criteo .*bad\.tsv: " + pattern) as info:
        convert_criteo(src, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value)
    assert_nothing_left(tmp_path, ["bad.tsv"])


def test_criteo_first_error_of_the_file_is_reported_with_its_line_across_blocks(tmp_path):
    lines = [criteo_line(label=str(i % 2)) for i in range(3000)]
    lines[1233] = with_dense(9, "x1")
    lines[2500] = criteo_line(label="7")
    src = write(tmp_path / "big.tsv", lines)
    # tiny blocks: the bad rows are in later blocks, and the line numbers must still be exact
    with pytest.raises(DataError, match=r"big\.tsv: row 1234, column I9: 'x1' is not a number"):
        convert_criteo(src, tmp_path / "deep" / "out", progress=False, block_size=8192)
    lines[1233] = lines[0]
    write(src, lines)
    with pytest.raises(DataError, match=r"row 2501, column label: '7' is not 0 or 1"):
        convert_criteo(src, tmp_path / "deep" / "out", progress=False, block_size=8192)
    lines[2500] = "\t".join(["0"] * 5) + "\n"
    write(src, lines)
    with pytest.raises(DataError, match=r"row 2501: expected 40 tab-separated columns, got 5"):
        convert_criteo(src, tmp_path / "deep" / "out", progress=False, block_size=8192)
    assert_nothing_left(tmp_path, ["big.tsv"])  # the parent dirs made for the output are gone too


def test_criteo_bad_utf8_and_gzip(tmp_path):
    good = "".join(GOOD).encode()
    src = write(tmp_path / "bin.tsv", [good, with_dense(1, "9").encode().replace(b"\t9\t", b"\t\xff\t", 1)], "wb")
    with pytest.raises(DataError, match=r"bin\.tsv: row 6: text is not valid UTF-8"):
        convert_criteo(src, tmp_path / "out", progress=False)
    gz = tmp_path / "day.gz"
    gz.write_bytes(gzip.compress(good + with_dense(7, "?").encode()))
    with pytest.raises(DataError, match=r"day\.gz: row 6, column I7: '\?' is not a number"):
        convert_criteo(gz, tmp_path / "out", progress=False)
    trunc = tmp_path / "trunc.gz"
    trunc.write_bytes(gzip.compress(good * 50)[:-30])
    with pytest.raises(DataError, match=r"trunc\.gz: cannot read"):
        convert_criteo(trunc, tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, ["bin.tsv", "day.gz", "trunc.gz"])


def test_criteo_errors_in_valid_file_and_missing_paths(tmp_path):
    train = write(tmp_path / "train.tsv", GOOD)
    valid = write(tmp_path / "valid.tsv", GOOD[:2] + [with_dense(11, "--")])
    with pytest.raises(DataError, match=r"criteo .*valid\.tsv: row 3, column I11: '--' is not a number"):
        convert_criteo(train, tmp_path / "out", valid=valid, progress=False)
    with pytest.raises(DataError, match=r"criteo .*nope\.tsv: no such file"):
        convert_criteo(train, tmp_path / "out", test=tmp_path / "nope.tsv", progress=False)
    with pytest.raises(DataError, match=r"criteo .*missing: no such file or directory"):
        convert_criteo(tmp_path / "missing", tmp_path / "out", progress=False)
    days = tmp_path / "days"
    days.mkdir()
    write(days / "day_0", GOOD)
    with pytest.raises(DataError, match=r"at least two day_N files"):
        convert_criteo(days, tmp_path / "out", progress=False)
    write(days / "day_1", [])
    with pytest.raises(DataError, match=r"day_1: file is empty"):
        convert_criteo(days, tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, ["train.tsv", "valid.tsv", "days"])


def test_criteo_bad_options(tmp_path):
    src = write(tmp_path / "a.tsv", GOOD)
    for kwargs, pattern in [
        (dict(split=(0.5, 0.5, 0.5)), "summing to 1"),
        (dict(min_count=0), "--min-count"),
        (dict(hash_buckets=1), ">= 2"),
        (dict(hash_buckets={"C1": "x"}), "integer"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            convert_criteo(src, tmp_path / "out", progress=False, **kwargs)
    assert_nothing_left(tmp_path, ["a.tsv"])


def test_criteo_lenient_counts_and_maps_bad_values(tmp_path):
    lines = [criteo_line(label=str(i % 2)) for i in range(20)]
    lines[2] = with_dense(5, "abc")
    lines[3] = with_dense(5, "nan")
    lines[4] = with_dense(1, "inf")
    lines[5] = criteo_line(label="x")
    lines[6] = "1\t2\t3\n"
    lines[7] = "\n"
    src = write(tmp_path / "mixed.tsv", lines)
    with pytest.raises(DataError):
        convert_criteo(src, tmp_path / "strict", progress=False)
    res = convert_criteo(src, tmp_path / "out", lenient=True, split=(1, 0, 0), min_count=1, progress=False)
    meta = res.meta
    lenient = meta.source["lenient"]
    assert lenient["values_replaced"] == {"I5": {"not a number": 1, "not finite": 1}, "I1": {"not finite": 1}}
    assert lenient["rows_dropped"] == {"label": {"not 0 or 1": 2}, "row": {"wrong number of columns (expected 40)": 1}}
    assert lenient["total_values_replaced"] == 3 and lenient["total_rows_dropped"] == 3
    assert meta.rows["train"] == 17
    t = pq.read_table(tmp_path / "out" / meta.splits["train"][0])
    i5 = t.column("I5").to_numpy()
    assert i5[2] == 0.0 and i5[3] == 0.0 and i5[0] == pytest.approx(np.log1p(5))
    assert "lenient: 3 values replaced (I5: 2, I1: 1), 3 rows dropped (label: 2, row: 1)" in res.summary()
    assert json.loads((tmp_path / "out" / "metadata.json").read_text())["source"]["lenient"] == lenient


# ------------------------------------------------------------------------------------- avazu

AVAZU_HEADER = ",".join(AVAZU_COLUMNS) + "\n"


def avazu_line(click="0", hour="14102100", id_="1") -> str:
    return ",".join([id_, click, hour] + [f"v{i}" for i in range(21)]) + "\n"


AVAZU_CASES = [
    (
        "bad hour",
        [AVAZU_HEADER, avazu_line(), avazu_line(hour="14102124")],
        r"row 3, column hour: '14102124' is not an hour YYMMDDHH",
    ),
    (
        "impossible date",
        [AVAZU_HEADER, avazu_line(hour="14022900")],
        r"row 2, column hour: '14022900' is not an hour YYMMDDHH",
    ),
    ("short hour", [AVAZU_HEADER, avazu_line(hour="1410210")], r"row 2, column hour: '1410210' is not an hour"),
    (
        "click 2",
        [AVAZU_HEADER, avazu_line(), avazu_line(), avazu_line(click="2")],
        r"row 4, column click: '2' is not 0 or 1",
    ),
    (
        "columns",
        [AVAZU_HEADER, avazu_line(), "1,0,14102100,a,b\n"],
        r"row 3: expected 24 comma-separated columns, got 5",
    ),
    ("header only", [AVAZU_HEADER], r"file has a header but no data rows"),
    (
        "no click column",
        [AVAZU_HEADER.replace("click,", ""), "1,14102100," + ",".join("v" * 21) + "\n"],
        r"row 1: the header lacks column\(s\) \['click'\] \(Avazu's unlabelled test file",
    ),
    ("unknown column", [AVAZU_HEADER.replace("C21", "C22")], r"row 1: the header lacks column\(s\) \['C21'\]"),
    ("empty", [], r"file is empty"),
]


@pytest.mark.parametrize("lines,pattern", [c[1:] for c in AVAZU_CASES], ids=[c[0] for c in AVAZU_CASES])
def test_avazu_bad_input(tmp_path, lines, pattern):
    src = write(tmp_path / "train.csv", lines)
    with pytest.raises(DataError, match=r"^avazu .*train\.csv: " + pattern):
        convert_avazu(src, tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, ["train.csv"])


def test_avazu_lenient_bad_hour_is_oov(tmp_path):
    lines = [AVAZU_HEADER] + [avazu_line(click=str(i % 2), hour=f"141021{i % 24:02d}") for i in range(30)]
    lines[5] = avazu_line(hour="99999999")
    src = write(tmp_path / "train.csv", lines)
    meta = convert_avazu(src, tmp_path / "out", lenient=True, split=(1, 0, 0), min_count=1, progress=False).meta
    assert meta.source["lenient"]["values_replaced"] == {"hour": {"not an hour YYMMDDHH": 1}}
    t = pq.read_table(tmp_path / "out" / "train")
    assert t.column("hour_of_day").to_pylist()[4] == 0 and t.column("weekday").to_pylist()[4] == 0
    assert min(t.column("hour_of_day").to_pylist()[:4]) >= 1


# ------------------------------------------------------------------------------------- movielens


def ml_dir(tmp_path: Path, inter: list[str], user: list[str] = None, item: list[str] = None) -> Path:
    d = tmp_path / "ml"
    d.mkdir()
    write(d / "ml.inter", ["user_id:token\titem_id:token\trating:float\ttimestamp:float\n"] + inter)
    if user is not None:
        write(d / "ml.user", ["user_id:token\tage:token\tgender:token\n"] + user)
    if item is not None:
        write(d / "ml.item", ["item_id:token\tmovie_title:token_seq\tclass:token_seq\n"] + item)
    return d


USERS = ["1\t20\tM\n", "2\t30\tF\n"]
ITEMS = ["10\tToy Story\tAnimation Comedy\n", "11\tHeat\tAction\n"]

ML_CASES = [
    (
        "rating text",
        ["1\t10\t5\t0\n", "2\t11\tgood\t0\n"],
        USERS,
        ITEMS,
        r"ml\.inter: row 3, column rating: 'good' is not a number",
    ),
    ("rating nan", ["1\t10\tNaN\t0\n"], USERS, ITEMS, r"ml\.inter: row 2, column rating: 'NaN' is not finite"),
    ("rating empty", ["1\t10\t\t0\n"], USERS, ITEMS, r"ml\.inter: row 2, column rating: empty value is not a rating"),
    (
        "unknown user",
        ["1\t10\t5\t0\n", "3\t10\t5\t0\n"],
        USERS,
        ITEMS,
        r"ml\.inter: row 3, column user_id: '3' is not in ml\.user",
    ),
    ("unknown item", ["1\t12\t5\t0\n"], USERS, ITEMS, r"ml\.inter: row 2, column item_id: '12' is not in ml\.item"),
    (
        "duplicate user",
        ["1\t10\t5\t0\n"],
        USERS + ["1\t40\tF\n"],
        ITEMS,
        r"ml\.user: row 4, column user_id: '1' repeats row 2",
    ),
    ("columns", ["1\t10\t5\n"], USERS, ITEMS, r"ml\.inter: row 2: expected 4 tab-separated columns, got 3"),
    ("no data", [], USERS, ITEMS, r"ml\.inter: file has a header but no data rows"),
]


@pytest.mark.parametrize("inter,user,item,pattern", [c[1:] for c in ML_CASES], ids=[c[0] for c in ML_CASES])
def test_movielens_bad_input(tmp_path, inter, user, item, pattern):
    d = ml_dir(tmp_path, inter, user, item)
    with pytest.raises(DataError, match=r"^movielens .*" + pattern):
        convert_movielens(d, tmp_path / "out", progress=False)
    assert_nothing_left(tmp_path, ["ml"])


def test_movielens_missing_column_and_lenient_unknown_user(tmp_path):
    d = tmp_path / "m2"
    d.mkdir()
    write(d / "x.inter", ["user_id:token\tscore:float\n", "1\t3\n"])
    with pytest.raises(DataError, match=r"x\.inter: row 1: the header lacks column\(s\) \['item_id', 'rating'\]"):
        convert_movielens(d, tmp_path / "out", progress=False)
    d = ml_dir(tmp_path, ["1\t10\t5\t0\n", "9\t11\t2\t0\n", "2\t11\t4\t0\n"], USERS, ITEMS)
    meta = convert_movielens(d, tmp_path / "out", lenient=True, split=(1, 0, 0), progress=False).meta
    assert meta.source["lenient"]["values_replaced"] == {"user_id": {"not in ml.user": 1}}
    t = pq.read_table(tmp_path / "out" / "train")
    assert t.column("age").to_pylist()[1] == 0 and t.column("gender").to_pylist()[1] == 0
    assert t.column("user_id").to_pylist()[1] > 0  # the id itself is a fine value
    assert t.column("label").to_pylist() == [1.0, 0.0, 1.0]


# ------------------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlet_torchrec.cli.convert", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_bad_input_one_line_no_traceback(tmp_path):
    src = write(tmp_path / "bad.tsv", GOOD[:1] + [with_dense(5, "abc")])
    p = run_cli("criteo", "--input", str(src), "--output", str(tmp_path / "out"))
    assert p.returncode == 2
    assert p.stderr.strip() == f"convert criteo: error: criteo {src}: row 2, column I5: 'abc' is not a number"
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert_nothing_left(tmp_path, ["bad.tsv"])
    p = run_cli("criteo", "--input", str(src), "--output", str(tmp_path / "out"), "--hash-buckets", "C1=zz")
    assert p.returncode == 2 and "expected N or FEATURE=N" in p.stderr


def test_cli_good_input_and_lenient(tmp_path):
    src = write(tmp_path / "ok.tsv", GOOD * 4 + [with_dense(5, "abc")])
    p = run_cli(
        "criteo",
        "--input",
        str(src),
        "--output",
        str(tmp_path / "out"),
        "--min-count",
        "1",
        "--split",
        "1",
        "0",
        "0",
        "--hash-buckets",
        "C1=7",
        "C2=9",
        "--lenient",
        "--seed",
        "3",
    )
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.strip().splitlines()) == 1
    assert (
        p.stdout.startswith("criteo: 21 rows -> ")
        and "lenient: 1 values replaced (I5: 1), 0 rows dropped (details" in p.stdout
    )
    meta = DatasetMeta.load(tmp_path / "out")
    assert meta.cardinalities()["C1"] == 7 and meta.cardinalities()["C2"] == 9 and meta.source["options"]["seed"] == 3


def test_register_adds_convert_subcommand(tmp_path):
    import argparse

    from mlet_torchrec.cli.convert import bucket_spec, buckets_dict, register

    parser = argparse.ArgumentParser(prog="mlet")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "convert",
            "avazu",
            "--input",
            "a.csv",
            "--output",
            "o",
            "--hash-buckets",
            "100",
            "site_id=5",
            "--split",
            "0.9",
            "0",
            "0.1",
        ]
    )
    assert args.command == "convert" and args.dataset == "avazu" and args.min_count == 5
    assert buckets_dict(args.hash_buckets) == {"*": 100, "site_id": 5} and args.split == [0.9, 0.0, 0.1]
    assert callable(args.func)
    assert bucket_spec("C1=10") == ("C1", 10) and bucket_spec("7") == ("*", 7)
    for bad in ("C1=", "=3", "x", "C1=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bucket_spec(bad)
    with pytest.raises(ValueError, match="twice"):
        buckets_dict([("C1", 3), ("C1", 4)])
