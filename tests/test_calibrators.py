import inspect
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from calibrun.calibrators import (
    Calibrator,
    HistogramBinning,
    IsotonicCalibration,
    MatrixScaling,
    PlattScaling,
    TemperatureScaling,
    Uncalibrated,
    VectorScaling,
)
from calibrun import UserError
from calibrun.config import validate
from calibrun.calibration import build_calibrators, calibrate_and_report
from calibrun.logits import load_logits
from calibrun.metrics import ece, nll

REPO = Path(__file__).resolve().parent.parent
# Real logits of an overconfident ResNet-8 (``make demo`` on the bundled CIFAR-10 sample):
# 500 val and 1000 test rows, 10 classes.
DEMO_LOGITS = Path(__file__).resolve().parent / "fixtures" / "demo_logits"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Every fit in this module is tiny; on a busy machine intra-op threads wait for each
    # other far longer than they compute (10-50x slower with 2 threads under load).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits_with_temperature(true_t: float, n: int = 20000, k: int = 10, seed: int = 0):
    """Logits z and labels drawn from softmax(z / T): T is the calibrating temperature."""
    g = torch.Generator().manual_seed(seed)
    z = 4.0 * torch.randn(n, k, generator=g, dtype=torch.float64)
    labels = torch.multinomial(torch.softmax(z / true_t, dim=1), 1, generator=g).squeeze(1)
    return z.numpy(), labels.numpy()


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_temperature_recovers_known_temperature(true_t):
    z, y = _logits_with_temperature(true_t)
    ts = TemperatureScaling().fit(z, y)
    assert ts.temperature > 0
    assert abs(ts.temperature - true_t) / true_t < 0.05


def test_temperature_keeps_accuracy_and_rows_sum_to_one():
    z, y = _logits_with_temperature(2.5, seed=1)
    probs = TemperatureScaling().fit(z, y).predict_proba(z)
    np.testing.assert_array_equal(probs.argmax(1), z.argmax(1))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-12)


def test_temperature_stays_positive_on_anticorrelated_logits():
    # Labels that disagree with the logits would push an unconstrained T below zero.
    z, _ = _logits_with_temperature(1.0, n=2000, seed=2)
    y = z.argmin(1)
    ts = TemperatureScaling().fit(z, y)
    assert ts.temperature > 0 and np.isfinite(ts.predict_proba(z)).all()


def test_uncalibrated_is_softmax():
    z = np.array([[0.0, 1.0, 2.0], [3.0, 3.0, 3.0]])
    expected = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(Uncalibrated().fit(z, np.array([0, 1])).predict_proba(z), expected, atol=1e-15)


def test_temperature_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_iter"):
        TemperatureScaling(max_iter=0)
    with pytest.raises(ValueError, match="N×K"):
        TemperatureScaling().fit(np.zeros(5), np.zeros(5, dtype=int))


# --------------------------------------------------------------------------- all calibrators

# Every calibrator calibrun can be told to use, as conf/calibrator/<name>.yaml configures
# it: a new YAML file is tested here without editing this file.
CALIBRATOR_YAMLS = {path.stem: path for path in sorted((REPO / "conf" / "calibrator").glob("*.yaml"))}


def _from_yaml(name: str):
    """A factory that builds calibrator ``name`` from its YAML node."""
    return lambda: instantiate(OmegaConf.load(CALIBRATOR_YAMLS[name])[name])


FITTED = {name: _from_yaml(name) for name in CALIBRATOR_YAMLS}
ALL = {"none": Uncalibrated, **FITTED}
# The calibrators a run fits unless told otherwise: conf/config.yaml's default list.
DEFAULT_SET = next(entry["calibrator"] for entry in yaml.safe_load((REPO / "conf" / "config.yaml").read_text())["defaults"]
                   if isinstance(entry, dict) and "calibrator" in entry)


def _softmax(z: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(z, dtype=torch.float64), dim=1).numpy()


def _margin_logits(n: int, k: int, seed: int, flip: float):
    """One logit 50 above the rest per row; a fraction ``flip`` of labels disagree with it."""
    rng = np.random.default_rng(seed)
    top = rng.integers(0, k, n)
    z = np.zeros((n, k))
    z[np.arange(n), top] = 50.0
    y = np.where(rng.random(n) < flip, (top + 1) % k, top)
    return z, y


def _assert_probabilities(p: np.ndarray, n: int, k: int) -> None:
    assert p.shape == (n, k) and p.dtype == np.float64
    assert np.isfinite(p).all() and p.min() >= 0.0
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)


def _val_sets() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(3)
    z = 3.0 * rng.standard_normal((600, 5))
    return {
        "random": (z, rng.integers(0, 5, 600)),
        # Separable: the NLL optimum of the logit scalings is at infinity.
        "margin_separable": _margin_logits(600, 5, seed=4, flip=0.0),
        # 10 % of labels sit on a logit 50 below the top one: huge losses and gradients.
        "margin_noisy": _margin_logits(600, 5, seed=5, flip=0.1),
        "class_4_missing": (z, rng.integers(0, 4, 600)),
    }


VAL_SETS = _val_sets()


