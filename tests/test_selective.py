"""Selective prediction (calibrun.selective): AURC, E-AURC, AUGRC and the risk–coverage curve."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from calibrun.logits import load_logits
from calibrun.metrics import Weighted, validated
from calibrun.selective import (aurc, augrc, curve_points, excess_aurc, risk_columns, risk_coverage, risks_at,
                                risks_at_weighted, selective_risk)

DEMO_LOGITS = Path(__file__).resolve().parent / "fixtures" / "demo_logits"


def _two_class(confidence: list[float], correct: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Binary probabilities whose top label is class 0 at ``confidence``; label 0 where correct."""
    c = np.asarray(confidence)
    return np.column_stack([c, 1 - c]), np.where(np.asarray(correct) == 1, 0, 1)


def test_six_samples_by_hand():
    # By confidence: right, wrong, right, right, wrong, wrong -> errors among the k first: 0 1 1 1 2 3.
    p, y = _two_class([0.9, 0.8, 0.7, 0.6, 0.55, 0.51], [1, 0, 1, 1, 0, 0])
    coverage, risk = risk_coverage(p, y)
    np.testing.assert_allclose(coverage, np.arange(1, 7) / 6)
    np.testing.assert_allclose(risk, [0, 1 / 2, 1 / 3, 1 / 4, 2 / 5, 3 / 6])
    assert aurc(p, y) == pytest.approx((0 + 1 / 2 + 1 / 3 + 1 / 4 + 2 / 5 + 3 / 6) / 6, abs=1e-14)
    # The best ranking at 3 errors: 0 0 0 1 2 3 -> (1/4 + 2/5 + 3/6) / 6.
    assert excess_aurc(p, y) == pytest.approx(aurc(p, y) - (1 / 4 + 2 / 5 + 3 / 6) / 6, abs=1e-14)
    assert augrc(p, y) == pytest.approx((0 + 1 + 1 + 1 + 2 + 3) / 36, abs=1e-14)
    assert selective_risk(p, y, 0.5) == pytest.approx(1 / 3)
    assert selective_risk(p, y, 1.0) == pytest.approx(1 / 2)


def test_ties_are_the_average_over_every_order_of_the_tied_samples():
    p, y = _two_class([0.9, 0.7, 0.7, 0.7, 0.6, 0.6], [1, 0, 1, 1, 0, 1])
    orders = []
    for first in itertools.permutations([1, 2, 3]):
        for second in itertools.permutations([4, 5]):
            errors = np.cumsum((p.argmax(1) != y)[[0, *first, *second]])
            orders.append(((errors / np.arange(1, 7)).mean(), errors.mean() / 6))
    expected_aurc, expected_augrc = np.mean(orders, axis=0)
    assert aurc(p, y) == pytest.approx(expected_aurc, abs=1e-14)
    assert augrc(p, y) == pytest.approx(expected_augrc, abs=1e-14)
    shuffled = np.random.default_rng(0).permutation(6)
    assert aurc(p[shuffled], y[shuffled]) == pytest.approx(aurc(p, y), abs=1e-14)


def _loop_reference(confidence: np.ndarray, wrong: np.ndarray) -> tuple[float, float]:
    """AURC and AUGRC by thresholds: at each distinct confidence, the samples at or above
    it are answered; the curve is flat-averaged over the positions a tied block spans."""
    n, area, generalized, answered, errors = len(wrong), 0.0, 0.0, 0, 0.0
    for threshold in sorted(set(confidence.tolist()), reverse=True):
        block = confidence == threshold
        rate = wrong[block].mean()
        for _ in range(int(block.sum())):
            answered += 1
            errors += rate
            area += errors / answered
            generalized += errors / n
    return area / n, generalized / n


def test_aurc_and_augrc_match_a_threshold_loop_on_real_logits():
    z, y = load_logits(DEMO_LOGITS / "test.npz")
    p = torch.softmax(torch.as_tensor(z, dtype=torch.float64), dim=1).numpy()
    expected_aurc, expected_augrc = _loop_reference(p.max(1), (p.argmax(1) != y).astype(float))
    assert aurc(p, y) == pytest.approx(expected_aurc, abs=1e-12)
    assert augrc(p, y) == pytest.approx(expected_augrc, abs=1e-12)
    # Geifman et al.'s closed form approximates the discrete optimum at n = 1,000.
    r = float((p.argmax(1) != y).mean())
    assert aurc(p, y) - excess_aurc(p, y) == pytest.approx(r + (1 - r) * np.log(1 - r), abs=2e-3)
    assert 0 < excess_aurc(p, y) < aurc(p, y)


@pytest.mark.parametrize("coverage", [0.0, -0.1, 1.5])
def test_a_coverage_outside_zero_one_is_refused(coverage):
    p, y = _two_class([0.9, 0.8], [1, 0])
    with pytest.raises(ValueError, match="coverage must be in"):
        selective_risk(p, y, coverage)


def test_risks_at_coverages_and_their_columns_by_hand():
    # The six samples above: at 50% coverage the 3 most confident hold 1 error, at 2/3 the 4 first hold 1.
    p, y = _two_class([0.9, 0.8, 0.7, 0.6, 0.55, 0.51], [1, 0, 1, 1, 0, 0])
    np.testing.assert_allclose(risks_at(p, y, [0.5, 2 / 3, 1.0]), [1 / 3, 1 / 4, 3 / 6])
    assert risk_columns(p, y, [0.8, 0.95, 0.875]) == {
        "risk_at_80": pytest.approx(2 / 5), "risk_at_95": pytest.approx(3 / 6), "risk_at_87.5": pytest.approx(3 / 6)}
    curve = curve_points(p, y)
    assert list(curve.columns) == ["coverage", "risk"] and curve["risk"].iloc[-1] == pytest.approx(0.5)
    assert curve.loc[curve["coverage"] == 0.5, "risk"].iloc[0] == pytest.approx(1 / 3)


def test_weighted_risks_equal_the_risks_of_the_resampled_images():
    """The bootstrap's selective risks (sample weights) equal risks_at on the resampled
    images themselves, ties included (confidences rounded to two decimals)."""
    rng = np.random.default_rng(0)
    n = 300
    p = np.round(rng.dirichlet(np.ones(5), n), 2)
    p, y = validated(p / p.sum(1, keepdims=True), rng.integers(0, 5, n))
    w = rng.multinomial(n, np.ones(n) / n, size=40).astype(float)
    coverages = [0.1, 0.5, 0.8, 0.9, 1.0]
    got = risks_at_weighted(Weighted(p, y, 1, w), coverages)
    for b in range(len(w)):
        drawn = np.repeat(np.arange(n), w[b].astype(int))
        np.testing.assert_allclose(got[:, b], risks_at(p[drawn], y[drawn], coverages), atol=1e-12)
