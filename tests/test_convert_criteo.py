"""Criteo conversion: the real shared sample against an independent count, a synthetic round trip,
the random, explicit and time (day_N) splits, hashing, compressed input and the Parquet layout."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipes.convert.criteo import COLUMNS, DENSE, SPARSE, convert_criteo
from data_pipes.convert.vocab import HashEncoder, hash_strings
from data_pipes.schema import DatasetMeta
from mlet_torchrec.io import MARKER, OutputError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CRITEO = DATA / "criteo_kaggle"
needs_data = pytest.mark.skipif(
    not (CRITEO / "train.tsv").is_file(),
    reason=f"shared sample data not found at {CRITEO} (../shared/data beside the repo)",
)


def read_rows(path: Path) -> list[list[str]]:
    """Independent reader: plain Python line splitting."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f]


def read_split(root: Path, split: str) -> pa.Table:
    meta = DatasetMeta.load(root)
    return pa.concat_tables([pq.read_table(p) for p in meta.files(root, split)])


def check_layout(root: Path) -> DatasetMeta:
    """Every file has exactly the metadata's schema, ids lie in [0, cardinality), rows add up."""
    meta = DatasetMeta.load(root)
    schema = meta.arrow_schema()
    card = meta.cardinalities()
    for split, files in meta.splits.items():
        n = 0
        for rel in files:
            f = root / rel
            assert pq.read_schema(f).equals(schema), f
            t = pq.read_table(f)
            n += t.num_rows
            lab = t.column("label").to_numpy()
            assert set(np.unique(lab)) <= {0.0, 1.0}
            for name in meta.dense:
                assert np.isfinite(t.column(name).to_numpy()).all()
            for name in meta.sparse_names():
                ids = t.column(name).combine_chunks()
                if pa.types.is_list(ids.type):
                    ids = ids.flatten()
                ids = ids.to_numpy()
                assert ids.min() >= 0 and ids.max() < card[name], name
        assert n == meta.rows[split]
    assert not [p for p in root.parent.iterdir() if p.name.startswith(f".{root.name}.")], "temporary dirs left"
    return meta


def expected_dense(value: str) -> float:
    return float(np.float32(math.log1p(max(float(value), 0.0)))) if value != "" else 0.0


# ------------------------------------------------------------------------------------- real sample


@needs_data
@pytest.mark.parametrize("min_count", [1, 3])
def test_real_sample_explicit_splits_match_independent_count(tmp_path, min_count):
    out = tmp_path / "criteo"
    res = convert_criteo(
        CRITEO / "train.tsv",
        out,
        valid=CRITEO / "valid.tsv",
        test=CRITEO / "test.tsv",
        min_count=min_count,
        progress=False,
    )
    meta = check_layout(out)
    rows = {s: read_rows(CRITEO / f"{s}.tsv") for s in ("train", "valid", "test")}
    assert meta.rows == {s: len(r) for s, r in rows.items()} == {"train": 7200, "valid": 409, "test": 391}
    assert res.rows_read == 8000
    train_counts = [Counter(r[14 + j] for r in rows["train"]) for j in range(26)]
    expected_card = {c: 1 + sum(1 for n in train_counts[j].values() if n >= min_count) for j, c in enumerate(SPARSE)}
    assert meta.cardinalities() == expected_card
    for split, raw in rows.items():
        t = read_split(out, split)  # explicit files keep their row order
        labels = [int(r[0]) for r in raw]
        assert t.column("label").to_pylist() == labels
        assert float(np.mean(t.column("label").to_numpy().astype(np.float64))) == pytest.approx(
            np.mean(labels), abs=1e-12
        )
        for j, name in enumerate(DENSE[:4]):
            np.testing.assert_allclose(t.column(name).to_numpy(), [expected_dense(r[1 + j]) for r in raw], rtol=1e-6)
        for j, name in enumerate(SPARSE):
            ids = t.column(name).to_pylist()
            kept = {v for v, n in train_counts[j].items() if n >= min_count}
            # an id is 0 exactly when the value is not in the train vocabulary; otherwise value <-> id is 1:1
            assert [i == 0 for i in ids] == [r[14 + j] not in kept for r in raw], name
            pairs = {(r[14 + j], i) for r, i in zip(raw, ids, strict=True) if i != 0}
            assert len(pairs) == len({v for v, _ in pairs}) == len({i for _, i in pairs})
    # ids are ranked by train frequency: id 1 is the most frequent value
    t = read_split(out, "train")
    for j, name in enumerate(SPARSE[:5]):
        top_value, _ = train_counts[j].most_common(1)[0]
        ids = t.column(name).to_pylist()
        assert ids[[r[14 + j] for r in rows["train"]].index(top_value)] == 1
    assert meta.source["features"]["C3"]["distinct_in_train"] == len(train_counts[2])
    assert meta.source["inputs"][1]["split"] == "valid"