@pytest.mark.parametrize("val", VAL_SETS)
@pytest.mark.parametrize("name", ALL)
def test_every_calibrator_returns_probabilities(name, val):
    z_val, y_val = VAL_SETS[val]
    calibrator = ALL[name]().fit(z_val, y_val)
    rng = np.random.default_rng(6)
    for z_test in (3.0 * rng.standard_normal((200, 5)), _margin_logits(200, 5, seed=7, flip=0.0)[0], z_val):
        _assert_probabilities(calibrator.predict_proba(z_test), len(z_test), 5)


def _overconfident(n_val: int = 5000, n_test: int = 5000, k: int = 10):
    """Val and test logits whose labels follow softmax(z / 2.5): the model is overconfident."""
    z, y = _logits_with_temperature(2.5, n=n_val + n_test, k=k, seed=11)
    return (z[:n_val], y[:n_val]), (z[n_val:], y[n_val:])


def test_logit_scalings_lower_the_validation_nll_in_order():
    (z, y), _ = _overconfident()
    classes = {"none": Uncalibrated, "temperature": TemperatureScaling, "vector": VectorScaling, "matrix": MatrixScaling}
    val_nll = {name: nll(cls().fit(z, y).predict_proba(z), y) for name, cls in classes.items()}
    assert val_nll["temperature"] < val_nll["none"] - 0.1  # so vector and matrix below are lower too
    # Temperature scaling is a special case of both (w = 1/T; W = I/T with no penalty),
    # so their in-sample optimum can only be lower.
    assert val_nll["vector"] <= val_nll["temperature"] + 1e-9
    assert val_nll["matrix"] <= val_nll["temperature"] + 1e-9


@pytest.mark.parametrize("name", FITTED)
def test_every_calibrator_reduces_test_ece_of_an_overconfident_model(name):
    (z_val, y_val), (z_test, y_test) = _overconfident()
    before = ece(Uncalibrated().predict_proba(z_test), y_test)
    after = ece(FITTED[name]().fit(z_val, y_val).predict_proba(z_test), y_test)
    assert before > 0.2  # the setting is really overconfident
    assert after < before / 2


# --------------------------------------------------------------------------- references and hand checks


def test_isotonic_matches_scikit_learn_per_class_then_renormalised():
    rng = np.random.default_rng(8)
    z_val, y_val = _logits_with_temperature(2.0, n=400, k=4, seed=9)
    # Wider test logits put some scores outside the validation range, where "clip" acts.
    z_test = 6.0 * rng.standard_normal((300, 4))
    p_val, p_test = _softmax(z_val), _softmax(z_test)
    q = np.column_stack([
        IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(p_val[:, k], y_val == k).predict(p_test[:, k])
        for k in range(4)
    ])
    assert (q.sum(1) > 0).all()  # no row needs the softmax fallback, so plain division is the reference
    expected = q / q.sum(1, keepdims=True)
    probs = IsotonicCalibration().fit(z_val, y_val).predict_proba(z_test)
    np.testing.assert_allclose(probs, expected, rtol=0, atol=1e-12)


def test_histogram_binning_by_hand():
    # Logits log p give softmax probabilities p. M = 4 bins: B1 = [0, .25], B2 = (.25, .5],
    # B3 = (.5, .75], B4 = (.75, 1]; no probability below sits on an edge.
    p_val = np.array([
        [0.7, 0.2, 0.1],  # y = 0
        [0.6, 0.3, 0.1],  # y = 0
        [0.1, 0.8, 0.1],  # y = 1
        [0.2, 0.2, 0.6],  # y = 2
        [0.4, 0.2, 0.4],  # y = 0
    ])
    y_val = np.array([0, 0, 1, 2, 0])
    # class 0: p = .7 B3 y, .6 B3 y, .1 B1 n, .2 B1 n, .4 B2 y -> B1 0/2, B2 1/1, B3 2/2, B4 empty: centre .875
    # class 1: p = .2 B1 n, .3 B2 n, .8 B4 y, .2 B1 n, .2 B1 n -> B1 0/3, B2 0/1, B3 empty: .625, B4 1/1
    # class 2: p = .1 B1 n, .1 B1 n, .1 B1 n, .6 B3 y, .4 B2 n -> B1 0/3, B2 0/1, B3 1/1, B4 empty: .875
    theta = [[0, 1, 1, 0.875], [0, 0, 0.625, 1], [0, 0, 1, 0.875]]
    p_test = np.array([
        [0.8, 0.1, 0.1],  # q = (B4 .875, B1 0, B1 0)    -> (1, 0, 0)
        [0.3, 0.6, 0.1],  # q = (B2 1, B3 .625, B1 0)     -> (1, .625, 0) / 1.625 = (8/13, 5/13, 0)
        [0.3, 0.1, 0.6],  # q = (B2 1, B1 0, B3 1)        -> (1/2, 0, 1/2)
        [0.2, 0.4, 0.4],  # q = (B1 0, B2 0, B2 0): all 0 -> softmax fallback (.2, .4, .4)
    ])
    expected = np.array([[1, 0, 0], [8 / 13, 5 / 13, 0], [0.5, 0, 0.5], [0.2, 0.4, 0.4]])
    hb = HistogramBinning(n_bins=4).fit(np.log(p_val), y_val)
    np.testing.assert_allclose(np.array(hb.per_class), theta, atol=1e-15)
    np.testing.assert_allclose(hb.predict_proba(np.log(p_test)), expected, atol=1e-12)


