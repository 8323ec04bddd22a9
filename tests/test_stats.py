"""The report's statistics: t quantiles, t intervals, the paired test and the random-effects pooling."""

import itertools
import math
import statistics
import warnings

import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from mlet_torchrec.experiments.stats import (
    bh_q,
    cluster_cells,
    fmt_interval,
    paired_test,
    pooled_estimate,
    t95,
    t_interval,
    verdict,
)


@pytest.mark.parametrize(("df", "expected"), [(1, 12.706), (11, 2.201), (40, 2.021)])
def test_t95_matches_the_printed_t_table(df, expected):
    assert round(t95(df), 3) == expected


def test_t95_between_table_keys_is_not_the_next_key():
    # the old hand-typed table gave df=11..14 the df=15 value and df>30 the normal 1.96
    assert t95(11) > t95(12) > t95(14) > t95(15)
    assert t95(100) > 1.96
    assert t95(0) == math.inf


def test_t_interval_contains_the_mean_and_matches_hand_computation():
    vals = [0.71, 0.74, 0.69, 0.73]
    m, lo, hi, n = t_interval(vals)
    hand_half = 3.182446305284263 * statistics.stdev(vals) / math.sqrt(4)  # t(0.975, 3) from a table
    assert n == 4
    assert lo < m < hi
    assert m == pytest.approx(statistics.fmean(vals))
    assert hi - m == pytest.approx(hand_half, rel=1e-9)
    assert m - lo == pytest.approx(hand_half, rel=1e-9)
    # a 99% interval is wider
    _, lo99, hi99, _ = t_interval(vals, level=0.99)
    assert lo99 < lo and hi99 > hi


def test_t_interval_is_nan_for_one_value():
    m, lo, hi, n = t_interval([0.3, None])
    assert (m, n) == (0.3, 1)
    assert math.isnan(lo) and math.isnan(hi)


def test_paired_test_p_value_matches_ttest_rel():
    mlet = [0.7712, 0.7731, 0.7698, 0.7745, 0.7720]
    base = [0.7701, 0.7709, 0.7702, 0.7721, 0.7700]
    diffs = [a - b for a, b in zip(mlet, base, strict=True)]
    r = paired_test(diffs)
    ref = scipy.stats.ttest_rel(mlet, base)
    assert r.p == pytest.approx(ref.pvalue, rel=1e-9)
    assert r.t == pytest.approx(ref.statistic, rel=1e-9)
    assert r.n == 5
    assert r.lo < r.mean < r.hi


def test_paired_test_degenerate_cases_decide_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = paired_test([0.2])
        zero = paired_test([0.0, 0.0, 0.0])
        const = paired_test([-0.1, -0.1])
    assert math.isnan(one.p) and math.isnan(one.t)
    assert zero.p == 1.0
    assert const.p == 0.0 and const.t == -math.inf


def test_verdict_strings_follow_the_p_value():
    assert verdict(paired_test([0.01, 0.012, 0.011])) == "MLET better (t=+19.1, p<0.05)"
    assert verdict(paired_test([0.01, 0.012, 0.011]), higher_is_better=False) == "MLET worse (t=+19.1, p<0.05)"
    assert verdict(paired_test([0.0, 0.0])) == "identical"
    assert verdict(paired_test([0.1])) == "n<2: no test"
    assert verdict(paired_test([0.1, 0.1])) == "MLET better"
    noisy = paired_test([0.01, -0.012, 0.011])
    assert noisy.p >= 0.05
    assert verdict(noisy).startswith("within noise (t=")


def test_verdict_uses_exact_df_between_old_table_keys():
    # n=12 (df=11): |t| between the true 2.201 and the old table's 2.131 is *not* significant
    diffs = [1.0, -1.0] * 6
    m, s = statistics.fmean(diffs), statistics.stdev(diffs)
    shift = 2.17 * s / math.sqrt(12) - m  # t = 2.17
    shifted = [d + shift for d in diffs]
    assert paired_test(shifted).t == pytest.approx(2.17)
    assert verdict(paired_test(shifted)) == "within noise (t=+2.2)"


