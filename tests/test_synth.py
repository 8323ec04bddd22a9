"""The planted synthetic generator: determinism, ranges, skew, learnable labels, atomic output."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from data_pipes import synth
from data_pipes.schema import METADATA_FILE, DatasetMeta
from data_pipes.synth import SynthConfig, generate, true_logits
from mlet_torchrec.io import MARKER, OutputError


def _read_split(root: Path, split: str) -> pa.Table:
    meta = DatasetMeta.load(root)
    return pa.concat_tables([pq.read_table(p) for p in meta.files(root, split)])


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(1, len(scores) + 1)
    pos = labels.sum()
    neg = len(labels) - pos
    return float((ranks[labels == 1].sum() - pos * (pos + 1) / 2) / (pos * neg))


def test_deterministic_for_a_seed(tmp_path):
    cfg = SynthConfig(
        rows=2000,
        num_dense=2,
        num_sparse=3,
        max_cardinality=300,
        multi_hot_features=1,
        row_group_size=300,
        row_groups_per_file=3,
        seed=7,
    )
    a = generate(cfg, tmp_path / "a", progress=False)
    b = generate(cfg, tmp_path / "b", progress=False)
    c = generate(cfg.model_copy(update={"seed": 8}), tmp_path / "c", progress=False)
    assert a == b
    for split in a.splits:
        ta, tb, tc = (_read_split(tmp_path / n, split) for n in "abc")
        assert ta.equals(tb)
        assert not ta.equals(tc)
    assert a.source["oracle"] != c.source["oracle"]


def test_layout_metadata_and_row_groups(tmp_path):
    cfg = SynthConfig(
        rows=5000, num_dense=2, num_sparse=3, max_cardinality=1000, row_group_size=300, row_groups_per_file=4, seed=3
    )
    meta = generate(cfg, tmp_path / "d", progress=False)
    assert meta == DatasetMeta.load(tmp_path / "d")
    assert meta.rows == {"train": 4000, "valid": 500, "test": 500}
    assert meta.dense == ["I1", "I2"] and meta.sparse_names() == ["C1", "C2", "C3"]
    # 4000 train rows: 14 row groups (13 x 300 + 100) over 4 files of at most 4 row groups
    assert meta.splits["train"] == [f"train/part-{i:05d}.parquet" for i in range(4)]
    sizes = []
    for path in meta.files(tmp_path / "d", "train"):
        md = pq.ParquetFile(path).metadata
        assert md.num_row_groups <= 4
        sizes += [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        assert pq.ParquetFile(path).schema_arrow.equals(meta.arrow_schema())
    assert sizes == [300] * 13 + [100]
    assert meta.source["generator"] == "data_pipes.synth"
    assert SynthConfig.model_validate(meta.source["config"]) == cfg
    for split in ("train", "valid", "test"):
        o = meta.source["oracle"][split]
        assert set(o) >= {"auc", "logloss", "label_entropy", "positive_rate", "rows"}
        assert o["rows"] == meta.rows[split]
    assert not list(tmp_path.glob(".d.*")), "temporary directory left behind"


def test_cardinalities_and_ids_in_range(tmp_path):
    cfg = SynthConfig(
        rows=3000, num_dense=1, num_sparse=5, min_cardinality=3, max_cardinality=30_000, multi_hot_features=2, seed=2
    )
    meta = generate(cfg, tmp_path / "d", progress=False)
    cards = [f.cardinality for f in meta.sparse]
    assert cards[0] == 3 and cards[-1] == 30_000
    assert cards == sorted(cards) and len(set(cards)) == 5
    ratios = np.diff(np.log(cards))
    assert np.allclose(ratios, ratios.mean(), atol=0.05), "cardinalities are not log-spaced"
    for split in meta.splits:
        table = _read_split(tmp_path / "d", split)
        for f in meta.sparse:
            col = table.column(f.name).combine_chunks()
            ids = (col.flatten() if f.multi_hot else col).to_numpy()
            assert ids.dtype == np.int64
            assert ids.min() >= 0 and ids.max() < f.cardinality, f.name
        dense = table.column("I1").to_numpy()
        assert dense.dtype == np.float32 and np.isfinite(dense).all() and (dense >= 0).all()
        assert set(np.unique(table.column("label").to_numpy())) <= {0.0, 1.0}


def test_permutation_is_a_bijection():
    cfg = SynthConfig(num_sparse=6, min_cardinality=1, max_cardinality=70_000)
    for feat in synth._planted(cfg).features:
        ranks = np.arange(feat.cardinality)
        ids = feat.permute(ranks)
        assert np.array_equal(np.sort(ids), ranks), feat
        if feat.cardinality > 100:
            assert not np.array_equal(ids[:10], ranks[:10])


def test_zipf_skew(tmp_path):
    cfg = SynthConfig(
        rows=20_000,
        num_dense=0,
        num_sparse=2,
        min_cardinality=100_000,
        max_cardinality=100_000,
        zipf_exponent=1.1,
        train_fraction=1.0,
        valid_fraction=0.0,
        test_fraction=0.0,
        seed=4,
    )
    meta = generate(cfg, tmp_path / "d", progress=False)
    assert list(meta.splits) == ["train"]
    ids = _read_split(tmp_path / "d", "train").column("C1").to_numpy()
    values, counts = np.unique(ids, return_counts=True)
    top = values[np.argsort(-counts, kind="stable")[:5]]
    counts = np.sort(counts)[::-1]
    # the 100 most frequent of 100k ids carry a large share of the rows; a uniform draw gives 0.1%
    assert counts[:100].sum() / len(ids) > 0.3
    assert counts[0] / len(ids) > 0.05
    # ... and most ids seen are rare (the long tail exists)
    assert (counts == 1).sum() > 0.5 * len(values)
    # the most frequent id is not id 0: values are permuted, not frequency ranks
    assert not set(top.tolist()) <= set(range(5))


def test_planted_labels_are_learnable_and_calibrated(tmp_path):
    cfg = SynthConfig(
        rows=30_000, num_dense=4, num_sparse=6, max_cardinality=5000, multi_hot_features=2, positive_rate=0.3, seed=5
    )
    meta = generate(cfg, tmp_path / "d", progress=False)
    oracle = meta.source["oracle"]["test"]
    assert oracle["auc"] > 0.75
    assert oracle["logloss"] < oracle["label_entropy"] - 0.05
    train = _read_split(tmp_path / "d", "train")
    labels = train.column("label").to_numpy()
    assert abs(labels.mean() - 0.3) < 0.02
    # the recorded ceiling is the one of the true probabilities recomputed from the stored rows
    test = _read_split(tmp_path / "d", "test")
    logits = true_logits(meta, test)
    y = test.column("label").to_numpy()
    assert abs(_auc(logits, y) - oracle["auc"]) < 2e-3
    p = np.clip(1 / (1 + np.exp(-logits)), 1e-7, 1 - 1e-7)
    assert abs(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)) - oracle["logloss"]) < 2e-3
    # learning embeddings matters: the per-id terms alone (dense term off) still carry the signal
    no_dense = generate(cfg.model_copy(update={"dense_scale": 0.0, "num_dense": 0}), tmp_path / "e", progress=False)
    assert no_dense.source["oracle"]["test"]["auc"] > 0.7


def test_multi_hot_bags(tmp_path):
    cfg = SynthConfig(
        rows=3000, num_dense=1, num_sparse=4, max_cardinality=800, multi_hot_features=2, max_bag_size=5, seed=6
    )
    meta = generate(cfg, tmp_path / "d", progress=False)
    assert [f.multi_hot for f in meta.sparse] == [False, False, True, True]
    table = _read_split(tmp_path / "d", "train")
    for f in meta.sparse[2:]:
        col = table.column(f.name).combine_chunks()
        assert pa.types.is_list(col.type) and col.type.value_type == pa.int64()
        lengths = np.diff(col.offsets.to_numpy())
        assert set(np.unique(lengths)) == {1, 2, 3, 4, 5}
        assert col.null_count == 0
    assert meta.arrow_schema().field("C3").type == pa.list_(pa.int64())


def test_no_partial_output_when_generation_fails(tmp_path, monkeypatch):
    real = synth._draw_rows
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # calibration, then two row groups written, then the failure
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "_draw_rows", failing)
    cfg = SynthConfig(rows=2000, num_dense=1, num_sparse=2, max_cardinality=100, row_group_size=200)
    with pytest.raises(RuntimeError, match="disk on fire"):
        generate(cfg, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []

    # an existing data set survives a failed overwrite untouched
    monkeypatch.setattr(synth, "_draw_rows", real)
    generate(cfg, tmp_path / "out", progress=False)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    calls["n"] = 0
    monkeypatch.setattr(synth, "_draw_rows", failing)
    with pytest.raises(RuntimeError):
        generate(cfg.model_copy(update={"seed": 9}), tmp_path / "out", progress=False, overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert DatasetMeta.load(tmp_path / "out").source["config"]["seed"] == 0


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    generate(SynthConfig(rows=300, num_sparse=2, max_cardinality=50), out, progress=False)  # empty dir: fine
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        generate(SynthConfig(rows=300, num_sparse=2, max_cardinality=50, seed=3), out, progress=False)
    assert DatasetMeta.load(out).source["config"]["seed"] == 0
    generate(SynthConfig(rows=300, num_sparse=2, max_cardinality=50, seed=3), out, progress=False, overwrite=True)
    assert DatasetMeta.load(out).source["config"]["seed"] == 3
    assert json.loads((out / MARKER).read_text())["command"] == "synth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        generate(SynthConfig(rows=300, num_sparse=2, max_cardinality=50), tmp_path / "file", progress=False)
    assert (out / METADATA_FILE).is_file() and (tmp_path / "file").read_text() == "x"


def test_overwrite_never_replaces_foreign_files(tmp_path):
    out = tmp_path / "thesis"
    (out / "sub").mkdir(parents=True)
    (out / "precious.txt").write_text("keep")
    (out / "sub" / "thesis.tex").write_text("\\documentclass{article}")
    with pytest.raises(OutputError, match="mlet did not write"):
        generate(SynthConfig(rows=300, num_sparse=2, max_cardinality=50), out, progress=False, overwrite=True)
    assert (out / "precious.txt").read_text() == "keep"
    assert (out / "sub" / "thesis.tex").read_text() == "\\documentclass{article}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"rows": 0}, "rows"),
        ({"zipf_exponent": -1}, "zipf_exponent"),
        ({"positive_rate": 1.0}, "positive_rate"),
        ({"latent_rank": 0}, "latent_rank"),
        ({"min_cardinality": 100, "max_cardinality": 10}, "max_cardinality"),
        ({"num_sparse": 2, "multi_hot_features": 3}, "multi_hot_features"),
        ({"train_fraction": 0.8, "valid_fraction": 0.3}, "must be 1"),
        ({"row_group_size": 0}, "row_group_size"),
        ({"rowz": 10}, "rowz"),
    ],
)
def test_config_validation(bad, field):
    with pytest.raises(ValidationError, match=field):
        SynthConfig(**bad)


def test_default_config_is_criteo_shaped():
    cfg = SynthConfig()
    assert (cfg.rows, cfg.num_dense, cfg.num_sparse) == (200_000, 13, 26)
    assert cfg.cardinalities()[0] == 10 and cfg.cardinalities()[-1] == 1_000_000
    assert cfg.split_rows() == {"train": 160_000, "valid": 20_000, "test": 20_000}


def _content_digest(root: Path) -> str:
    import hashlib

    meta = DatasetMeta.load(root)
    h = hashlib.sha256()
    for split in meta.splits:
        for p in meta.files(root, split):
            for c in pq.read_table(p).columns:
                h.update(repr(c.to_pylist()).encode())
    return h.hexdigest()


def test_output_is_pinned(tmp_path):
    # pinned values: a change to the keyed hashing or the draws would silently change every data set
    cfg = SynthConfig(
        rows=600,
        num_dense=2,
        num_sparse=3,
        max_cardinality=500,
        multi_hot_features=1,
        row_group_size=128,
        row_groups_per_file=2,
        seed=11,
    )
    meta = generate(cfg, tmp_path / "s", progress=False)
    assert _content_digest(tmp_path / "s") == "b168a449e5e359de58cfe194ba3005c28ac820ad8c53785507bb787437d76396"
    assert meta.source["planted"] == {
        "intercept": -1.871860513680918,
        "dense_coef": 0.24769933248837542,
        "interaction_coef": 0.45205762533381655,
        "id_bias_coef": 0.36011123283902613,
    }
