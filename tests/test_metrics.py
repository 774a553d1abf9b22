import math

import numpy as np
import pandas as pd
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from calibrun import UserError, metrics
from calibrun.metrics import (
    METRIC_NAMES,
    accuracy,
    collapse_threshold,
    adaptive_ece,
    bin_stats,
    brier,
    classwise_ece,
    ece,
    scores,
    mce,
    nll,
    overconfidence_error,
)


def _random_probs(seed: int, n: int, k: int, scale: float) -> tuple[torch.Tensor, np.ndarray]:
    """float32 softmax probabilities and labels that are right ~70% of the time."""
    rng = np.random.default_rng(seed)
    probs = torch.softmax(torch.tensor(rng.normal(size=(n, k)) * scale, dtype=torch.float32), dim=1)
    pred = probs.argmax(dim=1).numpy()
    labels = np.where(rng.random(n) < 0.7, pred, rng.integers(0, k, size=n))
    return probs, labels


# Three samples with M = 4 (edges 0, .25, .5, .75, 1 are exact in float64):
#   conf 1.0  correct -> bin 4 (0.75, 1]   (the top edge is kept, not dropped)
#   conf 0.5  wrong   -> bin 2 (0.25, 0.5] (a value on an edge goes to the bin it closes)
#   conf 0.75 correct -> bin 3 (0.5, 0.75]
#   bin 1 is empty.
HAND_PROBS = np.array([[1.0, 0.0, 0.0], [0.5, 0.25, 0.25], [0.75, 0.25, 0.0]])
HAND_LABELS = np.array([0, 1, 0])


# --- 1. agreement with torchmetrics -----------------------------------------------------


@pytest.mark.parametrize(("seed", "scale"), [(0, 1.0), (1, 2.5), (2, 4.0), (3, 8.0)])
def test_ece_mce_match_torchmetrics(seed: int, scale: float) -> None:
    n_bins = 15
    probs, labels = _random_probs(seed, n=2000, k=10, scale=scale)
    # torchmetrics bins are left-closed [lo, hi) (torch.bucketize(right=True)) and it
    # casts confidences to float32, while ours are right-closed in float64; the two agree
    # only away from the edges, so drop samples whose confidence is within 1e-4 of m/M.
    # Both sides read the same float32 probabilities (float32 -> float64 is exact).
    conf = probs.max(dim=1).values.double().numpy()
    keep = np.abs(conf * n_bins - np.round(conf * n_bins)) / n_bins > 1e-4
    assert keep.sum() > 1500  # at scale 8 about a tenth saturate at exactly 1.0
    probs, labels = probs[torch.from_numpy(keep)], labels[keep]
    target = torch.from_numpy(labels)

    ours = scores(probs, labels, n_bins=n_bins)
    expected_ece = multiclass_calibration_error(probs, target, num_classes=10, n_bins=n_bins, norm="l1")
    expected_mce = multiclass_calibration_error(probs, target, num_classes=10, n_bins=n_bins, norm="max")

    assert ours["ece"] > 0.01  # a miscalibrated model, so the comparison is not 0 == 0
    assert ours["ece"] == pytest.approx(float(expected_ece), abs=1e-6)
    assert ours["mce"] == pytest.approx(float(expected_mce), abs=1e-6)


# --- 2. bin assignment and hand-computed edge cases -------------------------------------


@pytest.mark.parametrize("n_bins", range(1, 61))
def test_multiples_of_bin_width_land_in_the_bin_they_close(n_bins: int) -> None:
    m = np.arange(n_bins + 1)
    # m / M goes to bin m (0-based m - 1); 0 goes to the first bin.
    expected = np.maximum(m - 1, 0)
    np.testing.assert_array_equal(metrics.equal_width_index(m / n_bins, n_bins), expected)


def test_equal_width_bins_of_any_score_by_hand() -> None:
    # The public helper histogram binning uses: scores need not be top-label confidences.
    # M = 4: 0 and .25 in bin 1, .3 in bin 2, bin 3 empty, 1.0 in bin 4.
    bins = metrics.equal_width_bins(np.array([0.0, 0.25, 0.3, 1.0]), np.array([1.0, 0.0, 1.0, 1.0]), 4)
    assert bins.count.tolist() == [2, 1, 0, 1]
    np.testing.assert_allclose(bins.conf, [0.125, 0.3, np.nan, 1.0])
    np.testing.assert_allclose(bins.acc, [0.5, 1.0, np.nan, 1.0])


def test_hand_case_edges_and_empty_bin() -> None:
    stats = bin_stats(HAND_PROBS, HAND_LABELS, n_bins=4)
    assert stats["count"].tolist() == [0, 1, 1, 1]
    assert math.isnan(stats["conf"][0]) and math.isnan(stats["acc"][0])
    np.testing.assert_allclose(stats["conf"][1:], [0.5, 0.75, 1.0])
    np.testing.assert_allclose(stats["acc"][1:], [0.0, 1.0, 1.0])

    # ECE = 1/3 * (|0 - 0.5| + |1 - 0.75| + |1 - 1|) = 0.25
    assert ece(HAND_PROBS, HAND_LABELS, n_bins=4) == pytest.approx(0.25)
    # MCE skips the empty bin instead of returning NaN: max(0.5, 0.25, 0) = 0.5
    assert mce(HAND_PROBS, HAND_LABELS, n_bins=4) == pytest.approx(0.5)
    # OE = 1/3 * 0.5 * (0.5 - 0); the underconfident bin 3 and exact bin 4 add nothing.
    assert overconfidence_error(HAND_PROBS, HAND_LABELS, n_bins=4) == pytest.approx(1 / 12)