def _naive_log_odds(z: np.ndarray) -> np.ndarray:
    """log p - log(1 - p) of p = softmax(z), straight from the definition (fine for moderate z)."""
    p = _softmax(z)
    return np.log(p) - np.log1p(-p)


def test_platt_matches_scikit_learn_on_the_softmax_log_odds_and_smooths_a_missing_class():
    rng = np.random.default_rng(10)
    z_val = 3.0 * rng.standard_normal((500, 4))
    y_val = rng.choice(3, 500, p=[0.5, 0.3, 0.2])  # class 3 never occurs
    z_test = 3.0 * rng.standard_normal((100, 4))
    platt = PlattScaling(C=0.5).fit(z_val, y_val)
    s_val, s_test = _naive_log_odds(z_val), _naive_log_odds(z_test)
    q = np.empty_like(z_test)
    for k in range(3):
        # scikit-learn solved to its tightest tolerance: the same objective's optimum.
        lr = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000).fit(s_val[:, [k]], y_val == k)
        assert platt.per_class[k] == pytest.approx((lr.coef_[0, 0], lr.intercept_[0]), abs=1e-8)
        q[:, k] = lr.predict_proba(s_test[:, [k]])[:, 1]
    # The missing class: constant (0 + 1) / (500 + 2), Platt's smoothed negative target.
    assert platt.per_class[3][0] == 0.0
    q[:, 3] = 1 / 502
    np.testing.assert_allclose(platt.predict_proba(z_test), q / q.sum(1, keepdims=True), rtol=1e-8)


def test_platt_with_unit_slope_and_zero_bias_is_the_softmax_even_when_saturated():
    """σ(s_k) = p_k: the log-odds must stay exact where p_k rounds to 1 (1 - p_k = 0)."""
    z = np.array([[50.0, 0.0, 0.0], [0.0, 40.0, -40.0], [1.0, 2.0, 3.0]])
    platt = PlattScaling().fit(z, np.array([0, 1, 2]))
    platt.per_class = [(1.0, 0.0)] * 3
    np.testing.assert_allclose(platt.predict_proba(z), _softmax(z), rtol=1e-12, atol=1e-300)


def test_vector_scaling_recovers_per_class_scales_and_biases():
    g = torch.Generator().manual_seed(12)
    w = torch.tensor([0.3, 0.5, 0.8, 1.2], dtype=torch.float64)
    b = torch.tensor([0.5, -0.5, 0.0, 1.0], dtype=torch.float64)
    z = 3.0 * torch.randn(20000, 4, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z * w + b, dim=1), 1, generator=g).squeeze(1)
    vs = VectorScaling().fit(z.numpy(), y.numpy())
    np.testing.assert_allclose(vs.scale.numpy(), w.numpy(), rtol=0.06)
    # softmax ignores a common shift of all biases, so compare them centred.
    np.testing.assert_allclose(vs.bias.numpy() - vs.bias.numpy().mean(), (b - b.mean()).numpy(), atol=0.06)


def test_vector_scaling_on_exchangeable_classes_is_temperature_scaling():
    (z, y), _ = _overconfident(n_test=0)
    vs = VectorScaling().fit(z, y)
    t = TemperatureScaling().fit(z, y).temperature
    np.testing.assert_allclose(vs.scale.numpy(), 1 / t, rtol=0.06)


def test_unpenalised_matrix_scaling_recovers_a_full_matrix():
    g = torch.Generator().manual_seed(13)
    w = torch.tensor([[0.5, 0.3, 0.0], [0.0, 0.4, -0.2], [0.2, 0.0, 0.6]], dtype=torch.float64)
    b = torch.tensor([0.3, -0.3, 0.0], dtype=torch.float64)
    z = 3.0 * torch.randn(20000, 3, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z @ w.T + b, dim=1), 1, generator=g).squeeze(1)
    ms = MatrixScaling(off_diagonal_l2=0.0).fit(z.numpy(), y.numpy())
    # softmax ignores adding one vector v to every row of W (a shift v·z of all logits)
    # and a common shift of b, so compare column- and vector-centred values.
    fitted = ms.weight.numpy()
    np.testing.assert_allclose(fitted - fitted.mean(0), (w - w.mean(0)).numpy(), atol=0.05)
    np.testing.assert_allclose(ms.bias.numpy() - ms.bias.numpy().mean(), (b - b.mean()).numpy(), atol=0.05)


def test_strongly_penalised_matrix_scaling_is_vector_scaling():
    (z, y), (z_test, _) = _overconfident(n_val=2000, n_test=500, k=5)
    ms = MatrixScaling(off_diagonal_l2=1e3).fit(z, y)
    off_diagonal = ms.weight.numpy()[~np.eye(5, dtype=bool)]
    assert np.abs(off_diagonal).max() < 1e-4
    expected = VectorScaling().fit(z, y).predict_proba(z_test)
    np.testing.assert_allclose(ms.predict_proba(z_test), expected, atol=1e-4)


