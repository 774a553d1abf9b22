"""Split conformal prediction sets (calibrun.conformal): coverage, hand values, errors."""

from __future__ import annotations

import numpy as np
import pytest

from calibrun import UserError
from calibrun.conformal import (
    METHODS,
    Settings,
    conformal_quantile,
    coverage,
    coverage_spread,
    label_scores,
    mean_set_size,
    prediction_sets,
    quantiles,
    set_columns,
    split_validation,
)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _exchangeable(rng: np.random.Generator, n: int, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """An overconfident model: labels follow softmax(z / 2), the model says softmax(z)."""
    z = rng.standard_normal((n, k)) * 3.0
    truth = _softmax(z / 2.0)
    labels = (truth.cumsum(1) < rng.random((n, 1))).sum(1)
    return _softmax(z), np.minimum(labels, k - 1)


@pytest.mark.parametrize("method", METHODS)
def test_coverage_over_200_draws_lies_within_the_finite_sample_bounds(method):
    """1 − α ≤ E[coverage] ≤ 1 − α + 1/(n + 1) for exchangeable data, whatever the model."""
    alpha, n_cal, n_test = 0.1, 200, 500
    covered, naive = [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        p_cal, y_cal = _exchangeable(rng, n_cal)
        p_test, y_test = _exchangeable(rng, n_test)
        sets, _ = prediction_sets(p_cal, y_cal, p_test, alpha, method, seed=seed)
        covered.append(coverage(sets, y_test))
        # Without the calibration split: the labels the model gives 1 − α of its mass.
        naive.append(coverage(label_scores(p_test, "aps", np.zeros(n_test)) < 1 - alpha, y_test))
    mean, se = np.mean(covered), np.std(covered, ddof=1) / np.sqrt(len(covered))
    assert 1 - alpha - 3 * se <= mean <= 1 - alpha + 1 / (n_cal + 1) + 3 * se, (mean, se)
    # The bound is not met by accident: the overconfident model's own sets cover less.
    assert np.mean(naive) < 1 - alpha - 0.05


def test_the_quantile_is_the_ceil_n_plus_1_times_1_minus_alpha_th_score_by_hand():
    scores = np.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])  # n = 9
    assert conformal_quantile(scores, 0.1) == 0.9  # ⌈10 × 0.9⌉ = 9th smallest
    assert conformal_quantile(scores, 0.2) == 0.8  # ⌈10 × 0.8⌉ = 8th
    assert conformal_quantile(scores, 0.5) == 0.5  # ⌈10 × 0.5⌉ = 5th


def test_lac_sets_by_hand():
    p_cal = np.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])
    y_cal = np.array([0, 1, 1, 2])  # scores 1 − p_y: 0.3, 0.6, 0.4, 0.2
    p_test = np.array([[0.5, 0.42, 0.08], [0.9, 0.05, 0.05]])  # scores 0.5, 0.58, 0.92 and 0.1, 0.95, 0.95
    sets, q = prediction_sets(p_cal, y_cal, p_test, alpha=0.2, method="lac")
    assert q == pytest.approx(0.6)  # ⌈5 × 0.8⌉ = 4th smallest of 0.2, 0.3, 0.4, 0.6
    np.testing.assert_array_equal(sets, [[True, True, False], [True, False, False]])
    assert mean_set_size(sets) == 1.5 and coverage(sets, [1, 0]) == 1.0


def test_aps_score_by_hand_and_raps_with_no_penalty_is_aps():
    p = np.array([[0.1, 0.6, 0.3]])
    u = np.array([0.5])
    # Label 2 is ranked second: mass above it 0.6, plus U·p = 0.15.
    np.testing.assert_allclose(label_scores(p, "aps", u), [[0.9 + 0.05, 0.3, 0.6 + 0.15]])
    np.testing.assert_allclose(label_scores(p, "raps", u, raps_lambda=0.0), label_scores(p, "aps", u))
    # RAPS adds λ per rank beyond k_reg: ranks 3, 1, 2 with k_reg = 1.
    np.testing.assert_allclose(label_scores(p, "raps", u, raps_lambda=0.1, raps_k_reg=1) - label_scores(p, "aps", u),
                               [[0.2, 0.0, 0.1]])