def test_zero_probability_is_binned_in_classwise_ece() -> None:
    probs = np.array([[1.0, 0.0], [1.0, 0.0]])
    labels = np.array([0, 1])
    # class 0: p = 1, 1 in bin 4, hit rate 1/2 -> |0.5 - 1| = 0.5
    # class 1: p = 0, 0 in bin 1, hit rate 1/2 -> |0.5 - 0| = 0.5
    # mean 0.5; dropping the zeros would give (0.5 + 0) / 2 = 0.25.
    assert classwise_ece(probs, labels, n_bins=4) == pytest.approx(0.5)


def test_single_sample() -> None:
    probs = np.array([[0.2, 0.8]])
    labels = np.array([0])
    result = scores(probs, labels)
    # conf 0.8, wrong: every gap is |0 - 0.8|; 14 of the 15 adaptive groups are empty.
    assert result["accuracy"] == 0.0
    assert result["ece"] == pytest.approx(0.8)
    assert result["mce"] == pytest.approx(0.8)
    assert result["ada_ece"] == pytest.approx(0.8)
    # class 0: |1 - 0.2| = 0.8, class 1: |0 - 0.8| = 0.8
    assert result["classwise_ece"] == pytest.approx(0.8)
    assert result["oe"] == pytest.approx(0.8 * 0.8)
    assert result["nll"] == pytest.approx(-math.log(0.2))
    # (0.2 - 1)^2 + (0.8 - 0)^2
    assert result["brier"] == pytest.approx(1.28)
    assert result["n"] == 1


# --- 3. hand-computed adaptive / classwise / OE / NLL / Brier ---------------------------


def test_adaptive_ece_hand_computed() -> None:
    # Rows deliberately out of confidence order. Sorted: .6 .7 .8 (all right) | .9 (wrong) .95 (right);
    # np.array_split(5, 2) makes groups of 3 and 2.
    probs = np.array([[0.05, 0.95], [0.8, 0.2], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    labels = np.array([1, 0, 1, 1, 0])
    # group 1: acc 1,   conf 0.7   -> 3/5 * 0.3   = 0.18
    # group 2: acc 0.5, conf 0.925 -> 2/5 * 0.425 = 0.17
    assert adaptive_ece(probs, labels, n_bins=2) == pytest.approx(0.35)
    # Equal-width bins put all five in (0.5, 1]: |0.8 - 0.79| = 0.01, so the two differ.
    assert ece(probs, labels, n_bins=2) == pytest.approx(0.01)


def test_classwise_ece_hand_computed() -> None:
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    labels = np.array([0, 1])
    # M = 2, bins [0, .5] and (.5, 1]
    # class 0: .6 -> bin 2 hit 1, gap .4; .2 -> bin 1 hit 0, gap .2 -> (.4 + .2) / 2 = .3
    # class 1: .3 and .2 -> bin 1, conf .25, hit rate .5            -> .25
    # class 2: .1 -> bin 1 hit 0, gap .1; .6 -> bin 2 hit 0, gap .6 -> (.1 + .6) / 2 = .35
    assert classwise_ece(probs, labels, n_bins=2) == pytest.approx((0.3 + 0.25 + 0.35) / 3)


def test_overconfidence_error_only_counts_overconfident_bins() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    # M = 2: all four in (0.5, 1], conf (0.9 + 0.9 + 0.7 + 0.6) / 4 = 0.775, acc 0.75
    # OE = 1 * 0.775 * (0.775 - 0.75) = 0.019375
    assert overconfidence_error(probs, labels, n_bins=2) == pytest.approx(0.019375)
    # M = 10: bin 9 (.8, .9]: conf .9, acc .5 -> 2/4 * .9 * .4 = 0.18; bins 6 and 7 are
    # right with conf .6 and .7, i.e. underconfident, and add nothing.
    assert overconfidence_error(probs, labels, n_bins=10) == pytest.approx(0.18)


def test_nll_brier_accuracy_hand_computed() -> None:
    probs = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]])
    labels = np.array([0, 1, 0])
    # -(log .5 + log .8 + log .2) / 3
    assert nll(probs, labels) == pytest.approx(-(math.log(0.5) + math.log(0.8) + math.log(0.2)) / 3)
    # (.25 + .0625 + .0625) + (.01 + .04 + .01) + (.64 + .09 + .25) = .375 + .06 + .98
    assert brier(probs, labels) == pytest.approx((0.375 + 0.06 + 0.98) / 3)
    assert accuracy(probs, labels) == pytest.approx(2 / 3)