# --------------------------------------------------------------------------- errors and config


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: VectorScaling(max_iter=0), "max_iter"),
        (lambda: MatrixScaling(max_iter=0), "max_iter"),
        (lambda: MatrixScaling(off_diagonal_l2=-1.0), "off_diagonal_l2"),
        (lambda: PlattScaling(C=0.0), "C must be > 0"),
        (lambda: HistogramBinning(n_bins=0), "n_bins"),
    ],
)
def test_bad_constructor_arguments_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("name", FITTED)
def test_predicting_before_fit_or_on_other_classes_is_refused_or_harmless(name):
    z = np.zeros((4, 3))
    z[:, 0] = [2.0, -1.0, 0.5, 0.0]
    try:
        unfitted = FITTED[name]().predict_proba(z)
    except RuntimeError as err:
        assert "must be fitted" in str(err)
    else:
        # Calibrators whose parameters start at the identity (a temperature of 1) may
        # predict before fitting, but then exactly as the uncalibrated model does.
        np.testing.assert_allclose(unfitted, _softmax(z), atol=1e-12)
    fitted = FITTED[name]().fit(z, np.array([0, 1, 2, 0]))
    try:
        other = fitted.predict_proba(np.zeros((4, 5)))
    except ValueError as err:
        assert "fitted on 3 classes" in str(err)
    else:
        # Parameters that do not depend on the class count (one temperature) apply to any.
        _assert_probabilities(other, 4, 5)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 1, 2]), r"shape \(4,\)"),
        (np.array([0.0, 1.0, 2.0, 0.0]), "integer"),
        (np.array([0, 1, 3, 0]), r"\[0, 2\]"),
    ],
)
@pytest.mark.parametrize("name", FITTED)
def test_bad_labels_are_refused(name, labels, message):
    with pytest.raises(ValueError, match=message):
        FITTED[name]().fit(np.zeros((4, 3)), labels)


@pytest.mark.parametrize("name", CALIBRATOR_YAMLS)
def test_calibrator_yaml_lists_the_constructor_defaults(name):
    node = OmegaConf.load(CALIBRATOR_YAMLS[name])
    # The file's one key is its name: that is the key the config and metrics.csv use.
    assert list(node) == [name]
    cls = get_class(node[name]._target_)
    assert issubclass(cls, Calibrator)
    defaults = {p: v.default for p, v in inspect.signature(cls).parameters.items()}
    assert dict(node[name]) == {"_target_": node[name]._target_, **defaults}
    assert type(instantiate(node[name])) is cls


@pytest.mark.parametrize("name", CALIBRATOR_YAMLS)
def test_every_calibrator_yaml_composes_validates_and_builds(compose_cfg, name):
    cfg = validate(compose_cfg([f"calibrator=[{name}]"]))
    assert list(cfg.calibrator) == [name]
    (built,) = build_calibrators(cfg.calibrator).values()
    assert type(built) is get_class(cfg.calibrator[name]._target_)


# --------------------------------------------------------------------------- real logits


def _demo_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    return load_logits(DEMO_LOGITS / f"{split}.npz")


# Methods that end in a smooth map of the logits; binning methods trade NLL for ECE.
LOWER_TEST_NLL = {"temperature", "vector", "matrix", "platt"}


@pytest.mark.parametrize("name", DEFAULT_SET)
def test_every_default_calibrator_lowers_test_ece_of_the_demo_model(name):
    (z_val, y_val), (z_test, y_test) = _demo_split("val"), _demo_split("test")
    before = Uncalibrated().predict_proba(z_test)
    after = FITTED[name]().fit(z_val, y_val).predict_proba(z_test)
    assert ece(before, y_test) > 0.06  # the demo model is overconfident
    assert ece(after, y_test) < ece(before, y_test) - 0.01
    if name in LOWER_TEST_NLL:
        assert nll(after, y_test) < nll(before, y_test)


def _sigmoid_ovr(a: np.ndarray, b: np.ndarray, s: np.ndarray) -> np.ndarray:
    q = 1.0 / (1.0 + np.exp(-(a * s + b)))
    return q / q.sum(1, keepdims=True)


def _renormalised(q: np.ndarray) -> np.ndarray:
    return q / q.sum(1, keepdims=True)


# Each calibrator's formula, written again from its params() alone.
FROM_PARAMS = {
    "temperature": lambda prm, z: _softmax(z / prm["T"]),
    "vector": lambda prm, z: _softmax(z * np.array(prm["w"]) + np.array(prm["b"])),
    "matrix": lambda prm, z: _softmax(z @ np.array(prm["W"]).T + np.array(prm["b"])),
    "platt": lambda prm, z: _sigmoid_ovr(np.array(prm["a"]), np.array(prm["b"]), _naive_log_odds(z)),
    "histogram": lambda prm, z: _renormalised(np.column_stack([
        np.array(values)[np.clip(np.searchsorted(prm["bin_edges"], p_k, side="left") - 1, 0, len(values) - 1)]
        for values, p_k in zip(prm["values"], _softmax(z).T)])),
    "isotonic": lambda prm, z: _renormalised(np.column_stack([
        np.interp(p_k, x, y) for x, y, p_k in zip(prm["thresholds"], prm["values"], _softmax(z).T)])),
    "dirichlet": lambda prm, z: _softmax(np.log(_softmax(z)) @ np.array(prm["W"]).T + np.array(prm["b"])),
    "ets": lambda prm, z: _ets(prm, z),
    "mix_n_match": lambda prm, z: _renormalised(
        np.interp(_ets(prm["ets"], z), prm["thresholds"], prm["values"]) + 1e-9 * _ets(prm["ets"], z)),
    "spline": lambda prm, z: _spline(prm, _softmax(z)),
    "bbq": lambda prm, z: _renormalised(np.column_stack([
        sum(w * np.array(m["values"])[np.searchsorted(m["edges"], p_k, side="right")]
            for w, m in zip(_model_weights(models), models))
        for models, p_k in zip(prm["models"], _softmax(z).T)])),
}