@needs_data
def test_real_sample_random_split_is_seeded(tmp_path):
    raw = read_rows(CRITEO / "train.tsv")
    a = convert_criteo(CRITEO / "train.tsv", tmp_path / "a", seed=7, min_count=2, progress=False).meta
    b = convert_criteo(CRITEO / "train.tsv", tmp_path / "b", seed=7, min_count=2, progress=False).meta
    c = convert_criteo(CRITEO / "train.tsv", tmp_path / "c", seed=8, min_count=2, progress=False).meta
    check_layout(tmp_path / "a")
    assert sum(a.rows.values()) == len(raw) == 7200
    for s, frac in zip(("train", "valid", "test"), (0.8, 0.1, 0.1), strict=True):
        assert abs(a.rows[s] / 7200 - frac) < 0.03
    assert a.rows == b.rows and a.cardinalities() == b.cardinalities()
    for s in a.splits:
        assert read_split(tmp_path / "a", s).equals(read_split(tmp_path / "b", s))
    assert a.rows != c.rows
    positives = sum(float(np.sum(read_split(tmp_path / "a", s).column("label").to_numpy())) for s in a.splits)
    assert positives == sum(int(r[0]) for r in raw)
    # the vocabulary is counted on the train rows only: the cardinality is below the all-rows count
    all_rows = 1 + sum(1 for n in Counter(r[14 + 2] for r in raw).values() if n >= 2)
    assert a.cardinalities()["C3"] < all_rows
    assert a.source["fractions"] == [0.8, 0.1, 0.1] and "random" in a.source["split_rule"]


# ------------------------------------------------------------------------------------- synthetic


