"""The family figures (a)-(e): each writes a PNG from a small in-memory store, nothing without data, the same
bytes twice, and plots the numbers it should (test AUC of the tuned runs; (e): the lr-rescaled grid)."""

import math
import statistics

import pytest

from mlet_torchrec.experiments import family_plots as fp
from mlet_torchrec.experiments.family_plots import interp_log_lr, lr_curves

PNG = b"\x89PNG\r\n\x1a\n"
SGD_LRS = [0.05, 0.2, 0.8, 3.2, 12.8, 51.2, 204.8]


def _rec(d, k, seed, lr, valid, test, model="deepfm", epochs=1, sigma=0.5, dense_lr=0.2, status="ok"):
    return {
        "key": f"{model}-{epochs}-{d}-{k}-{sigma}-{seed}-{lr}-{dense_lr}",
        "status": status,
        "d": d,
        "k": k,
        "seed": seed,
        "sparse_lr": lr,
        "dense_lr": dense_lr,
        "role": "tune" if seed == 0 else "selected",
        "config": {"model": {"name": model}, "train": {"epochs": epochs}, "embedding": {"sigma": sigma}},
        "valid": {"auc": valid},
        "test": {"auc": test},
    }


def _test_auc(model, d, kd, seed, epochs=1):
    # distinct per cell and seed, so a plotted mean identifies which runs went into it
    return 0.70 + 0.01 * math.log2(d) + 0.002 * kd + 0.001 * seed + 0.003 * (epochs - 1) + 0.0001 * len(model)


def _deepctr_store():
    """Families (a), (c), (d): seed 0 tunes two lrs (the better one on validation has the listed test AUC)."""
    recs = []
    cells = [(m, d, kd, 1) for m in ("deepfm", "dcn") for d in (4, 8, 16) for kd in (0, 1, 4, 16)]
    cells += [("deepfm", d, 0.5, 1) for d in (8, 16)] + [("deepfm", d, kd, 3) for d in (4, 16) for kd in (0, 4)]
    for model, d, kd, epochs in cells:
        k = int(kd * d) or None
        for seed in (0, 1, 2):
            auc = _test_auc(model, d, kd, seed, epochs)
            recs.append(_rec(d, k, seed, 0.02, 0.8, auc, model, epochs))
            if seed == 0:  # the worse tuning run: must not be the one plotted
                recs.append(_rec(d, k, seed, 0.08, 0.7, 0.5, model, epochs))
    return recs


def _base_valid(lr):
    return 0.60 + 0.02 * math.log(lr) - 0.002 * math.log(lr) ** 2  # a smooth curve in log lr


def _dlrm_store():
    """Families (b), (e): MLET (d=4, k=64) whose validation AUC at eta is the baseline's at k sigma^2 eta."""
    recs = []
    for lr in SGD_LRS:
        recs.append(_rec(4, None, 0, lr, _base_valid(lr), 0.7, "dlrm", 1))
        recs.append(_rec(4, None, 0, lr, _base_valid(lr) - 0.05, 0.6, "dlrm", 1, dense_lr=0.05))
        for sigma in (0.05, 0.25):
            valid = _base_valid(64 * sigma**2 * lr)
            recs.append(_rec(4, 64, 0, lr, valid, 0.71, "dlrm", 1, sigma))
            recs.append(_rec(4, 64, 0, lr, valid - 0.05, 0.61, "dlrm", 1, sigma, dense_lr=0.05))
    recs.append(_rec(4, 64, 0, 819.2, float("nan"), None, "dlrm", 1, 0.25, status="diverged"))
    for seed in (1, 2):
        recs.append(_rec(4, None, seed, 0.8, 0.6, 0.7 + seed / 100, "dlrm", 1))
        for sigma in (0.05, 0.25):
            recs.append(_rec(4, 64, seed, 0.8, 0.6, 0.71 + seed / 100, "dlrm", 1, sigma))
    return recs


DEEPCTR = [fp.plot_models, fp.plot_small_k, fp.plot_epochs_width]
DLRM = [fp.plot_sigma, fp.plot_lr_equivalence]
ALL = [(f, _deepctr_store) for f in DEEPCTR] + [(f, _dlrm_store) for f in DLRM]


@pytest.mark.parametrize(("plot", "store"), ALL, ids=lambda x: x.__name__)
def test_writes_a_png_and_the_same_bytes_twice(plot, store, tmp_path):
    recs = {"movielens": store(), "criteo_sample": store()}
    first, second = tmp_path / "new" / "dir" / "a.png", tmp_path / "b.png"
    assert plot(recs, first) == first
    assert plot(recs, second) == second
    data = first.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
    assert data == second.read_bytes()