def test_sets_shrink_as_alpha_grows():
    rng = np.random.default_rng(3)
    p_cal, y_cal = _exchangeable(rng, 1000)
    p_test, _ = _exchangeable(rng, 1000)
    sizes = [mean_set_size(prediction_sets(p_cal, y_cal, p_test, a, "aps")[0]) for a in (0.05, 0.1, 0.2)]
    assert sizes[0] >= sizes[1] >= sizes[2] and sizes[0] > sizes[2]


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5])
def test_alpha_outside_zero_one_is_refused(alpha):
    p = np.array([[0.6, 0.4]] * 20)
    with pytest.raises(ValueError, match="alpha must be in"):
        prediction_sets(p, np.zeros(20, dtype=int), p, alpha)


def test_a_calibration_split_too_small_for_alpha_is_refused():
    p = np.array([[0.6, 0.4]] * 8)
    with pytest.raises(ValueError, match="8 samples is too small for alpha=0.1: it needs at least 9"):
        prediction_sets(p, np.zeros(8, dtype=int), p, 0.1)
    prediction_sets(np.array([[0.6, 0.4]] * 9), np.zeros(9, dtype=int), p, 0.1)  # 9 = 1/α − 1 is enough


def test_an_unknown_method_is_refused():
    p = np.array([[0.6, 0.4]] * 20)
    with pytest.raises(ValueError, match="allowed: lac, aps, raps"):
        prediction_sets(p, np.zeros(20, dtype=int), p, 0.1, method="thr")


def test_the_validation_split_is_divided_disjointly_and_reproducibly():
    settings = Settings(share=0.3, seed=4)
    fit, held = split_validation(1000, settings)
    assert len(held) == 300 and len(fit) == 700
    assert not set(fit) & set(held) and set(fit) | set(held) == set(range(1000))
    again = split_validation(1000, settings)
    assert all(np.array_equal(a, b) for a, b in zip((fit, held), again))
    assert not np.array_equal(held, split_validation(1000, Settings(share=0.3, seed=5))[1])


def test_a_held_out_part_too_small_for_alpha_names_the_keys():
    # α = 0.05 needs 19 held-out images; 0.1 of 150 is 15.
    with pytest.raises(UserError, match=r"metrics.conformal_share=0.1 holds out 15 .* metrics.conformal_alpha=0.05 "
                                        r"needs at least 19"):
        split_validation(150, Settings(alpha=0.05, share=0.1))


def test_run_quantiles_and_set_columns_equal_the_library_sets_blockwise():
    """What a run writes (quantiles on the held-out part, then coverage and size on test,
    scored in row blocks) equals prediction_sets on the same draws."""
    rng = np.random.default_rng(1)
    p_cal, y_cal = _exchangeable(rng, 300, k=40)
    p_test, y_test = _exchangeable(rng, 700, k=40)
    settings = Settings(seed=3)
    q = quantiles(p_cal, y_cal, settings)
    columns = set_columns(p_test, y_test, q, settings)
    for method in METHODS:
        u_cal = np.random.default_rng([3, 0]).random(300)
        scores = label_scores(p_cal, method, u_cal)[np.arange(300), y_cal]
        assert q[method] == conformal_quantile(scores, 0.1)
        u_test = np.random.default_rng([3, 1]).random(700)
        sets = label_scores(p_test, method, u_test) <= q[method]
        assert columns[f"set_coverage_{method}"] == pytest.approx(coverage(sets, y_test), abs=1e-12)
        assert columns[f"set_size_{method}"] == pytest.approx(mean_set_size(sets), abs=1e-12)
    # Blocks of 3 rows (the element budget forced down) give the same numbers.
    import calibrun.conformal as module
    budget, module._BLOCK_ELEMENTS = module._BLOCK_ELEMENTS, 3 * 40
    try:
        assert set_columns(p_test, y_test, q, settings) == pytest.approx(columns, abs=1e-12)
    finally:
        module._BLOCK_ELEMENTS = budget


def test_coverage_spread_is_that_of_the_quantile_over_calibration_draws():
    """Uniform scores: the coverage given a calibration draw is q̂ itself; over 4,000 draws
    of 250 its 2.5% and 97.5% quantiles match coverage_spread's Beta law."""
    rng = np.random.default_rng(0)
    q = np.array([conformal_quantile(rng.random(250), 0.1) for _ in range(4000)])
    lo, hi = coverage_spread(250, 0.1)
    assert np.quantile(q, [0.025, 0.975]) == pytest.approx([lo, hi], abs=0.005)
    assert lo < 0.9 < hi