def synthetic_rows(n: int, seed: int = 0, day: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        r = [str(int(rng.random() < 0.3))]
        for _ in range(13):
            r.append("" if rng.random() < 0.2 else str(int(rng.integers(-3, 5000))))
        for j in range(26):
            r.append("" if rng.random() < 0.1 else f"{int(rng.integers(0, 3 + 5 * j)):08x}")
        r[14] = f"d{day:07d}"  # C1 marks the day
        rows.append(r)
    return rows


def write_rows(path: Path, rows: list[list[str]], compress: bool = False) -> Path:
    text = "".join("\t".join(r) + "\n" for r in rows).encode()
    if compress:
        path.write_bytes(gzip.compress(text))
    else:
        path.write_bytes(text)
    return path


def test_synthetic_round_trip_multiple_files_and_row_groups(tmp_path):
    rows = synthetic_rows(3000, seed=1)
    src = write_rows(tmp_path / "syn.tsv", rows)
    out = tmp_path / "out"
    res = convert_criteo(
        src,
        out,
        split=(1, 0, 0),
        min_count=1,
        progress=False,
        block_size=16 << 10,
        rows_per_file=1000,
        row_group_rows=300,
    )
    meta = check_layout(out)
    assert meta.splits == {"train": [f"train/part-00000-{i:05d}.parquet" for i in range(3)]}  # one shard
    assert [pq.ParquetFile(out / f).metadata.num_row_groups for f in meta.splits["train"]] == [4, 4, 4]
    t = read_split(out, "train")
    assert t.num_rows == 3000 and res.rows_read == 3000
    assert t.column("label").to_pylist() == [float(r[0]) for r in rows]
    for j, name in enumerate(DENSE):
        np.testing.assert_allclose(t.column(name).to_numpy(), [expected_dense(r[1 + j]) for r in rows], rtol=1e-6)
    for j, name in enumerate(SPARSE):
        ids = t.column(name).to_numpy()
        values = [r[14 + j] for r in rows]
        assert ids.min() >= 1  # every value is in the vocabulary (min_count 1, all rows train)
        assert len({(v, i) for v, i in zip(values, ids, strict=True)}) == len(set(values)) == len(set(ids.tolist()))
        assert meta.cardinalities()[name] == len(set(values)) + 1
    assert meta.source["options"]["rows_per_file"] == 1000


def test_hash_buckets_per_feature(tmp_path):
    rows = synthetic_rows(500, seed=2)
    src = write_rows(tmp_path / "syn.tsv", rows)
    out = tmp_path / "out"
    meta = convert_criteo(src, out, split=(1, 0, 0), hash_buckets={"*": 97, "C2": 5}, progress=False).meta
    check_layout(out)
    assert meta.cardinalities() == {**{c: 97 for c in SPARSE}, "C2": 5}
    assert meta.source["features"]["C2"] == {"mode": "hashing", "buckets": 5, "cardinality": 5}
    t = read_split(out, "train")
    for j in (1, 7):
        name = SPARSE[j]
        values = pa.array([r[14 + j] or None for r in rows], pa.string())
        expected = HashEncoder(meta.cardinalities()[name]).lookup(hash_strings(values))
        assert t.column(name).to_pylist() == expected.tolist()
        assert min(expected) >= 1  # 0 stays the OOV id
    # a mix: C3 hashed, the rest counted
    meta = convert_criteo(
        src, tmp_path / "mix", split=(1, 0, 0), hash_buckets={"C3": 11}, min_count=1, progress=False
    ).meta
    assert meta.cardinalities()["C3"] == 11
    assert meta.source["features"]["C4"]["mode"] == "vocabulary"
    with pytest.raises(ValueError, match="unknown features"):
        convert_criteo(src, tmp_path / "bad", hash_buckets={"C99": 5}, progress=False)
    assert not (tmp_path / "bad").exists()


def test_day_directory_time_split_with_compressed_day(tmp_path):
    days = tmp_path / "days"
    days.mkdir()
    per_day = 200
    for d in range(7):
        write_rows(
            days / (f"day_{d}.gz" if d == 6 else f"day_{d}"),
            synthetic_rows(per_day, seed=10 + d, day=d),
            compress=(d == 6),
        )
    (days / "README").write_text("not a day file")
    out = tmp_path / "out"
    meta = convert_criteo(days, out, min_count=1, progress=False).meta
    check_layout(out)
    assert meta.rows["train"] == 6 * per_day
    assert meta.rows["valid"] + meta.rows["test"] == per_day
    assert 60 < meta.rows["valid"] < 140
    # C1 marks the day: the six train days get ids, the held-out day's value was never seen in train -> OOV
    assert meta.cardinalities()["C1"] == 7
    assert set(read_split(out, "train").column("C1").to_pylist()) == set(range(1, 7))
    for s in ("valid", "test"):
        assert set(read_split(out, s).column("C1").to_pylist()) == {0}
    assert [i["split"] for i in meta.source["inputs"]] == ["train"] * 6 + ["random"]
    assert "day_0..day_5 -> train" in meta.source["split_rule"]
    again = convert_criteo(days, tmp_path / "again", min_count=1, progress=False).meta
    assert again.rows == meta.rows
    with pytest.raises(ValueError, match="split by time"):
        convert_criteo(days, tmp_path / "x", split=(0.5, 0.25, 0.25), progress=False)


def test_overwrite_replaces_a_dataset_only(tmp_path):
    src = write_rows(tmp_path / "syn.tsv", synthetic_rows(100))
    out = tmp_path / "out"
    convert_criteo(src, out, min_count=1, progress=False)
    before = json.loads((out / "metadata.json").read_text())
    assert json.loads((out / MARKER).read_text())["command"] == "convert criteo"
    with pytest.raises(OutputError, match="--overwrite"):
        convert_criteo(src, out, min_count=1, progress=False)
    assert json.loads((out / "metadata.json").read_text()) == before
    meta = convert_criteo(src, out, min_count=1, seed=3, overwrite=True, progress=False).meta
    assert meta.source["options"]["seed"] == 3
    other = tmp_path / "precious"
    (other / "sub").mkdir(parents=True)
    (other / "notes.txt").write_text("keep me")
    (other / "sub" / "thesis.tex").write_text("chapter 1")
    with pytest.raises(OutputError, match="mlet did not write"):
        convert_criteo(src, other, overwrite=True, progress=False)
    assert (other / "notes.txt").read_text() == "keep me" and (other / "sub" / "thesis.tex").read_text() == "chapter 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "precious", "syn.tsv"]


def test_output_may_not_be_or_contain_an_input(tmp_path):
    (tmp_path / "in").mkdir()
    src = write_rows(tmp_path / "in" / "syn.tsv", synthetic_rows(20))
    for output in (src, tmp_path / "in"):
        with pytest.raises(OutputError, match="input"):
            convert_criteo(src, output, min_count=1, overwrite=True, progress=False)
    days = tmp_path / "days"
    days.mkdir()
    for d in range(2):
        write_rows(days / f"day_{d}", synthetic_rows(10))
    with pytest.raises(OutputError, match="contains the input"):
        convert_criteo(days, days, overwrite=True, progress=False)
    assert src.is_file() and sorted(p.name for p in days.iterdir()) == ["day_0", "day_1"]


def test_columns_constant():
    assert COLUMNS[:2] == ["label", "I1"] and len(COLUMNS) == 40


def _content_digest(root: Path) -> str:
    import hashlib

    meta = DatasetMeta.load(root)
    h = hashlib.sha256()
    for split in meta.splits:
        h.update(split.encode())
        for p in meta.files(root, split):
            for c in pq.read_table(p).columns:
                h.update(repr(c.to_pylist()).encode())
    return h.hexdigest()


def test_output_is_pinned(tmp_path):
    # pinned values: a change to the split assignment, the string hash or the vocabulary order would
    # silently change every re-converted data set
    lines = [
        "\t".join(
            [str(i % 2)]
            + [str((i * j) % 17) if (i + j) % 5 else "" for j in range(13)]
            + [f"{(i * 7 + j * 13) % (j + 3):08x}" for j in range(26)]
        )
        for i in range(300)
    ]
    (tmp_path / "t.tsv").write_text("\n".join(lines) + "\n")
    vocab = convert_criteo(tmp_path / "t.tsv", tmp_path / "v", min_count=2, progress=False, seed=5).meta
    convert_criteo(tmp_path / "t.tsv", tmp_path / "h", hash_buckets=13, progress=False, seed=5)
    assert vocab.rows == {"train": 245, "valid": 28, "test": 27}
    assert _content_digest(tmp_path / "v") == "dc4574eccada34c9e4e664ea10534b5fa97e09cb34e9c1ce0a65372902ca13b1"
    assert _content_digest(tmp_path / "h") == "47082dc23a2f82a433f83d71172be63f8026e3dbe09aff7b3c79cc5b3ac505ad"
