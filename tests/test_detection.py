"""OOD detection metrics against hand-computed values and an independent count."""

import numpy as np
import pytest

from calibrun.detection import SCORES, detection_metrics, msp, neg_entropy

# In-distribution scores 0.9, 0.8, 0.7, 0.6; out-of-distribution 0.75, 0.5, 0.4.
S_IN, S_OUT = np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.75, 0.5, 0.4])


def test_detection_metrics_by_hand():
    m = detection_metrics(S_IN, S_OUT)
    # AUROC: pairs (in, out) with in > out: 3 + 3 + 2 + 2 = 10 of 12.
    assert m["auroc"] == pytest.approx(10 / 12, abs=1e-12)
    # AUPR-in: ranked 0.9 in, 0.8 in, 0.75 out, 0.7 in, 0.6 in; precision at each in: 1, 1, 3/4, 4/5.
    assert m["aupr_in"] == pytest.approx((1 + 1 + 3 / 4 + 4 / 5) / 4, abs=1e-12)
    # AUPR-out on the negated score: 0.4 out, 0.5 out, 0.6 in, 0.7 in, 0.75 out -> 1, 1, 3/5.
    assert m["aupr_out"] == pytest.approx((1 + 1 + 3 / 5) / 3, abs=1e-12)
    # 95% TPR needs all four in-distribution inputs, threshold 0.6: only 0.75 of the out set passes.
    assert m["fpr95"] == pytest.approx(1 / 3, abs=1e-12)


def test_a_perfectly_separating_score():
    m = detection_metrics([0.9, 0.8, 0.99], [0.1, 0.2])
    assert m == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}


def test_auroc_agrees_with_a_pair_count_on_random_scores():
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(1, 1, 300).round(1), rng.normal(0, 1, 200).round(1)  # with ties
    pairs = (s_in[:, None] > s_out[None, :]).mean() + 0.5 * (s_in[:, None] == s_out[None, :]).mean()
    assert detection_metrics(s_in, s_out)["auroc"] == pytest.approx(pairs, abs=1e-12)
    # FPR95 by direct search: the largest threshold accepting >= 95% of s_in.
    threshold = np.sort(s_in)[::-1][int(np.ceil(0.95 * len(s_in))) - 1]
    assert detection_metrics(s_in, s_out)["fpr95"] == pytest.approx((s_out >= threshold).mean(), abs=1e-12)


def test_scores_are_higher_for_confident_rows():
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    np.testing.assert_allclose(msp(probs), [1.0, 0.5, 1 / 3])
    np.testing.assert_allclose(neg_entropy(probs), [0.0, 0.5 * np.log(0.5) + 0.5 * np.log(0.25), np.log(1 / 3)])
    for score in SCORES.values():
        assert np.all(np.diff(score(probs)) < 0)


def test_empty_scores_are_refused():
    with pytest.raises(ValueError, match="non-empty"):
        detection_metrics([], [0.1])
