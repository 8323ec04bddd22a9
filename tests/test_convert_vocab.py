"""Property tests of the categorical-id machinery: string hashing, streamed counting, vocabularies."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_pipes.convert.vocab import NULL_HASH, OOV_ID, HashEncoder, VocabCounter, hash_strings
from data_pipes.hashing import mix64, splitmix64, unit_interval

values = st.lists(
    st.one_of(st.none(), st.text(max_size=20), st.sampled_from(["", "a", "a\x00", "abcdefgh", "abcdefgh\x00", "ab"])),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(values, st.integers(0, 60))
def test_hash_is_per_value_and_independent_of_the_chunk(vals: list[str | None], cut: int):
    arr = pa.array(vals, pa.string())
    h = hash_strings(arr)
    assert h.dtype == np.uint64 and len(h) == len(vals)
    # equal values <-> equal hashes (64-bit: no collisions among a few dozen values)
    for i, a in enumerate(vals):
        for j, b in enumerate(vals):
            assert (h[i] == h[j]) == (a == b)
    # the hash of a value does not depend on its neighbours, the slice offset or the string flavour
    cut = min(cut, len(vals))
    assert hash_strings(arr.slice(cut)).tolist() == h[cut:].tolist()
    singles = [hash_strings(pa.array([v], pa.string()))[0] for v in vals]
    assert h.tolist() == [int(x) for x in singles]
    enc = [None if v is None else v.encode() for v in vals]
    assert hash_strings(pa.array(enc, pa.binary())).tolist() == h.tolist()
    assert hash_strings(pa.array(vals, pa.large_string())).tolist() == h.tolist()
    assert all(x == NULL_HASH for x, v in zip(h, vals, strict=True) if v is None)


def test_hash_is_stable_across_runs():
    # pinned values: a change would silently remap every hashed id of existing data sets
    assert hash_strings(pa.array(["68fd1e64", "", None, "a much longer categorical value"])).tolist() == [
        2024217630740360524,
        11286133854226296554,
        7640891576956012808,
        8201769870534047778,
    ]
    assert int(hash_strings(pa.array(["abc"]))[0]) == 4658521565417623649


def test_splitmix64_is_pinned():
    # the one splitmix64 of data_pipes (synth's planted tables, the converters' split assignment)
    x = np.array([0, 1, 2**63, 12345678901234567], dtype=np.uint64)
    assert mix64(x).tolist() == [0, 6238072747940578789, 2720858781877447050, 8721909405978493183]
    assert x.tolist() == [0, 1, 2**63, 12345678901234567], "mix64 must not modify its argument"
    assert splitmix64(np.arange(3, dtype=np.uint64), 0).tolist() == [0, 16294208416658607535, 7960286522194355700]
    assert (
        splitmix64(np.array([5], dtype=np.uint64), 2**64 + 7).tolist()
        == splitmix64(np.array([5], np.uint64), 7).tolist()
    )
    u = unit_interval(splitmix64(np.arange(10_000, dtype=np.uint64), 3))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from(["a", "b", "c", "d", "", None, "x" * 17, "yy"]), max_size=300),
    st.lists(st.integers(1, 40), min_size=1, max_size=20),
    st.integers(1, 4),
)
def test_streamed_counts_match_counter_for_any_chunking(vals, cuts, min_count):
    counter = VocabCounter(merge_min=3)  # merge often
    pos, k = 0, 0
    while pos < len(vals):
        step = cuts[k % len(cuts)]
        counter.add(pa.array(vals[pos : pos + step], pa.string()))
        pos, k = pos + step, k + 1
    ref = Counter(vals)
    assert len(counter) == len(ref) and counter.total == len(vals)
    for v, n in ref.items():
        assert counter.count_of(v) == n
    vocab = counter.finalize(min_count)
    kept = {v for v, n in ref.items() if n >= min_count}
    assert vocab.cardinality == len(kept) + 1
    ids = vocab.encode(pa.array(vals + ["never seen"], pa.string()))
    assert ids[-1] == OOV_ID
    for v, i in zip(vals, ids[:-1], strict=True):
        assert (i != OOV_ID) == (v in kept)
    got = {v: i for v, i in zip(vals, ids[:-1], strict=True) if i != OOV_ID}
    assert sorted(got.values()) == list(range(1, len(kept) + 1))
    # ids rank by decreasing count
    by_id = sorted(got, key=got.get)
    assert [ref[v] for v in by_id] == sorted((ref[v] for v in by_id), reverse=True)


def test_multi_hot_values_count_and_encode_per_element():
    bags = pa.array([["a", "b"], ["a"], [], ["c", "a"]], pa.list_(pa.string()))
    c = VocabCounter()
    c.add(bags)
    assert (c.count_of("a"), c.count_of("b"), c.total) == (3, 1, 5)
    vocab = c.finalize(2)
    assert vocab.encode(bags).tolist() == [1, 0, 1, 0, 1]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(max_size=8), max_size=50), st.integers(2, 1000))
def test_hash_encoder_range(vals, buckets):
    enc = HashEncoder(buckets)
    ids = enc.encode(pa.array(vals, pa.string()))
    assert enc.cardinality == buckets
    assert ((ids >= 1) & (ids < buckets)).all()
    assert ids.tolist() == enc.lookup(hash_strings(pa.array(vals, pa.string()))).tolist()


def test_bad_parameters():
    with pytest.raises(ValueError):
        HashEncoder(1)
    with pytest.raises(ValueError):
        VocabCounter().finalize(0)
    with pytest.raises(TypeError):
        hash_strings(pa.array([1, 2]))
    empty = VocabCounter().finalize(1)
    assert empty.cardinality == 1 and empty.encode(pa.array(["a"])).tolist() == [0]