def test_pooled_identical_cells_equal_single_cell_and_narrow():
    cell = [0.010, 0.013, 0.011, 0.012]
    one = pooled_estimate([cell])
    assert one.estimate == pytest.approx(statistics.fmean(cell)) and math.isnan(one.lo) and math.isnan(one.hi)
    widths = []
    for k in (2, 3, 5):
        p = pooled_estimate([cell] * k)
        assert p.estimate == pytest.approx(statistics.fmean(cell))
        assert p.n_cells == k
        assert p.tau2 == 0.0
        assert p.lo < p.estimate < p.hi
        widths.append(p.hi - p.lo)
    assert all(a > b for a, b in itertools.pairwise(widths))


def test_hartung_knapp_interval_by_hand_and_wider_than_dl_z_for_few_cells():
    cells = [[0.010, 0.014, 0.012], [0.001, 0.003, 0.008], [0.020, 0.015, 0.016], [0.0, 0.004, 0.002]]
    p = pooled_estimate(cells)
    ys = [statistics.fmean(c) for c in cells]
    vs = [statistics.variance(c) / 3 for c in cells]
    w = [1 / (v + p.tau2) for v in vs]
    mu = sum(wi * y for wi, y in zip(w, ys, strict=True)) / sum(w)
    scatter = sum(wi * (y - mu) ** 2 for wi, y in zip(w, ys, strict=True)) / 3
    half = scipy.stats.t.ppf(0.975, 3) * math.sqrt(max(1.0, scatter) / sum(w))
    assert p.estimate == pytest.approx(mu) and p.hi - p.estimate == pytest.approx(half)
    assert half > 1.959963984540054 / math.sqrt(sum(w))  # DL's z interval is narrower with 4 cells


def test_bh_q_matches_the_step_up_rule_and_keeps_missing():
    ps = [0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205, float("nan")]
    qs = bh_q(ps)
    m = 8
    by_hand = [min(min(ps[j] * m / (j + 1) for j in range(i, m)), 1.0) for i in range(m)]
    assert qs[:m] == pytest.approx(by_hand) and math.isnan(qs[-1])
    assert sum(p < 0.05 for p in ps[:m]) == 5 and sum(q < 0.05 for q in qs[:m]) == 2
    assert bh_q([]) == []


def test_cluster_cells_averages_members_per_shared_seed():
    a, b = {0: 0.1, 1: 0.2, 2: 0.3}, {1: 0.4, 2: 0.5}
    assert cluster_cells([a, b, {5: 1.0}], ["x", "x", "y"]) == [pytest.approx([0.3, 0.4]), [1.0]]
    # two cells that are one noise (same baseline, same per-seed shift) count as one cell, not two
    noise = {s: v for s, v in enumerate([0.01, -0.02, 0.015, 0.0, -0.01])}
    twice = pooled_estimate(cluster_cells([noise, noise], ["base", "base"]))
    assert twice.n_cells == 1 and math.isnan(twice.lo)


def test_pooled_heterogeneous_cells_have_positive_tau2_and_wider_interval():
    cells = [[0.010, 0.012, 0.011], [0.004, 0.006, 0.005], [0.020, 0.018, 0.019]]
    p = pooled_estimate(cells)
    assert p.tau2 > 0
    # fixed-effect interval (no between-cell variance) for the same cells
    v = statistics.variance(cells[0]) / 3
    fe_half = 1.959963984540054 * math.sqrt(v / 3)
    assert (p.hi - p.lo) / 2 > 5 * fe_half


def test_pooled_skips_short_cells_and_falls_back_without_variance():
    assert pooled_estimate([[0.1, 0.2], [5.0]]).n_cells == 1
    flat = pooled_estimate([[0.5, 0.5], [0.7, 0.7]])
    assert flat.method == "mean of cell means"
    assert flat.estimate == pytest.approx(0.6)
    assert flat.lo < 0.6 < flat.hi
    assert math.isnan(pooled_estimate([[1.0], []]).estimate)


_cell = st.lists(
    st.floats(min_value=-1.0, max_value=1.0, allow_nan=False, allow_subnormal=False), min_size=2, max_size=6
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_cell, min_size=1, max_size=6))
def test_pooled_estimate_lies_between_cell_means(cells):
    means = [statistics.fmean(c) for c in cells]
    p = pooled_estimate(cells)
    tol = 1e-12
    assert min(means) - tol <= p.estimate <= max(means) + tol
    assert p.tau2 >= 0
    assert p.n_cells == len(cells)


def test_fmt_interval_style():
    assert fmt_interval(0.0012, -0.0003, 0.0027) == "+0.0012 [−0.0003, +0.0027]"
    assert fmt_interval(float("nan"), 0.0, 1.0) == "–"
