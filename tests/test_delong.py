"""DeLong's paired AUC test against its O(n²) definition and a paired bootstrap; the stored predictions round-trip."""

import math

import numpy as np
import pytest

from mlet_torchrec.experiments.delong import auc, delong_paired
from mlet_torchrec.experiments.predictions import decode_predictions, encode_predictions


def _brute(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """a − b and its DeLong variance straight from the definition (psi kernel over every positive/negative pair)."""

    def comps(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        return psi.mean(axis=1), psi.mean(axis=0)

    (a10, a01), (b10, b01) = comps(a), comps(b)
    d10, d01 = a10 - b10, a01 - b01
    return float(a10.mean() - b10.mean()), float(d10.var(ddof=1) / d10.size + d01.var(ddof=1) / d01.size)


def test_delong_matches_its_definition_with_ties():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    a = np.round(y + rng.normal(0, 1.5, 300), 1)  # rounded: many ties
    b = np.round(0.5 * y + rng.normal(0, 1.0, 300), 1)
    r = delong_paired(a, b, y)
    diff, var = _brute(a, b, y)
    assert r.diff == pytest.approx(diff) and r.se == pytest.approx(math.sqrt(var))
    assert r.auc_a == pytest.approx(auc(a, y)) and r.lo < r.diff < r.hi


def test_delong_se_agrees_with_a_paired_bootstrap_over_rows():
    rng = np.random.default_rng(2)
    n = 400
    y = (rng.random(n) < 0.22).astype(int)  # the Criteo sample's test set: ~400 rows, ~22% positive
    shared = rng.normal(0, 1, n)  # two models that agree on most rows, as two cells of one data set do
    a, b = y + shared + rng.normal(0, 0.5, n), y + shared + rng.normal(0, 0.6, n)
    r = delong_paired(a, b, y)
    boot = []
    for _ in range(1000):
        i = rng.integers(0, n, n)
        boot.append(auc(a[i], y[i]) - auc(b[i], y[i]))
    assert r.se == pytest.approx(float(np.std(boot, ddof=1)), rel=0.15)


def test_identical_scores_and_one_class():
    y = np.array([0, 1, 0, 1])
    s = np.array([0.1, 0.2, 0.3, 0.4])
    assert delong_paired(s, s, y).p == 1.0
    assert math.isnan(auc(s, np.zeros(4)))


def test_predictions_round_trip_in_float16():
    rng = np.random.default_rng(3)
    logits, labels = rng.normal(0, 2, 391), rng.integers(0, 2, 391)
    rec = encode_predictions(logits, labels)
    back, lab = decode_predictions(rec)
    assert rec["rows"] == 391 and (lab == labels).all()
    assert np.abs(back - logits).max() < 0.01 and abs(auc(back, lab) - auc(logits, labels)) < 0.002
    with pytest.raises(ValueError):
        encode_predictions(logits[:3], labels[:4])


def test_logits_beyond_float16_keep_their_order():
    """A diverged run's logits (|x| > 65504) became ±inf in float16 and tied: they are stored as float32."""
    rng = np.random.default_rng(4)
    logits, labels = rng.normal(0, 1e6, 391).astype(np.float32), rng.integers(0, 2, 391)
    rec = encode_predictions(logits, labels)
    back, lab = decode_predictions(rec)
    assert "logits_f16" not in rec and np.array_equal(back, logits) and (lab == labels).all()
    assert auc(back, lab) == auc(logits, labels)
    assert "logits_f16" in encode_predictions(np.array([65504.0, np.inf, -np.inf, np.nan]), np.zeros(4))
    with pytest.raises(ValueError, match="neither"):
        decode_predictions({"rows": 1, "labels_bits": ""})