def test_nll_stays_finite_when_true_class_has_zero_probability() -> None:
    value = nll(np.array([[1.0, 0.0]]), np.array([1]))
    assert math.isfinite(value) and value > 20


# --- 4. input handling and validation ---------------------------------------------------


def test_torch_and_numpy_inputs_agree() -> None:
    probs, labels = _random_probs(seed=5, n=300, k=5, scale=3.0)
    from_torch = scores(probs, torch.from_numpy(labels))
    from_numpy = scores(probs.numpy(), labels)
    assert from_torch == pytest.approx(from_numpy)
    assert list(from_torch) == [*METRIC_NAMES, "n"]
    assert all(type(v) is float for key, v in from_torch.items() if key != "n")
    assert type(from_torch["n"]) is int and from_torch["n"] == 300


@pytest.mark.filterwarnings("error")
def test_no_warnings_with_empty_bins_and_zero_probabilities() -> None:
    scores(HAND_PROBS, HAND_LABELS, n_bins=50)


def test_logits_are_rejected() -> None:
    logits = np.random.default_rng(0).normal(size=(8, 4)) * 3
    with pytest.raises(ValueError, match="probabilities \\(not logits\\)"):
        scores(logits, np.zeros(8, dtype=int))


@pytest.mark.parametrize(
    ("probs", "labels", "n_bins", "message"),
    [
        (np.array([0.5, 0.5]), np.array([0]), 15, "2-D"),
        (np.array([[0.5, 0.5]]), np.array([[0]]), 15, "1-D"),
        (np.array([[0.5, 0.5]]), np.array([0, 1]), 15, "rows"),
        (np.zeros((0, 3)), np.zeros(0, dtype=int), 15, "non-empty"),
        (np.array([[0.5, 0.5]]), np.array([0]), 0, "n_bins"),
        (np.array([[0.5, 0.5]]), np.array([0.0]), 15, "integer"),
        (np.array([[0.5, 0.5]]), np.array([2]), 15, "labels must lie"),
        (np.array([[np.nan, 1.0]]), np.array([0]), 15, "NaN"),
        (np.array([[1.5, -0.5]]), np.array([0]), 15, "not logits"),
    ],
)
def test_invalid_inputs_raise(probs: np.ndarray, labels: np.ndarray, n_bins: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scores(probs, labels, n_bins=n_bins)


# --- 5. bin_stats table ------------------------------------------------------------------


def test_bin_stats_table_shape_and_consistency_with_ece() -> None:
    n_bins = 15
    probs, labels = _random_probs(seed=7, n=1000, k=10, scale=2.0)
    stats = bin_stats(probs, labels, n_bins=n_bins)

    assert list(stats.columns) == ["bin", "lo", "hi", "count", "conf", "acc", "acc_lo", "acc_hi"]
    assert stats["bin"].tolist() == list(range(1, n_bins + 1))
    assert pd.api.types.is_integer_dtype(stats["count"])
    assert stats["count"].sum() == 1000
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    np.testing.assert_allclose(stats["lo"], edges[:-1], rtol=0, atol=1e-15)
    np.testing.assert_allclose(stats["hi"], edges[1:], rtol=0, atol=1e-15)

    # Every non-empty bin's mean confidence lies inside it, and the table reproduces ECE.
    filled = stats[stats["count"] > 0]
    assert ((filled["conf"] > filled["lo"]) & (filled["conf"] <= filled["hi"])).all()
    table_ece = float((filled["count"] / 1000 * (filled["acc"] - filled["conf"]).abs()).sum())
    assert table_ece == pytest.approx(ece(probs, labels, n_bins=n_bins), abs=1e-12)


def test_collapse_threshold_is_chance_plus_a_share_of_the_way_to_one():
    assert collapse_threshold(10) == pytest.approx(0.1 + 0.25 * 0.9)
    assert collapse_threshold(4, 0.5) == pytest.approx(0.25 + 0.5 * 0.75)
    assert collapse_threshold(100, 0.0) == pytest.approx(0.01)
    with pytest.raises(UserError, match="collapse_margin"):
        collapse_threshold(10, 1.0)


def test_wilson_interval_by_hand_and_empty_bins() -> None:
    """7 hits in 10 at 95% (z = 1.95996): centre (0.7 + z²/20)/(1 + z²/10) = 0.64449,
    half-width z/(1 + z²/10)·sqrt(0.021 + z²/400) = 0.24772, so [0.39677, 0.89221]."""
    lo, hi = metrics.wilson_interval(np.array([7.0, 0.0]), np.array([10, 0]))
    assert lo[0] == pytest.approx(0.39677, abs=2e-5) and hi[0] == pytest.approx(0.89221, abs=2e-5)
    assert np.isnan(lo[1]) and np.isnan(hi[1])
    table = bin_stats(np.array([[0.9, 0.1]] * 10), np.array([0] * 7 + [1] * 3), n_bins=5)
    row = table[table["count"] > 0].iloc[0]
    assert (row["acc_lo"], row["acc_hi"]) == pytest.approx((lo[0], hi[0]))
