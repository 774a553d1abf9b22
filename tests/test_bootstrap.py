"""Smooth and debiased calibration errors, bootstrap intervals and paired differences."""

from __future__ import annotations

import re
from pathlib import Path

import calibration as kumar  # Kumar et al.'s own package (uncertainty-calibration), test-only
import numpy as np
import pandas as pd
import pytest
import relplot
from scipy.special import softmax

import calibrun
from calibrun import UserError, bootstrap, metrics
from calibrun.metrics import METRIC_NAMES, Weighted, _debiased_squared, weighted_scores
from calibrun.smooth import SmoothedResiduals

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "demo_logits"


def _fixture(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    data = np.load(FIXTURE / f"{split}.npz")
    return data["logits"].astype(np.float64), data["labels"]


def _draw(rng: np.random.Generator, n: int, temperature: float, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A model's probabilities and labels drawn from softmax(z / temperature): calibrated
    at temperature 1, overconfident above it."""
    z = rng.normal(size=(n, k)) * 2.0
    truth = softmax(z / temperature, axis=1)
    labels = (truth.cumsum(axis=1) > rng.uniform(size=(n, 1))).argmax(axis=1)
    return softmax(z, axis=1), labels


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_smooth_ece_equals_relplot_on_real_logits(temperature: float) -> None:
    logits, labels = _fixture()
    probs = softmax(logits / temperature, axis=1)
    conf, hit = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(float)
    reference, width = relplot.smECE(conf, hit, return_width=True)
    assert metrics.smooth_ece(probs, labels) == pytest.approx(reference, abs=1e-9)
    smoothed = SmoothedResiduals(conf, hit, np.ones((1, len(conf))))
    assert smoothed.bandwidth()[0] == width


def test_debiased_l2_by_hand() -> None:
    """Two equal-mass bins of three, boundary halfway between 0.9 and 0.95:
    bin 1: conf 0.8, acc 1/3: (0.8 − 1/3)² − (1/3)(2/3)/2 = 0.106667;
    bin 2: conf 0.96, acc 2/3: (0.96 − 2/3)² − (1/3)(2/3)/2 = −0.025067;
    half of each: 0.0408, whose root is 0.201990."""
    conf = np.array([0.7, 0.8, 0.9, 0.95, 0.96, 0.97])
    hit = np.array([0, 0, 1, 1, 1, 0])
    probs = np.column_stack([conf, 1 - conf])
    labels = np.where(hit == 1, 0, 1)
    assert metrics.debiased_l2_ce(probs, labels, n_bins=2) == pytest.approx(np.sqrt(0.0408), abs=1e-12)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_debiased_l2_equals_the_authors_code(temperature: float) -> None:
    logits, labels = _fixture()
    for probs in (softmax(logits / temperature, axis=1), softmax(np.round(logits / temperature), axis=1)):
        reference = kumar.lower_bound_scaling_top_ce(probs, labels, p=2, debias=True, num_bins=15)
        assert metrics.debiased_l2_ce(probs, labels, 15) == pytest.approx(reference, abs=1e-12)


def test_debiased_estimate_is_unbiased_on_a_calibrated_model() -> None:
    """The squared estimate before its root averages to 0 over draws from a perfectly
    calibrated model (within 3 standard errors), where the plug-in one is far above."""
    rng = np.random.default_rng(0)
    debiased, plugin = [], []
    for _ in range(300):
        probs, labels = _draw(rng, 1000, temperature=1.0)
        sample = Weighted(probs, labels, 15, np.ones((1, 1000)))
        debiased.append(_debiased_squared(sample)[0])
        count, conf_sum, hit_sum = (x[0] for x in sample.top_label_bins)
        plugin.append(np.sum(np.divide((hit_sum - conf_sum) ** 2, count, where=count > 0, out=np.zeros(15))) / 1000)
    mean, error = np.mean(debiased), np.std(debiased) / np.sqrt(len(debiased))
    assert abs(mean) < 3 * error
    assert np.mean(plugin) > mean + 20 * error


def test_every_metric_on_count_weights_equals_the_metric_of_the_resampled_images() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(400, 6)) * 2
    logits[::3] = np.round(logits[::3])  # tied confidences across bins' edges
    probs, labels = softmax(logits, axis=1), rng.integers(0, 6, 400)
    settings = bootstrap.Settings(resamples=6, seed=1)
    fast = bootstrap.resampled(probs, labels, 15, settings)
    weights = next(bootstrap.resample_weights(400, settings))
    for b, row in enumerate(weights):
        images = np.repeat(np.arange(400), row.astype(int))
        naive = metrics.scores(probs[images], labels[images], 15)
        for i, name in enumerate(METRIC_NAMES):
            # Resamples smooth their residuals in single precision.
            assert fast[i, b] == pytest.approx(naive[name], rel=1e-5, abs=1e-12), name


def test_resampled_weights_are_a_multinomial_draw_fixed_by_the_seed() -> None:
    settings = bootstrap.Settings(resamples=5000, seed=7)
    chunks = list(bootstrap.resample_weights(30, settings))
    weights = np.concatenate(chunks)
    assert weights.shape == (5000, 30) and (weights.sum(axis=1) == 30).all()
    assert weights.mean() == pytest.approx(1.0) and weights.var() == pytest.approx(1 - 1 / 30, rel=0.03)
    assert np.array_equal(weights, np.concatenate(list(bootstrap.resample_weights(30, settings))))


def _coverage(temperature: float, draws: int, n: int) -> dict[str, float]:
    """Share of ``draws`` test sets of size n whose interval covers the population value
    (the metric on 400,000 draws of the same model) for each metric."""
    rng = np.random.default_rng(11)
    truth = metrics.scores(*_draw(rng, 400_000, temperature))
    covered = dict.fromkeys(METRIC_NAMES, 0)
    for draw in range(draws):
        probs, labels = _draw(rng, n, temperature)
        row = calibrun.scores(probs, labels, intervals=True, resamples=200, seed=draw)
        for name in METRIC_NAMES:
            covered[name] += row[f"{name}_lo"] <= truth[name] <= row[f"{name}_hi"]
    return {name: count / draws for name, count in covered.items()}


def test_intervals_cover_the_population_value_in_simulation() -> None:
    """200 test sets from a known overconfident model: the 95% intervals of accuracy, NLL
    and Brier cover the population value in at least 90% of them, and so does the ECE
    interval, whose basic form corrects the plug-in's upward bias; on a perfectly
    calibrated model no ECE interval does (docs/guide/intervals.md: it is no test of a
    calibration error of 0, which the plug-in's bias puts out of reach)."""
    coverage = _coverage(temperature=1.6, draws=200, n=500)
    for name in ("accuracy", "nll", "brier", "ece"):
        assert coverage[name] >= 0.90, (name, coverage[name])
    calibrated = _coverage(temperature=1.0, draws=50, n=500)
    assert calibrated["ece"] < 0.90 and calibrated["nll"] >= 0.85


def test_percentile_interval_is_offered_and_lies_above_a_biased_point() -> None:
    """Both kinds are offered; where an estimator's resamples sit above it, the percentile
    interval does too and the basic one reflects them back around the estimate."""
    logits, labels = _fixture()
    probs = softmax(logits, axis=1)
    basic = calibrun.scores(probs, labels, intervals=True, resamples=300)
    percentile = calibrun.scores(probs, labels, intervals=True, resamples=300, interval="percentile")
    # Classwise ECE's resamples sit above the plug-in value (its bias): the percentile
    # interval excludes the point, the basic one reflects it below.
    assert percentile["classwise_ece_lo"] > percentile["classwise_ece"]
    assert basic["classwise_ece_hi"] < basic["classwise_ece"]
    # The debiased error's resamples estimate the plug-in error of the sample, above the
    # estimate: its basic interval reflects around that (Metric.population), not around itself.
    assert basic["debiased_l2_ce_hi"] < percentile["debiased_l2_ce_hi"]
    assert basic["debiased_l2_ce_lo"] <= basic["debiased_l2_ce"] <= basic["debiased_l2_ce_hi"]


def test_a_calibrator_better_on_every_image_is_marked_better() -> None:
    logits, labels = _fixture()
    none = softmax(logits, axis=1)
    # Moving a tenth of each row's mass onto the true class lowers every image's NLL and Brier.
    better = 0.9 * none + 0.1 * np.eye(none.shape[1])[labels]
    settings = bootstrap.Settings(resamples=300)
    values = {name: bootstrap.resampled(p, labels, 15, settings) for name, p in (("none", none), ("better", better),
                                                                                  ("same", none))}
    point = {name: weighted_scores(*metrics.validated(p, labels), 15, np.ones((1, len(labels))))[:, 0]
             for name, p in (("none", none), ("better", better), ("same", none))}
    rows = pd.DataFrame(bootstrap.paired_differences(point, values, "none", settings)).set_index(["calibrator", "metric"])
    for name in ("nll", "brier"):
        assert rows.loc[("better", name), "better"] and not rows.loc[("better", name), "worse"]
        assert rows.loc[("better", name), "hi"] < 0
    assert not rows.loc["same", "better"].any() and not rows.loc["same", "worse"].any()
    assert rows.loc[("better", "accuracy"), "difference"] >= 0


def test_api_intervals_equal_the_run_folders(tmp_path: Path) -> None:
    from calibrun.calibration import calibrate_external, load_calibrators
    from calibrun.compose import config_dir

    out = tmp_path / "run"
    calibrate_external(FIXTURE / "val.npz", FIXTURE / "test.npz", out,
                       ["calibrator=[temperature]", "metrics.n_bins=10"], Path(config_dir()))
    table = pd.read_csv(out / "metrics.csv").set_index(["split", "calibrator"])
    logits, labels = _fixture()
    probs = load_calibrators(out)["temperature"].predict_proba(logits)
    api = calibrun.scores(probs, labels, n_bins=10, intervals=True)
    row = table.loc[("test", "temperature")]
    for column in [*METRIC_NAMES, *bootstrap.interval_names()]:
        assert api[column] == pytest.approx(row[column], rel=1e-12, abs=1e-15), column
    differences = pd.read_csv(out / "differences.csv")
    assert set(differences["metric"]) == set(METRIC_NAMES) and set(differences["calibrator"]) == {"temperature"}


@pytest.mark.parametrize("settings, message", [
    ({"level": 1.5}, "metrics.level must be in (0, 1)"),
    ({"resamples": 1}, "metrics.resamples must be an integer of at least 2"),
    ({"interval": "bca"}, "metrics.interval must be one of basic, percentile"),
])
def test_bad_settings_name_the_key(settings: dict, message: str) -> None:
    probs = np.full((4, 2), 0.5)
    with pytest.raises(UserError, match=re.escape(message)):
        calibrun.scores(probs, np.array([0, 1, 0, 1]), intervals=True, **settings)


def test_smooth_reliability_curve_is_relplots_kernel_regression_at_sigma_star() -> None:
    from relplot.kernels import ReflectedGaussianKernel

    logits, labels = _fixture()
    probs = softmax(logits, axis=1)
    curve = bootstrap.smooth_curve(probs, labels, bootstrap.Settings(resamples=100))
    conf, hit = probs.max(axis=1), (probs.argmax(axis=1) == labels).astype(float)
    _, width = relplot.smECE(conf, hit, return_width=True)
    residual, _ = ReflectedGaussianKernel(width).smooth(conf, conf - hit, curve["conf"].to_numpy())
    inside = curve["conf"].between(*curve.attrs["support"])
    expected = np.clip(curve["conf"] - residual, 0, 1)
    assert curve.attrs["sigma"] == width
    assert np.allclose(curve["acc"][inside], expected[inside], atol=1e-9)
    assert (curve["acc_lo"] <= curve["acc_hi"]).all()


def test_smooth_curve_and_intervals_off_through_the_run_folder(tmp_path: Path) -> None:
    """metrics.smooth_curve=true draws the curve on every test diagram; with
    metrics.intervals=false the interval columns stay empty and no difference is written."""
    from calibrun.calibration import calibrate_external
    from calibrun.compose import config_dir

    with_curve = tmp_path / "curve"
    calibrate_external(FIXTURE / "val.npz", FIXTURE / "test.npz", with_curve,
                       ["calibrator=[temperature]", "metrics.smooth_curve=true", "metrics.resamples=50"],
                       Path(config_dir()))
    assert {p.name for p in (with_curve / "figures").glob("reliability_*.png")} == {
        "reliability_none.png", "reliability_temperature.png"}
    off = tmp_path / "off"
    calibrate_external(FIXTURE / "val.npz", FIXTURE / "test.npz", off,
                       ["calibrator=[temperature]", "metrics.intervals=false"], Path(config_dir()))
    table = pd.read_csv(off / "metrics.csv")
    assert table[bootstrap.interval_names()].isna().all().all()
    assert len(pd.read_csv(off / "differences.csv")) == 0
    assert "[" not in (off / "metrics.md").read_text().split("| split")[1].split("\n\n")[0]
