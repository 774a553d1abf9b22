"""Post-hoc calibrators (DESIGN §5): fitted on validation logits, applied to test logits.

Interface: ``fit(logits, labels) -> self`` and ``predict_proba(logits) -> probs`` with
rows summing to 1. Logits and labels are numpy arrays (or anything ``np.asarray``
takes); probabilities come back as float64 numpy arrays.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _as_logits(logits: np.ndarray) -> torch.Tensor:
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be N×K, got shape {tuple(z.shape)}")
    return z


class Calibrator:
    """Base class. Subclasses implement ``fit`` and ``_calibrated(z)`` on float64 logits."""

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> Calibrator:
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        return torch.softmax(self._calibrated(_as_logits(logits)), dim=1).numpy()

    def _calibrated(self, z: torch.Tensor) -> torch.Tensor:
        return z


class Uncalibrated(Calibrator):
    """softmax(z): the model as trained, reported as calibrator ``none``."""


class TemperatureScaling(Calibrator):
    """softmax(z / T) with one temperature T > 0 that minimises the validation NLL.

    T is optimised as log T with L-BFGS, so it cannot become zero or negative; dividing
    by a positive T never changes the argmax, so accuracy is unchanged.

    References: Guo et al. 2017, "On Calibration of Modern Neural Networks", §4.2
    (temperature scaling).
    """

    def __init__(self, max_iter: int = 100) -> None:
        if max_iter < 1:
            raise ValueError(f"max_iter must be at least 1, got {max_iter}")
        self.max_iter = max_iter
        self.temperature = 1.0

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> TemperatureScaling:
        z = _as_logits(logits)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z / log_t.exp(), y)
            loss.backward()
            return loss

        opt.step(closure)
        self.temperature = float(log_t.detach().exp())
        return self

    def _calibrated(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.temperature