@pytest.mark.parametrize(("plot", "store"), ALL, ids=lambda x: x.__name__)
def test_no_data_writes_nothing(plot, store, tmp_path):
    out = tmp_path / "sub" / "x.png"
    assert plot({}, out) is None
    assert plot({"movielens": []}, out) is None
    failed = [dict(r, status="failed") for r in store()]
    assert plot({"movielens": failed}, out) is None
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("plot", DEEPCTR, ids=lambda x: x.__name__)
def test_deepctr_families_have_nothing_in_the_dlrm_store(plot, tmp_path):
    assert plot({"movielens": _dlrm_store()}, tmp_path / "x.png") is None


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions save, kept open for inspection."""
    saved = []
    monkeypatch.setattr(fp, "_save", lambda fig, path: saved.append(fig) or path.name)
    yield saved
    fp._plt().close("all")


def _lines(fig):
    return {
        line.get_label(): line for ax in fig.axes for line in ax.get_lines() if not line.get_label().startswith("_")
    }


def test_models_plots_the_mean_test_auc_of_the_best_validation_runs(figures, tmp_path):
    fp.plot_models({"synth1m": _deepctr_store()}, tmp_path / "a.png")
    (fig,) = figures
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["synth1m: deepfm", "synth1m: dcn"]
    dcn = fig.axes[1]
    lines = {line.get_label(): line for line in dcn.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"baseline", "MLET k=1d", "MLET k=4d", "MLET k=16d"}  # k=d/2 and 3 epochs are not (a)
    x, y = lines["MLET k=4d"].get_data()
    assert list(x) == [4, 8, 16]
    expected = [statistics.fmean(_test_auc("dcn", d, 4, s) for s in (0, 1, 2)) for d in (4, 8, 16)]
    assert list(y) == pytest.approx(expected)


def test_error_bars_only_where_there_are_two_seeds(figures, tmp_path):
    one_seed = [r for r in _deepctr_store() if r["seed"] == 0]
    fp.plot_epochs_width({"movielens": one_seed}, tmp_path / "d.png")
    fp.plot_epochs_width({"movielens": _deepctr_store()}, tmp_path / "d.png")
    single, three = figures
    assert not single.axes[0].collections  # errorbar adds a LineCollection per series
    assert len(three.axes[0].collections) == 4
    assert set(_lines(three)) == {
        "baseline, 1 epoch",
        "baseline, 3 epochs",
        "MLET k=4d, 1 epoch",
        "MLET k=4d, 3 epochs",
    }


def test_small_k_draws_each_baseline_as_a_horizontal_line(figures, tmp_path):
    fp.plot_small_k({"movielens": _deepctr_store()}, tmp_path / "c.png")
    lines = _lines(figures[0])
    x, _ = lines["MLET d=8"].get_data()
    assert list(x) == [0.5, 1, 4]
    _, y = lines["baseline d=16"].get_data()
    assert list(y) == pytest.approx([statistics.fmean(_test_auc("deepfm", 16, 0, s) for s in (0, 1, 2))] * 2)


def test_interp_log_lr_is_linear_in_log_lr():
    xs, ys = [0.1, 1.0, 10.0], [0.5, 0.7, 0.6]
    assert interp_log_lr(xs, ys, 1.0) == 0.7
    assert interp_log_lr(xs, ys, 0.1) == 0.5 and interp_log_lr(xs, ys, 10.0) == 0.6
    assert interp_log_lr(xs, ys, math.sqrt(0.1)) == pytest.approx(0.6)  # halfway in log, not in lr
    assert interp_log_lr(xs, ys, 10 ** (2 / 3)) == pytest.approx(0.7 - 0.1 * 2 / 3)
    assert interp_log_lr(list(reversed(xs)), list(reversed(ys)), math.sqrt(10)) == pytest.approx(0.65)
    assert interp_log_lr(xs, ys, 0.09) is None and interp_log_lr(xs, ys, 10.5) is None
    assert interp_log_lr([], [], 1.0) is None


def test_lr_curves_take_seed_0_at_the_best_dense_lr():
    curves = lr_curves(_dlrm_store(), fp._family("lr_equivalence"))
    assert len(curves) == 3  # the baseline and MLET at two sigmas
    base = next(pts for m, pts in curves.items() if not m.is_mlet)
    assert [lr for lr, _ in base] == SGD_LRS
    assert [a for _, a in base] == pytest.approx([_base_valid(lr) for lr in SGD_LRS])  # dense lr 0.2, not 0.05
    mlet = next(pts for m, pts in curves.items() if m.sigma == 0.25)
    assert 819.2 not in [lr for lr, _ in mlet]  # the diverged run


def test_lr_equivalence_puts_rescaled_mlet_on_the_diagonal(figures, tmp_path):
    fp.plot_lr_equivalence({"criteo_sample": _dlrm_store()}, tmp_path / "e.png")
    top, bottom = figures[0].axes
    mlet = {line.get_label(): line for line in top.get_lines()}["MLET σ=0.25"]
    x, _ = mlet.get_data()
    assert list(x) == pytest.approx([64 * 0.25**2 * lr for lr in SGD_LRS])
    points = [c for c in bottom.collections if c.get_label() == "MLET σ=0.25"][0].get_offsets()
    # 4·eta stays inside the baseline's lr range for eta <= 51.2; 204.8 (-> 819.2) is skipped
    assert len(points) == len(SGD_LRS) - 1
    for b, a in points:
        assert a == pytest.approx(b, abs=1e-3)  # the fake MLET is the rescaled baseline: only interpolation error
    sigma05 = [c for c in bottom.collections if c.get_label() == "MLET σ=0.05"][0].get_offsets()
    inside = [lr for lr in SGD_LRS if min(SGD_LRS) <= 64 * 0.05**2 * lr <= max(SGD_LRS)]
    assert len(sigma05) == len(inside) == 5  # 0.16·eta is below the baseline's range for eta < 0.8
