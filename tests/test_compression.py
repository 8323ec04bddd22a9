"""The papers' compression studies: INT8 scale search, hashing trick, SVD baseline, A.4.4 sizes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipes.reader import ParquetBatchReader
from data_pipes.schema import DatasetMeta
from mlet_torchrec.cli.main import main
from mlet_torchrec.experiments.compression import (
    _errors,
    compression_study,
    dequantize,
    grid_search_scale,
    maxabs_scale,
    quantization_error,
    quantize_model_tables,
    quantize_symmetric,
    quantize_table,
    relative_table_size,
    svd_factors,
    svd_model_tables,
)
from mlet_torchrec.experiments.hashing import (
    HashSpecError,
    hash_batch,
    hash_kjt,
    hash_moduli,
    hashed_meta,
    unhashed_cardinalities,
    write_hashed_dataset,
)
from mlet_torchrec.io import OutputError


def _table(kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(4000, 16, generator=g) * 0.1
    if kind == "heavy":  # Student-t-like tails: a few large entries ruin the max-abs scale
        return torch.randn(4000, 16, generator=g) / torch.rand(4000, 16, generator=g).clamp_min(0.02).sqrt()
    return torch.rand(4000, 16, generator=g) * 2 - 1  # uniform: max-abs is close to optimal


@pytest.mark.parametrize("kind", ["gaussian", "heavy", "uniform"])
def test_grid_search_beats_maxabs_in_l2(kind):
    w = _table(kind)
    s_max = maxabs_scale(w)
    e_max = quantization_error(w, s_max)
    s_grid, e_grid = grid_search_scale(w)
    assert e_grid <= e_max and e_grid == pytest.approx(quantization_error(w, s_grid))
    if kind != "uniform":
        assert e_grid < (0.95 if kind == "gaussian" else 0.9) * e_max and s_grid < s_max  # clipping the tails pays
    # a direct dense scan does not find anything materially better
    scan = float(_errors(w, torch.linspace(0.02, 1.0, 400) * s_max, 8).min().sqrt())
    assert e_grid <= scan * 1.01


def test_quantize_round_trip_and_sampling():
    w = _table("gaussian")
    s = maxabs_scale(w)
    q = quantize_symmetric(w, s)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert float((dequantize(q, s) - w).abs().max()) <= s / 2 + 1e-7  # no clipping at max-abs
    big = torch.randn(100_000, 8)
    s_full, e_full = grid_search_scale(big, sample=None)
    s_samp, e_samp = grid_search_scale(big, sample=20_000)
    assert e_samp == pytest.approx(e_full, rel=0.01)  # the sample (exact tail) finds an as-good scale
    codes, info = quantize_table("t", w, "grid")
    assert info.l2_error < info.maxabs_l2_error and codes.dtype == torch.int8
    with pytest.raises(ValueError):
        quantize_table("t", w, "percentile")
    assert maxabs_scale(torch.zeros(3, 3)) == 1.0


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 60), st.integers(1, 8), st.floats(0.01, 100.0), st.integers(0, 1000))
def test_grid_never_worse_than_maxabs(rows, cols, spread, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * spread
    _, e_grid = grid_search_scale(w, num_grid=16, refine=1)
    assert e_grid <= quantization_error(w, maxabs_scale(w)) * (1 + 1e-9)


def test_relative_sizes_follow_a44():
    rows = {"a": 1000, "b": 3000}
    assert relative_table_size(rows, {t: n for t, n in rows.items()}) == 1.0  # d = 1, FP32
    assert relative_table_size(rows, {t: 16 * n for t, n in rows.items()}) == 16.0
    assert relative_table_size(rows, {t: 16 * n for t, n in rows.items()}, bits=8) == 4.0
    hashed = {"a": 1000, "b": 750}  # b hashed to a quarter
    assert relative_table_size(rows, {t: 16 * n for t, n in hashed.items()}) == pytest.approx(16 * 1750 / 4000)
    svd = {t: n * 2 + 2 * 16 for t, n in rows.items()}  # rank 2 of d = 16
    assert relative_table_size(rows, svd) == pytest.approx(2 + 64 / 4000)
    assert relative_table_size(rows, {"a": 1000}, bits={"a": 8}, extra_bits=32) == pytest.approx((8000 + 32) / 128000)


def test_hash_moduli_fractions_and_counts():
    card = {"C1": 10, "C2": 1000, "C3": 7}
    assert hash_moduli(card, {"C2": 0.25, "C1": 3, "C3": 0.01}) == {"C2": 250, "C1": 3, "C3": 1}
    assert hash_moduli(card, {"C1": 1.0, "C2": 5000}) == {"C1": 10, "C2": 1000}  # capped
    for bad in ({"C1": 0}, {"C1": -0.5}, {"C1": 1.5}, {"C1": "x"}, {"C1": True}):
        with pytest.raises(ValueError):
            hash_moduli(card, bad)
    with pytest.raises(HashSpecError, match="C9"):  # a user's mistake: one line, exit 2 in `mlet`
        hash_moduli(card, {"C9": 0.5})


def test_hash_kjt_and_batch(synth_dataset):
    data = synth_dataset(multi_hot_features=1)
    meta = DatasetMeta.load(data)
    new_meta, moduli = hashed_meta(meta, {"C3": 0.1, "C4": 5})
    assert new_meta.cardinalities()["C4"] == 5 and new_meta.cardinalities()["C1"] == meta.cardinalities()["C1"]
    assert unhashed_cardinalities(new_meta) == meta.cardinalities()
    batch = next(iter(ParquetBatchReader(data, "train", 128, shuffle=False)))
    hashed = hash_batch(batch, moduli)
    before, after = batch.sparse_features.to_dict(), hashed.sparse_features.to_dict()
    for key in meta.sparse_names():
        assert torch.equal(before[key].lengths(), after[key].lengths())
        expected = before[key].values() % moduli[key] if key in moduli else before[key].values()
        assert torch.equal(after[key].values(), expected)
    assert torch.equal(hashed.labels, batch.labels) and hash_kjt(batch.sparse_features, {}) is batch.sparse_features


def test_write_hashed_dataset(synth_dataset, tmp_path):
    data = synth_dataset(multi_hot_features=1)
    meta = DatasetMeta.load(data)
    out = tmp_path / "hashed"
    new = write_hashed_dataset(data, out, {"C4": 0.25, "C3": 7})
    n4 = meta.cardinalities()["C4"]
    assert new.cardinalities()["C4"] == math.ceil(n4 * 0.25) and new.cardinalities()["C3"] == 7
    assert DatasetMeta.load(out).source["hashing"]["original_cardinalities"] == meta.cardinalities()
    assert new.rows == meta.rows
    for split in meta.splits:  # the reader validates every id against the new cardinalities
        src = list(ParquetBatchReader(data, split, 500, shuffle=False, drop_last=False))
        got = list(ParquetBatchReader(out, split, 500, shuffle=False, drop_last=False))
        assert sum(b.labels.numel() for b in got) == meta.rows[split]
        for a, b in zip(src, got, strict=True):
            da, db = a.sparse_features.to_dict(), b.sparse_features.to_dict()
            assert torch.equal(db["C4"].values(), da["C4"].values() % new.cardinalities()["C4"])
            assert torch.equal(db["C1"].values(), da["C1"].values())
            assert torch.equal(a.dense_features, b.dense_features)
    # hashing a hashed data set keeps the original cardinalities as the A.4.4 reference
    again = write_hashed_dataset(out, tmp_path / "again", {"C2": 0.5})
    assert unhashed_cardinalities(again) == meta.cardinalities()
    with pytest.raises(OutputError, match="--overwrite"):
        write_hashed_dataset(data, out, {"C4": 0.5})
    with pytest.raises(OutputError, match="input"):  # the copy must not replace its own source
        write_hashed_dataset(data, data, {"C4": 0.5}, overwrite=True)
    assert main(["compression", "hash", "--input", str(data), "--output", str(tmp_path / "cli"), "C4=0.5", "C2=3"]) == 0
    assert DatasetMeta.load(tmp_path / "cli").cardinalities()["C2"] == 3
    assert main(["compression", "hash", "--input", str(data), "--output", str(tmp_path / "cli2"), "C4"]) == 2


def test_svd_factors_are_the_best_low_rank_approximation():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(500, 4, generator=g) @ torch.randn(4, 12, generator=g) + 0.01 * torch.randn(500, 12, generator=g)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    for r in (1, 4, 12):
        a, b, sv = svd_factors(w, r, block_rows=64)
        assert a.shape == (500, r) and b.shape == (r, 12)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        assert float((a @ b).double().sub(best).norm()) < 1e-4 * float(s[0])
        torch.testing.assert_close(sv.float(), s.float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        svd_factors(w, 13)


def test_study_on_a_collapsed_model(synth_dataset, tmp_path):
    from test_collapse import fake_run

    from mlet_torchrec.serving.artifact import load_collapsed
    from mlet_torchrec.serving.collapse import collapse

    run = fake_run(tmp_path / "run", synth_dataset(), ["embedding.k=null", "embedding.d=8"])  # single-layer
    collapse(run, tmp_path / "collapsed", check_split=None)
    model = load_collapsed(tmp_path / "collapsed")[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = quantize_model_tables(model, "grid")
    assert all(i.l2_error <= i.maxabs_l2_error for i in info.values())
    model.load_state_dict(before)
    svd = svd_model_tables(model, 8)  # full rank: nothing changes
    assert all(v["rel_l2_error"] < 1e-5 for v in svd.values())

    rows = compression_study(tmp_path / "collapsed", svd_ranks=[2])
    by = {r["method"]: r for r in rows}
    assert by["fp32 d=8"]["table_size"] == 8.0
    assert by["int8 grid d=8"]["table_size"] == pytest.approx(2.0, abs=0.01)
    assert by["int8 grid d=8"]["l2_error"] <= by["int8 maxabs d=8"]["l2_error"]
    assert 2.0 < by["svd rank 2 of d=8"]["table_size"] < 2.2  # n r + r d parameters per table
    assert all(0.0 <= r["auc"] <= 1.0 for r in rows)
    assert main(["compression", "study", "--input", str(tmp_path / "collapsed"), "--svd-ranks", "1"]) == 0