def _ets(prm: dict, z: np.ndarray) -> np.ndarray:
    w = prm["w"]
    return w[0] * _softmax(z / prm["T"]) + w[1] * _softmax(z) + w[2] / z.shape[1]


def _spline(prm: dict, p: np.ndarray) -> np.ndarray:
    """Row by row: the top label's recalibrated confidence (at least 1/K, 1e-6 above), the
    others' ratios pulled towards even by the largest t that keeps them (1e-6) below it."""
    out, k = p.copy(), p.shape[1]
    for row, probs in enumerate(p):
        top = int(np.argmax(probs))
        new = max(np.interp(probs[top], prm["scores"], prm["calibrated"]), (1 + 1e-6) / k)
        ratios, even = np.delete(probs, top) / (1 - probs[top]), 1 / (k - 1)
        t = 1.0
        if (1 - new) * ratios.max() > new:
            t = (new / (1 - new) - even) / (ratios.max() - even) * (1 - 1e-6)
        out[row] = np.insert((1 - new) * (t * ratios + (1 - t) * even), top, new)
    return out


def _model_weights(models: list[dict]) -> np.ndarray:
    log_scores = np.array([m["log_score"] for m in models])
    weights = np.exp(log_scores - log_scores.max())
    return weights / weights.sum()


@pytest.mark.parametrize("name", ALL)
def test_params_are_json_and_reproduce_the_predictions(name):
    (z_val, y_val), (z_test, _) = _demo_split("val"), _demo_split("test")
    calibrator = ALL[name]().fit(z_val, y_val)
    params = json.loads(json.dumps(calibrator.params(), allow_nan=False))
    if name == "none":
        assert params == {}
        return
    assert name in FROM_PARAMS, f"add how {name}'s params() predict to FROM_PARAMS"
    # The calibrators compute in float64; so must the re-derivation of the float32 logits.
    expected = FROM_PARAMS[name](params, z_test.astype(np.float64))
    np.testing.assert_allclose(calibrator.predict_proba(z_test), expected, atol=1e-9)


@pytest.mark.parametrize("name", FITTED)
def test_params_before_fit_are_refused_or_the_identity(name):
    try:
        params = FITTED[name]().params()
    except RuntimeError as err:
        assert "must be fitted" in str(err)
    else:
        assert params == {"T": 1.0}


def test_calibrators_json_holds_the_fitted_parameters_and_keeps_the_others(tmp_path):
    shutil.copytree(DEMO_LOGITS, tmp_path / "logits")
    calibrate_and_report(tmp_path, {"temperature": TemperatureScaling()})
    path = tmp_path / "calibrators.json"
    saved = json.loads(path.read_text())
    expected_t = TemperatureScaling().fit(*_demo_split("val")).temperature
    assert list(saved) == ["none", "temperature"] and saved["none"] == {}
    assert saved["temperature"]["T"] == pytest.approx(expected_t, rel=1e-12)
    assert expected_t > 1.1  # an overconfident model is cooled down
    # A refit of another calibrator adds its entry and keeps the temperature.
    calibrate_and_report(tmp_path, {"vector": VectorScaling()})
    saved = json.loads(path.read_text())
    assert list(saved) == ["none", "vector", "temperature"] and saved["temperature"]["T"] == pytest.approx(expected_t)
    path.write_text("{not json")
    with pytest.raises(UserError, match="calibrators.json"):
        calibrate_and_report(tmp_path, {"vector": VectorScaling()})


def test_a_finished_runs_calibrators_load_and_reproduce_its_test_rows_without_refitting(compose_cfg, tmp_path):
    from conftest import FAST

    from calibrun.calibration import load_calibrators
    from calibrun.metrics import scores as metrics_evaluate
    from calibrun.train import run

    run(validate(compose_cfg(FAST)), tmp_path / "run")
    loaded = load_calibrators(tmp_path / "run")
    assert set(loaded) == {"none", *DEFAULT_SET}
    z_test, y_test = load_logits(tmp_path / "run" / "logits" / "test.npz")
    table = pd.read_csv(tmp_path / "run" / "metrics.csv").query("split == 'test'").set_index("calibrator")
    for name, calibrator in loaded.items():
        scores = metrics_evaluate(calibrator.predict_proba(z_test), y_test)
        for metric, value in scores.items():
            assert table.loc[name, metric] == pytest.approx(value, abs=1e-12), (name, metric)


@pytest.mark.parametrize("name", FITTED)
def test_probabilities_passed_as_logits_are_refused(name):
    probs = _softmax(np.random.default_rng(0).normal(size=(50, 4)))
    with pytest.raises(ValueError, match="look like probabilities"):
        FITTED[name]().fit(probs, np.arange(50) % 4)


def readme_python_block(section: str, page: str = "docs/guide/own-logits.md") -> str:
    """The first ```python block under the heading ``section`` of the documentation page
    ``page`` (the README's section "Your own logits" lives in docs/guide/own-logits.md)."""
    text = (REPO / page).read_text()
    body = text[text.index(f"# {section}\n"):]
    return body[body.index("```python\n") + len("```python\n"):body.index("\n```", body.index("```python"))]


