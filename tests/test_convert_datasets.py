"""Avazu and MovieLens conversion of the real shared samples, checked against an independent count."""

from __future__ import annotations

import csv
import datetime as dt
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipes.convert.avazu import CATEGORICAL, convert_avazu
from data_pipes.convert.avazu import SPARSE as AVAZU_SPARSE
from data_pipes.convert.movielens import convert_movielens
from data_pipes.schema import DatasetMeta

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AVAZU = DATA / "avazu" / "sample_100.csv"
ML = DATA / "movielens_100k"
needs_avazu = pytest.mark.skipif(not AVAZU.is_file(), reason=f"shared sample data not found at {AVAZU}")
needs_ml = pytest.mark.skipif(not (ML / "ml-100k.inter").is_file(), reason=f"shared sample data not found at {ML}")


def read_split(root: Path, split: str) -> pa.Table:
    meta = DatasetMeta.load(root)
    return pa.concat_tables([pq.read_table(p) for p in meta.files(root, split)])


def check_schema(root: Path) -> DatasetMeta:
    meta = DatasetMeta.load(root)
    for split in meta.splits:
        for f in meta.files(root, split):
            assert pq.read_schema(f).equals(meta.arrow_schema())
    return meta


@needs_avazu
def test_avazu_sample_against_independent_count(tmp_path):
    with open(AVAZU, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 100
    out = tmp_path / "avazu"
    meta = convert_avazu(AVAZU, out, split=(1, 0, 0), min_count=1, progress=False).meta
    check_schema(out)
    assert meta.rows == {"train": 100} and meta.dense == [] and meta.sparse_names() == AVAZU_SPARSE
    assert "id" not in meta.sparse_names()
    hours = [dt.datetime.strptime(r["hour"], "%y%m%d%H") for r in rows]
    derived = {"hour_of_day": [h.hour for h in hours], "weekday": [h.weekday() for h in hours]}
    expected = {c: 1 + len({r[c] for r in rows}) for c in CATEGORICAL}
    expected.update({k: 1 + len(set(v)) for k, v in derived.items()})
    assert meta.cardinalities() == expected
    t = read_split(out, "train")
    assert t.column("label").to_pylist() == [float(r["click"]) for r in rows]
    for name in ["hour_of_day", "weekday", "device_ip", "C14"]:
        raw = derived[name] if name in derived else [r[name] for r in rows]
        pairs = set(zip(raw, t.column(name).to_pylist(), strict=True))
        assert len(pairs) == len(set(raw)) == len({i for _, i in pairs})  # value <-> id is one to one
    # default split: random 90% train, the rest valid/test; deterministic
    a = convert_avazu(AVAZU, tmp_path / "a", min_count=1, progress=False).meta
    b = convert_avazu(AVAZU, tmp_path / "b", min_count=1, progress=False).meta
    assert sum(a.rows.values()) == 100 and a.rows == b.rows and 80 <= a.rows["train"] <= 97
    clicks = sum(float(np.sum(read_split(tmp_path / "a", s).column("label").to_numpy())) for s in a.splits)
    assert clicks == sum(int(r["click"]) for r in rows)
    assert a.source["fractions"] == [0.9, 0.05, 0.05] and a.source["dropped_columns"] == ["id"]
    # min_count 2: rarer values share the OOV id 0
    c = convert_avazu(AVAZU, tmp_path / "c", split=(1, 0, 0), min_count=2, progress=False).meta
    counts = Counter(r["device_model"] for r in rows)
    assert c.cardinalities()["device_model"] == 1 + sum(1 for n in counts.values() if n >= 2)
    ids = read_split(tmp_path / "c", "train").column("device_model").to_pylist()
    assert [i == 0 for i in ids] == [counts[r["device_model"]] < 2 for r in rows]


@needs_ml
def test_movielens_sample_against_independent_count(tmp_path):
    def table(name):
        with open(ML / name, encoding="utf-8") as f:
            header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
            return [dict(zip(header, line.rstrip("\n").split("\t"), strict=True)) for line in f]

    inter, users, items = table("ml-100k.inter"), table("ml-100k.user"), table("ml-100k.item")
    users = {u["user_id"]: u for u in users}
    items = {i["item_id"]: i for i in items}
    out = tmp_path / "ml"
    res = convert_movielens(ML, out, split=(1, 0, 0), progress=False)
    meta = check_schema(out)
    assert meta.rows == {"train": 100_000} and res.rows_read == 100_000
    labels = [float(float(r["rating"]) >= 4) for r in inter]
    assert abs(np.mean(labels) - 0.554) < 0.001
    t = read_split(out, "train")
    assert t.column("label").to_pylist() == labels
    expected = {"user_id": 1 + len({r["user_id"] for r in inter}), "item_id": 1 + len({r["item_id"] for r in inter})}
    for col in ("age", "gender", "occupation", "zip_code"):
        expected[col] = 1 + len({users[r["user_id"]][col] for r in inter})
    expected["release_year"] = 1 + len({items[r["item_id"]]["release_year"] for r in inter})
    genres = {g for r in inter for g in (items[r["item_id"]]["class"].split() or [""])}
    expected["class"] = 1 + len(genres)
    assert meta.cardinalities() == expected
    assert [f.name for f in meta.sparse if f.multi_hot] == ["class"] and "movie_title" not in meta.sparse_names()
    assert expected["user_id"] == 944 and expected["gender"] == 3 and expected["occupation"] == 22
    bags = t.column("class").to_pylist()
    assert [len(b) for b in bags[:500]] == [max(1, len(items[r["item_id"]]["class"].split())) for r in inter[:500]]
    assert min(min(b) for b in bags) >= 1
    # default random split 0.8/0.1/0.1, seeded
    d = convert_movielens(ML, tmp_path / "d", seed=1, progress=False).meta
    assert sum(d.rows.values()) == 100_000 and abs(d.rows["train"] / 1e5 - 0.8) < 0.01
    assert d.cardinalities()["item_id"] <= expected["item_id"]  # counted on train rows only


@needs_ml
def test_movielens_dataset_is_readable_by_the_trainer_reader(tmp_path):
    reader_mod = pytest.importorskip("data_pipes.reader")
    out = tmp_path / "ml"
    meta = convert_movielens(ML, out, progress=False, rows_per_file=30_000, row_group_rows=10_000).meta
    assert len(meta.splits["train"]) == 3
    reader = reader_mod.ParquetBatchReader(out, "valid", 1024, drop_last=False)
    n = 0
    for batch in reader:
        n += batch.labels.shape[0]
    assert n == meta.rows["valid"]
    assert batch.sparse_features.keys() == meta.sparse_names()
