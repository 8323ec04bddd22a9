"""The feature transform artifact: converted twice (the second time ``--features-from`` the first), raw rows
get the same ids row by row; ``encode`` of raw rows gives the converter's ids; damage and misuse are refused."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipes.convert.avazu import COLUMNS as AVAZU_COLUMNS
from data_pipes.convert.avazu import convert_avazu
from data_pipes.convert.criteo import COLUMNS as CRITEO_COLUMNS
from data_pipes.convert.criteo import convert_criteo
from data_pipes.convert.movielens import convert_movielens
from data_pipes.convert.splits import assign_splits
from data_pipes.errors import DataError
from data_pipes.schema import SPLITS, DatasetMeta
from data_pipes.transform import REF_FILE, FeatureTransform, write_ref
from mlet_torchrec.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL = {
    "criteo": DATA / "criteo_kaggle" / "train.tsv",
    "avazu": DATA / "avazu" / "sample_100.csv",
    "movielens": DATA / "movielens_100k",
}
CONVERT: dict[str, Callable[..., object]] = {
    "criteo": convert_criteo,
    "avazu": convert_avazu,
    "movielens": convert_movielens,
}


def _criteo_raw(path: Path, n: int, rng: random.Random) -> list[dict[str, str]]:
    rows = []
    for _ in range(n):
        r = {"label": str(rng.randint(0, 1))}
        r.update({f"I{i}": rng.choice(["", "0", "-1", str(rng.randint(0, 500))]) for i in range(1, 14)})
        r.update({f"C{i}": rng.choice(["", f"{rng.randint(0, 3 * i):08x}"]) for i in range(1, 27)})
        rows.append(r)
    path.write_text("".join("\t".join(r[c] for c in CRITEO_COLUMNS) + "\n" for r in rows))
    return rows


def _avazu_raw(path: Path, n: int, rng: random.Random) -> list[dict[str, str]]:
    names = list(AVAZU_COLUMNS)
    rng.shuffle(names)  # the header may order the columns any way
    rows = []
    for k in range(n):
        r = {c: str(rng.randint(0, 9)) for c in AVAZU_COLUMNS}
        r.update(
            id=str(k),
            click=str(rng.randint(0, 1)),
            device_ip=str(rng.randint(0, 10**6)),
            hour=f"1410{rng.randint(21, 30):02d}{rng.randint(0, 23):02d}",
        )
        rows.append(r)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=names)
        w.writeheader()
        w.writerows(rows)
    return rows


def _movielens_raw(root: Path, n: int, rng: random.Random) -> list[dict[str, str]]:
    root.mkdir()
    users = {str(u): {"age": str(rng.randint(1, 5)), "gender": rng.choice("MF")} for u in range(1, 201)}
    items = {str(i): {"class": rng.choice(["Action", "Action Comedy", "", "Drama"])} for i in range(1, 41)}
    (root / "g.user").write_text(
        "user_id:token\tage:token\tgender:token\n"
        + "".join(f"{u}\t{v['age']}\t{v['gender']}\n" for u, v in users.items())
    )
    (root / "g.item").write_text(
        "item_id:token\tclass:token_seq\n" + "".join(f"{i}\t{v['class']}\n" for i, v in items.items())
    )
    inter = [(rng.choice(list(users)), rng.choice(list(items)), str(rng.randint(1, 5))) for _ in range(n)]
    (root / "g.inter").write_text(
        "user_id:token\titem_id:token\trating:float\n" + "".join("\t".join(t) + "\n" for t in inter)
    )
    return [{"user_id": u, "item_id": i, "rating": r, **users[u], **items[i]} for u, i, r in inter]


GENERATORS = {"criteo": _criteo_raw, "avazu": _avazu_raw, "movielens": _movielens_raw}
SUFFIX = {"criteo": "g.tsv", "avazu": "g.csv", "movielens": "ml"}


def _read(root: Path, split: str) -> pa.Table:
    meta = DatasetMeta.load(root)
    return pa.concat_tables([pq.read_table(p) for p in meta.files(root, split)])


def _ids(table: pa.Table, names: list[str]) -> list[list[object]]:
    return [table.column(n).to_pylist() for n in names]


def _convert_twice(kind: str, raw: Path, tmp: Path, **opts: object) -> tuple[Path, Path, FeatureTransform]:
    first, second = tmp / "first", tmp / "second"
    CONVERT[kind](raw, first, progress=False, **opts)
    CONVERT[kind](raw, second, progress=False, features_from=first, split_name="valid")
    t = FeatureTransform.load(first)
    assert FeatureTransform.load(second).identity == t.identity
    return first, second, t


def _check_same_ids(first: Path, second: Path, t: FeatureTransform) -> pa.Table:
    """Every row of ``second`` (all in its valid split, input order) has the ids ``first`` gave it."""
    meta = DatasetMeta.load(first)
    again = _read(second, "valid")
    assert DatasetMeta.load(second).rows == {"valid": again.num_rows}
    assert DatasetMeta.load(second).cardinalities() == meta.cardinalities()
    codes = assign_splits(tuple(meta.source["fractions"]), 0, 0, 0, again.num_rows)  # type: ignore[arg-type]
    names = ["label"] + t.dense_names + t.sparse_names
    for code, split in enumerate(SPLITS):
        if split in meta.splits:
            part = again.filter(pa.array(codes == code))
            assert _ids(part, names) == _ids(_read(first, split), names)
    return again


def _check_encode(t: FeatureTransform, rows: list[dict[str, str]], converted: pa.Table) -> None:
    enc = t.encode(rows)
    assert enc.dense.dtype == np.float32 and enc.sparse.dtype == np.int64
    assert enc.dense.shape == (len(rows), len(t.dense_names))
    for j, name in enumerate(t.dense_names):
        assert np.array_equal(enc.dense[:, j], converted.column(name).to_numpy())
    for j, name in enumerate(enc.sparse_names):
        assert enc.sparse[:, j].tolist() == converted.column(name).to_pylist()
    for name, (lengths, ids) in enc.bags.items():
        bags = converted.column(name).to_pylist()
        assert lengths.tolist() == [len(b) for b in bags] and ids.tolist() == [i for b in bags for i in b]


@pytest.mark.parametrize("kind", ["criteo", "avazu", "movielens"])
def test_generated_raw_rows_get_the_same_ids_twice_and_from_encode(kind, tmp_path):
    raw = tmp_path / SUFFIX[kind]
    rows = GENERATORS[kind](raw, 300, random.Random(7))
    first, second, t = _convert_twice(kind, raw, tmp_path, min_count=2)
    again = _check_same_ids(first, second, t)
    _check_encode(t, rows, again)
    assert any(0 in col for col in _ids(again, t.sparse_names))  # min_count 2 left OOV values


@pytest.mark.parametrize("kind", ["criteo", "avazu", "movielens"])
def test_real_raw_files_get_the_same_ids_twice(kind, tmp_path):
    if not REAL[kind].exists():
        pytest.skip(f"shared sample data not found at {REAL[kind]}")
    first, second, t = _convert_twice(kind, REAL[kind], tmp_path, min_count=2)
    _check_same_ids(first, second, t)
    if kind == "criteo":
        lines = REAL[kind].read_text().splitlines()[:500]
        rows = [dict(zip(CRITEO_COLUMNS, ln.split("\t"), strict=True)) for ln in lines]
        _check_encode(t, rows, _read(second, "valid").slice(0, 500))


def test_unseen_values_are_oov_and_bad_rows_are_named(tmp_path):
    raw = tmp_path / "g.tsv"
    _criteo_raw(raw, 100, random.Random(1))
    convert_criteo(raw, tmp_path / "d", min_count=1, progress=False)
    t = FeatureTransform.load(tmp_path / "d")
    enc = t.encode([{"C1": "never-seen", "I1": "7"}, {}])
    assert enc.sparse[0, 0] == 0 and enc.dense[0, 0] == pytest.approx(np.log1p(7.0))
    assert enc.dense[1].tolist() == [0.0] * 13
    with pytest.raises(DataError, match=r"^row 1: unknown column 'C99'"):
        t.encode([{"C1": "a"}, {"C99": "b"}])
    with pytest.raises(DataError, match=r"row 2, column I4: 'x' is not a number"):
        t.encode([{}, {}, {"I4": "x"}])
    for value, shown in [(5, "5"), (None, "null"), (float("nan"), "NaN"), ([1], r"\[1\]")]:
        expected = rf"^row 0, column C2: {shown} is not a string \(send raw values as strings\)$"
        with pytest.raises(DataError, match=expected):
            t.encode([{"C2": value}])  # type: ignore[dict-item]


def test_damaged_missing_or_foreign_transforms_are_refused(tmp_path):
    raw = tmp_path / "g.tsv"
    _criteo_raw(raw, 60, random.Random(2))
    convert_criteo(raw, tmp_path / "d", min_count=1, progress=False)
    t = FeatureTransform.load(tmp_path / "d")
    # a run's pointer is followed and checked
    run = tmp_path / "run"
    run.mkdir()
    write_ref(run, tmp_path / "d", t.identity)
    assert FeatureTransform.load(run).identity == t.identity
    (run / REF_FILE).write_text(json.dumps({"identity": "0" * 64, "path": str(tmp_path / "d")}))
    with pytest.raises(DataError, match="the run was trained with 000000000000"):
        FeatureTransform.load(run)
    # a changed vocabulary file
    keys = tmp_path / "d" / "transform" / "vocab" / "003.keys.npy"
    keys.write_bytes(keys.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(DataError, match="003.keys.npy: sha256 differs"):
        FeatureTransform.load(tmp_path / "d")
    # an Avazu transform cannot encode Criteo text; --features-from a directory without a transform
    avazu = tmp_path / "a.csv"
    _avazu_raw(avazu, 40, random.Random(3))
    convert_avazu(avazu, tmp_path / "a", progress=False)
    with pytest.raises(DataError, match="--features-from .*: its transform encodes avazu features"):
        convert_criteo(raw, tmp_path / "x", features_from=tmp_path / "a", progress=False)
    with pytest.raises(UserError, match="no feature transform .*: only a data set made by `mlet convert` has one"):
        convert_criteo(raw, tmp_path / "y", features_from=tmp_path, progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_convert_cli_features_from(tmp_path, capsys):
    from mlet_torchrec.cli.convert import main

    raw = tmp_path / "g.tsv"
    _criteo_raw(raw, 80, random.Random(4))
    base = ["criteo", "--input", str(raw), "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "d"), "--min-count", "1"]) == 0
    capsys.readouterr()
    args = [*base, "--output", str(tmp_path / "n"), "--features-from", str(tmp_path / "d")]
    assert main([*args, "--hash-buckets", "9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "convert criteo: error: --features-from takes the ids from its transform and writes every row "
        "to --split-name; drop --hash-buckets"
    ]
    assert main([*args, "--split-name", "train"]) == 0
    assert DatasetMeta.load(tmp_path / "n").rows == {"train": 80}
    assert DatasetMeta.load(tmp_path / "n").source["features_from"] == str(tmp_path / "d")