def test_the_readme_example_on_your_own_logits_runs(tmp_path, monkeypatch, capsys):
    """The "Your own logits" code of the user guide (docs/guide/own-logits.md, once the
    README's), extracted and run as it stands, on the demo's real logits saved as the .npy
    files it reads."""
    import calibrun

    for split in ("val", "test"):
        z, y = load_logits(DEMO_LOGITS / f"{split}.npz")
        np.save(tmp_path / f"{split}_logits.npy", z)
        np.save(tmp_path / f"{split}_labels.npy", y)
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_block("Your own logits"), "docs/guide/own-logits.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'ece'" in printed and "'n': 1000" in printed
    assert (tmp_path / "reliability.png").stat().st_size > 10_000
    assert set(calibrun.__all__) >= {"scores", "TemperatureScaling", "reliability_diagram", "load_calibrators"}
    with pytest.raises(AttributeError):
        calibrun.not_a_name


@pytest.mark.parametrize("name", CALIBRATOR_YAMLS)
def test_every_calibrator_is_importable_from_calibrun(name):
    """A user's own logits reach every calibrator a run can use: calibrun.<Class>."""
    import calibrun

    target = OmegaConf.load(CALIBRATOR_YAMLS[name])[name]["_target_"]
    assert getattr(calibrun, target.rsplit(".", 1)[1]) is get_class(target)


def test_temperature_is_the_nll_optimum_that_scipy_finds_on_real_logits():
    """Newton on the inverse temperature against a bounded scalar search of the same NLL
    (float64, written here from the definition) on the demo model's validation logits."""
    from scipy.optimize import minimize_scalar
    from scipy.special import logsumexp

    z, y = _demo_split("val")
    z = z.astype(np.float64)

    def nll(log_t: float) -> float:
        scaled = z / np.exp(log_t)
        return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(len(y)), y]))

    reference = float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded", options={"xatol": 1e-12}).x))
    assert TemperatureScaling().fit(z, y).temperature == pytest.approx(reference, rel=1e-8)


def test_temperature_fit_in_blocks_equals_the_fit_in_one(monkeypatch):
    """The blocks that bound the fit's memory do not change the temperature."""
    from calibrun import calibrators

    z, y = _logits_with_temperature(1.7, n=3000, seed=5)
    whole = TemperatureScaling().fit(z, y).temperature
    monkeypatch.setattr(calibrators, "_BLOCK_ELEMENTS", 7 * z.shape[1])  # blocks of 7 rows
    assert TemperatureScaling().fit(z, y).temperature == pytest.approx(whole, rel=1e-12)


def _dirichlet_fixed(**kwargs):
    from calibrun.calibrators import DirichletCalibration

    return DirichletCalibration(lambdas=(0.1,), mus=(0.01,), **kwargs)  # one grid point: no cross-validation


