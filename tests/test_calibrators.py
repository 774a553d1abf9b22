import numpy as np
import pytest
import torch

from calibrun.calibrators import TemperatureScaling, Uncalibrated


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
