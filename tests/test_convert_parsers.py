"""Property tests of the text parsers: numbers, labels, Avazu hours, block streaming, seeded splits."""

from __future__ import annotations

import datetime as dt
import math
import re

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_pipes.convert.avazu import parse_hour
from data_pipes.convert.checks import _NUMBER_RE, BlockChecker, IssueCounter, dense_feature, label01
from data_pipes.convert.splits import assign_splits, check_fractions, row_uniforms
from data_pipes.convert.text import TextSource, iter_blocks
from data_pipes.errors import DataError

NUMBER = re.compile(_NUMBER_RE)

numbers = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=False, allow_infinity=False, width=64).map(repr),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6).map(lambda x: f"{x:.3e}"),
    st.from_regex(r"\A[+-]?[0-9]{1,5}(\.[0-9]{0,3})?\Z"),
)
non_finite = st.sampled_from(["nan", "NaN", "inf", "-inf", "+inf", "Infinity", "1e999", "-1e400"])
garbage = st.one_of(
    st.text(alphabet="abcxyz-+., _/", min_size=1, max_size=6).filter(lambda s: not NUMBER.match(s)),
    st.sampled_from(["0x10", "1_000", " 5", "5 ", "1,5", "--1", "1e", "e5", ".", "١٢"]),
)
cells = st.lists(st.one_of(numbers, non_finite, garbage, st.none()), max_size=40)


def reference(cell):
    """What the converter must produce for one dense cell, and how it classifies a bad one."""
    if cell is None:
        return 0.0, None
    if not NUMBER.match(cell):
        return 0.0, "not a number"
    x = float(cell)
    if not math.isfinite(x):
        return 0.0, "not finite"
    return float(np.float32(math.log1p(max(x, 0.0)))), None


@settings(max_examples=200, deadline=None)
@given(cells)
def test_dense_values_and_issue_counts_match_reference(vals):
    issues = IssueCounter()
    check = BlockChecker("t f", 1, len(vals), lenient=True, issues=issues)
    out = dense_feature(pa.array(vals, pa.string()), "I1", check)
    ref = [reference(v) for v in vals]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.array([r[0] for r in ref], np.float32), rtol=1e-6)
    kinds = {}
    for _, kind in ref:
        if kind:
            kinds[kind] = kinds.get(kind, 0) + 1
    assert issues.values_replaced.get("I1", {}) == kinds
    # strict mode: the first bad row raises, naming it
    bad = [i for i, (_, k) in enumerate(ref) if k]
    strict = BlockChecker("criteo f.tsv", 10, len(vals), lenient=False, issues=IssueCounter())
    dense_feature(pa.array(vals, pa.string()), "I1", strict)
    if bad:
        with pytest.raises(DataError, match=rf"^criteo f\.tsv: row {10 + bad[0]}, column I1: .* is not "):
            strict.finish()
    else:
        strict.finish()


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.one_of(st.sampled_from(["0", "1", "2", "", "01", " 1", "1.0", "-0", "true"]), st.none()), max_size=30)
)
def test_label01(vals):
    issues = IssueCounter()
    check = BlockChecker("t f", 1, len(vals), lenient=True, issues=issues)
    lab = label01(pa.array(vals, pa.string()), "label", check)
    assert lab.tolist() == [1.0 if v == "1" else 0.0 for v in vals]
    assert check.drop.tolist() == [v not in ("0", "1") for v in vals]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2099, 12, 31)).map(
                lambda d: d.strftime("%y%m%d%H")
            ),
            st.from_regex(r"\A[0-9]{6,9}\Z"),
            st.text(max_size=8),
        ),
        max_size=30,
    )
)
def test_avazu_hour(vals):
    def ref(s):
        if not re.fullmatch(r"[0-9]{8}", s):
            return None
        try:
            d = dt.datetime.strptime(s, "%y%m%d%H")
        except ValueError:
            return None
        return d if d.strftime("%y%m%d%H") == s else None

    check = BlockChecker("avazu f", 2, len(vals), lenient=True, issues=IssueCounter())
    hod, wd, bad = parse_hour(pa.array(vals, pa.string()), check)
    refs = [ref(v) for v in vals]
    assert bad.tolist() == [r is None for r in refs]
    assert [h for h, r in zip(hod.to_pylist(), refs, strict=True) if r] == [str(r.hour) for r in refs if r]
    assert [w for w, r in zip(wd.to_pylist(), refs, strict=True) if r] == [str(r.weekday()) for r in refs if r]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(4096, 40000), st.booleans())
def test_blocks_cover_every_line_with_exact_line_numbers(tmp_path, block_size, header):
    path = tmp_path / "f.csv"
    lines = [f"{i},{'x' * (i % 37)},{i * 7 % 13}" for i in range(2000)]
    path.write_text(("a,b,c\n" if header else "") + "\n".join(lines))  # no final newline
    src = TextSource(
        path=path,
        dataset="t",
        delimiter=",",
        column_names=["a", "b", "c"],
        column_types={c: pa.string() for c in "abc"},
        header=header,
    )
    got, expect_line = [], 1 + header
    for block in iter_blocks(src, lenient=False, issues=IssueCounter(), block_size=block_size):
        assert block.first_line == expect_line and block.start_row == len(got)
        got += block.batch.column("a").to_pylist()
        expect_line += len(block)
    assert got == [str(i) for i in range(2000)]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**40), st.integers(0, 5000), st.integers(0, 3000), st.integers(0, 2**31))
def test_split_assignment_does_not_depend_on_blocks(start, n, cut, seed):
    cut = min(cut, n)
    fr = (0.8, 0.1, 0.1)
    whole = assign_splits(fr, seed, 0, start, n)
    parts = np.concatenate([assign_splits(fr, seed, 0, start, cut), assign_splits(fr, seed, 0, start + cut, n - cut)])
    assert whole.tolist() == parts.tolist()
    assert set(whole.tolist()) <= {0, 1, 2}


def test_split_assignment_is_pinned():
    # pinned values: a change would silently move rows between the splits of re-converted data sets
    assert row_uniforms(7, 2, 1000, 4).tolist() == [
        0.33439820337215287,
        0.4477154590342701,
        0.030801835650456133,
        0.5086620593758432,
    ]
    assert assign_splits((0.8, 0.1, 0.1), 3, 0, 0, 20).tolist() == [
        0,
        0,
        0,
        0,
        1,
        2,
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        2,
        0,
        1,
    ]


def test_split_fractions_and_seeds():
    u = row_uniforms(0, 0, 0, 200_000)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    codes = assign_splits((0.9, 0.05, 0.05), 1, 0, 0, 200_000)
    assert abs(np.mean(codes == 0) - 0.9) < 0.005 and abs(np.mean(codes == 2) - 0.05) < 0.005
    assert not np.array_equal(codes, assign_splits((0.9, 0.05, 0.05), 2, 0, 0, 200_000))
    assert not np.array_equal(codes, assign_splits((0.9, 0.05, 0.05), 1, 1, 0, 200_000))
    assert check_fractions([0.9, 0, 0.1]) == (0.9, 0.0, 0.1)
    for bad in ([0.5, 0.6, 0.1], [0, 0.5, 0.5], [1, 0], [-0.1, 0.6, 0.5], [float("nan"), 0.5, 0.5]):
        with pytest.raises(ValueError):
            check_fractions(bad)