def _autograd_objective(name: str, calibrator, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each linear map's penalised mean NLL, written from its docstring and differentiated by autograd."""
    k = z.shape[1]
    off = 1.0 - torch.eye(k, dtype=torch.float64)
    if name == "vector":
        return torch.nn.functional.cross_entropy(z * calibrator.scale + calibrator.bias, y)
    if name == "matrix":
        return (torch.nn.functional.cross_entropy(z @ calibrator.weight.T + calibrator.bias, y)
                + calibrator.off_diagonal_l2 * k * (calibrator.weight * off).square().sum())
    lam, mu = calibrator.chosen
    return (torch.nn.functional.cross_entropy(torch.log_softmax(z, 1) @ calibrator.weight.T + calibrator.bias, y)
            + lam * (calibrator.weight * off).square().sum() + mu * calibrator.bias.square().sum())


LINEAR_MAPS = {"vector": lambda: VectorScaling(max_iter=1000), "matrix": lambda: MatrixScaling(max_iter=1000),
               "dirichlet": lambda: _dirichlet_fixed(max_iter=1000)}


@pytest.mark.parametrize("name", LINEAR_MAPS)
def test_linear_maps_stop_where_the_autograd_gradient_of_their_objective_vanishes(name):
    """The analytic gradients of the fits (their pullbacks) are right: at the fitted
    parameters, autograd's gradient of the objective written independently is ~0."""
    z, y = (torch.as_tensor(a) for a in _demo_split("val"))
    z = z.double()
    calibrator = LINEAR_MAPS[name]().fit(z.numpy(), y.numpy())
    params = [calibrator.scale, calibrator.bias] if name == "vector" else [calibrator.weight, calibrator.bias]
    for p in params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(_autograd_objective(name, calibrator, z, y), params)
    assert max(float(g.abs().max()) for g in grads) < 1e-6


@pytest.mark.parametrize("name", LINEAR_MAPS)
def test_linear_map_fits_in_blocks_equal_the_fit_in_one(name, monkeypatch):
    """The blocks that bound the fits' memory do not change what they fit."""
    from calibrun import calibrators

    z, y = _demo_split("val")
    whole = LINEAR_MAPS[name]().fit(z, y).predict_proba(z)
    monkeypatch.setattr(calibrators, "_FIT_BLOCK_ELEMENTS", 7 * z.shape[1])  # blocks of 7 rows
    np.testing.assert_allclose(LINEAR_MAPS[name]().fit(z, y).predict_proba(z), whole, atol=1e-7)


# --------------------------------------------------------------------------- the newer calibrators


def test_unregularised_dirichlet_is_multinomial_logistic_regression_on_log_probabilities():
    from calibrun.calibrators import DirichletCalibration

    (z_val, y_val), (z_test, _) = _demo_split("val"), _demo_split("test")
    log_p = np.log(_softmax(z_val.astype(np.float64)))
    reference = LogisticRegression(C=np.inf, tol=1e-12, max_iter=100_000).fit(log_p, y_val)
    ours = DirichletCalibration(regularisation="none", max_iter=1000).fit(z_val, y_val)
    expected = reference.predict_proba(np.log(_softmax(z_test.astype(np.float64))))
    np.testing.assert_allclose(ours.predict_proba(z_test), expected, atol=2e-4)


def test_dirichlet_cross_validation_picks_a_grid_point_and_odir_spares_the_diagonal():
    from calibrun.calibrators import DirichletCalibration

    z_val, y_val = _demo_split("val")
    odir = DirichletCalibration(lambdas=(1e3,), mus=(1e3,)).fit(z_val, y_val)
    w = np.array(odir.params()["W"])
    # A huge ODIR weight leaves a diagonal W (vector scaling on log p) and no intercepts.
    assert np.abs(w - np.diag(np.diag(w))).max() < 1e-3 and np.abs(odir.params()["b"]).max() < 1e-3
    assert np.diag(w).min() > 0.1
    grid = DirichletCalibration(lambdas=(1e-3, 1e-1), mus=(1e-2,), folds=3).fit(z_val, y_val)
    assert grid.chosen in {(1e-3, 1e-2), (1e-1, 1e-2)}


def test_ets_weights_lie_on_the_simplex_and_match_a_direct_scipy_fit():
    from scipy.optimize import minimize, minimize_scalar

    from calibrun.calibrators import EnsembleTemperatureScaling

    z_val, y_val = _demo_split("val")
    z = z_val.astype(np.float64)
    onehot = np.eye(z.shape[1])[y_val]
    t = minimize_scalar(lambda t: np.mean((_softmax(z / t) - onehot) ** 2), bounds=(0.05, 5.0), method="bounded",
                        options={"xatol": 1e-10}).x
    parts = [_softmax(z / t), _softmax(z), np.full(z.shape, 1 / z.shape[1])]
    w = minimize(lambda w: np.mean((sum(wi * pi for wi, pi in zip(w, parts)) - onehot) ** 2), [1.0, 0.0, 0.0],
                 method="SLSQP", bounds=[(0, 1)] * 3, constraints=[{"type": "eq", "fun": lambda w: sum(w) - 1}],
                 tol=1e-12).x
    ours = EnsembleTemperatureScaling().fit(z_val, y_val).params()
    assert ours["T"] == pytest.approx(t, rel=1e-6)
    np.testing.assert_allclose(ours["w"], w, atol=1e-5)
    assert min(ours["w"]) >= 0 and sum(ours["w"]) == pytest.approx(1.0, abs=1e-15)


def test_mix_n_match_keeps_the_accuracy_of_ets():
    from calibrun.calibrators import EnsembleTemperatureScaling, MixNMatch

    (z_val, y_val), (z_test, _) = _demo_split("val"), _demo_split("test")
    ets = EnsembleTemperatureScaling().fit(z_val, y_val).predict_proba(z_test)
    mixed = MixNMatch().fit(z_val, y_val).predict_proba(z_test)
    assert np.array_equal(mixed.argmax(1), ets.argmax(1)) and np.array_equal(ets.argmax(1), z_test.argmax(1))


def test_spline_map_is_monotone_when_asked_and_near_identity_on_calibrated_scores():
    from calibrun.calibrators import SplineCalibration

    z_val, y_val = _demo_split("val")
    monotone = SplineCalibration(monotone=True).fit(z_val, y_val)
    assert np.all(np.diff(monotone.params()["calibrated"]) >= -1e-12)
    # Labels drawn from the model's own probabilities: it is calibrated, the map ~ identity.
    z, y = _logits_with_temperature(1.0, n=20000, seed=21)
    fitted = SplineCalibration().fit(z, y).params()
    assert np.abs(np.array(fitted["calibrated"]) - np.array(fitted["scores"])).max() < 0.05


def test_spline_matches_a_constrained_b_spline_least_squares_fit_on_real_logits():
    """The natural cubic spline by another route: cubic B-splines on the same knots, least
    squares with f'' = 0 at both ends as two equality constraints (KKT), written here."""
    from scipy.interpolate import BSpline

    from calibrun.calibrators import SplineCalibration

    z, y = _demo_split("val")
    p = _softmax(z.astype(np.float64))
    order = np.argsort(p.max(1), kind="stable")
    scores, correct = p.max(1)[order], (p.argmax(1) == y)[order].astype(np.float64)
    n, knots = len(scores), np.linspace(0.0, 1.0, 6)
    rank, target = np.linspace(0.0, 1.0, n), (np.cumsum(correct) - np.cumsum(scores)) / n
    t = np.r_[[0.0] * 3, knots, [1.0] * 3]
    basis = [BSpline(t, np.eye(len(t) - 4)[j], 3) for j in range(len(t) - 4)]
    design = np.column_stack([b(rank) for b in basis])
    ends = np.array([[b.derivative(2)(x) for b in basis] for x in (0.0, 1.0)])
    kkt = np.block([[design.T @ design, ends.T], [ends, np.zeros((2, 2))]])
    coef = np.linalg.solve(kkt, np.r_[design.T @ target, 0.0, 0.0])[:len(basis)]
    slope = sum(c * b.derivative(1)(rank) for c, b in zip(coef, basis))
    fitted = SplineCalibration().fit(z, y).params()
    np.testing.assert_allclose(fitted["scores"], scores, atol=1e-12)
    np.testing.assert_allclose(fitted["calibrated"], np.clip(scores + slope, 0.0, 1.0), atol=1e-9)


def test_spline_keeps_the_prediction_and_gives_the_top_label_its_recalibrated_confidence():
    """Gupta et al. recalibrate the top label's confidence; the prediction stays the model's
    even where the others, kept in their ratios, would outgrow a lowered confidence."""
    from calibrun.calibrators import SplineCalibration

    # Overconfident with a close runner-up: the other classes' ratios put one near the top.
    rng = np.random.default_rng(22)
    z = rng.standard_normal((4000, 50)) * 2.0
    z[:, 1] = z.max(1) + 0.01
    z[:, 0] = z[:, 1] + 0.3
    y = np.where(rng.random(4000) < 0.2, 0, rng.integers(1, 50, 4000))
    calibrator = SplineCalibration().fit(z[:2000], y[:2000])
    before, after = _softmax(z[2000:]), calibrator.predict_proba(z[2000:])
    _assert_probabilities(after, 2000, 50)
    np.testing.assert_array_equal(after.argmax(1), before.argmax(1))
    expected = np.maximum(np.interp(before.max(1), *calibrator.params().values()), 1 / 50)
    np.testing.assert_allclose(after.max(1), expected, atol=1e-8)
    # The lowered confidence is below what the runner-up would keep at its old ratio.
    runner_up = np.sort(before, 1)[:, -2] * (1 - after.max(1)) / (1 - before.max(1))
    assert (runner_up > after.max(1)).mean() > 0.2
    # Real logits: the same, and rows where nothing needed pulling keep their ratios.
    z_val, y_val = _demo_split("val")
    z_test, _ = _demo_split("test")
    demo = SplineCalibration().fit(z_val, y_val).predict_proba(z_test)
    np.testing.assert_array_equal(demo.argmax(1), z_test.argmax(1))


def _bbq_reference(score: np.ndarray, target: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Naeini et al. 2015 by loops: equal-frequency binnings, BDeu score, model averaging."""
    n, ordered = len(score), sorted(zip(score, target))
    cube = n ** (1 / 3)
    models = []
    for bins in range(max(1, math.ceil(cube / 10)), math.ceil(10 * cube) + 1):
        edges = [ordered[(i * n) // bins][0] for i in range(1, bins)]
        bounds = [0.0, *edges, 1.0]
        log_score, values = 0.0, []
        for b in range(bins):
            members = [t for s, t in ordered if (b == 0 or s >= edges[b - 1]) and (b == bins - 1 or s < edges[b])]
            centre = min(max((bounds[b] + bounds[b + 1]) / 2, 1e-6), 1 - 1e-6)
            share = 2.0 / bins
            a, c = share * centre, share * (1 - centre)
            m, count = sum(members), len(members)
            log_score += (math.lgamma(share) - math.lgamma(count + share) + math.lgamma(m + a) - math.lgamma(a)
                          + math.lgamma(count - m + c) - math.lgamma(c))
            values.append((m + a) / (count + share))
        models.append((log_score, edges, values))
    top = max(m[0] for m in models)
    weights = [math.exp(m[0] - top) for m in models]
    return np.array([sum(w * m[2][sum(q >= e for e in m[1])] for w, m in zip(weights, models)) / sum(weights)
                     for q in query])


def test_bbq_matches_a_loop_written_from_the_paper_on_real_logits():
    from calibrun.calibrators import BayesianBinningQuantiles

    (z_val, y_val), (z_test, _) = _demo_split("val"), _demo_split("test")
    p_val, p_test = _softmax(z_val.astype(np.float64)), _softmax(z_test.astype(np.float64))
    bbq = BayesianBinningQuantiles().fit(z_val, y_val)
    for k in (0, 3):
        expected = _bbq_reference(p_val[:, k], (y_val == k).astype(float), p_test[:50, k])
        ours = np.exp(bbq._log_calibrated_class(bbq.per_class[k], p_test[:50, k]))
        np.testing.assert_allclose(ours, expected, rtol=1e-10)


def test_a_calibrator_too_costly_for_the_class_count_is_skipped_with_one_line(tmp_path, caplog):
    import logging

    from calibrun.logits import save_logits

    rng = np.random.default_rng(0)
    (tmp_path / "logits").mkdir()
    for split in ("val", "test"):
        z = rng.standard_normal((300, 250))
        save_logits(tmp_path / "logits" / f"{split}.npz", z, rng.integers(0, 250, 300), np.arange(300))
    caplog.set_level(logging.WARNING, logger="calibrun")
    table = calibrate_and_report(tmp_path, {"temperature": TemperatureScaling(), "matrix": MatrixScaling()},
                                 intervals=None)
    assert set(table.calibrator) == {"none", "temperature"}
    (line,) = [r.getMessage() for r in caplog.records if "matrix" in r.getMessage()]
    assert "K² + K = 62,750 parameters" in line and "calibrator.matrix.max_classes=200" in line
