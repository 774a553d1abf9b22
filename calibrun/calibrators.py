"""Post-hoc calibrators (docs/design.md §5): fitted on validation logits, applied to test logits.

Interface: ``fit(logits, labels) -> self`` and ``predict_proba(logits) -> probs`` with
rows summing to 1. Logits and labels are numpy arrays (or anything ``np.asarray``
takes); probabilities come back as float64 numpy arrays. ``params()`` returns the
fitted parameters as a JSON-ready dict (the run folder's ``calibrators.json``).

Two families share their machinery:

- maps linear in their parameters (vector and matrix scaling, Dirichlet calibration)
  fit them with :func:`_fit_nll`, which minimises the NLL of the very ``_calibrated``
  method used at prediction time, so the fitted and the applied formula cannot drift
  apart (temperature scaling has its own Newton's method on 1/T);
- one-vs-rest calibrators (Platt, histogram binning, isotonic) derive from
  :class:`_OneVsRest`, which fits one binary map per class and renormalises the rows.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sized
from typing import Generic, TypeVar

import numpy as np
import torch
from numpy.typing import ArrayLike
import torch.nn.functional as F
from sklearn.isotonic import IsotonicRegression
from threadpoolctl import threadpool_limits

from calibrun.metrics import equal_width_bins, equal_width_index

State = TypeVar("State")
# A fitted per-class parameter: one entry (or row) per class.
_Fitted = TypeVar("_Fitted", bound=Sized)


def looks_like_probabilities(scores: np.ndarray) -> bool:
    """Whether N×K ``scores`` are probabilities rather than logits: every row in [0, 1] and
    summing to 1, which logits practically never do."""
    z = np.asarray(scores, dtype=np.float64)
    return bool(z.ndim == 2 and z.shape[1] > 1 and len(z) and (z >= 0).all() and (z <= 1).all()
                and np.allclose(z.sum(1), 1.0, rtol=0, atol=1e-6))


def _as_logits(logits: np.ndarray) -> torch.Tensor:
    """N×K float64 logits; probabilities passed by mistake are refused."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be N×K, got shape {tuple(z.shape)}")
    if looks_like_probabilities(z.numpy()):
        raise ValueError("these look like probabilities (every row in [0, 1], summing to 1), but calibrators take "
                         "logits: pass the logits, or np.log(probs), which softmax maps back to probs")
    return z


def _as_labels(labels: np.ndarray, z: torch.Tensor) -> torch.Tensor:
    """Integer class indices, one per row of ``z``, as an int64 tensor."""
    y = np.asarray(labels)
    n, k = z.shape
    if y.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the logits, got {y.shape}")
    if n == 0:
        raise ValueError("cannot fit a calibrator on zero samples")
    # A float array would be truncated silently by the cast below.
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must lie in [0, {k - 1}] for {k} classes, got range [{y.min()}, {y.max()}]")
    return torch.as_tensor(y, dtype=torch.long)


def _check_at_least_one(name: str, value: int) -> None:
    # Checked in the constructors so that a bad config fails when the run is built, not
    # after training when the calibrators are fitted.
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _require_fitted(owner: Calibrator, state: State | None) -> State:
    """``state`` (a fitted parameter of ``owner``), or an error if ``fit`` has not run."""
    if state is None:
        raise RuntimeError(f"{type(owner).__name__} must be fitted first")
    return state


def _check_fitted(owner: Calibrator, per_class: _Fitted | None, z: torch.Tensor) -> _Fitted:
    """``per_class``, or an error before ``fit`` or on a different number of classes than fitted."""
    fitted = _require_fitted(owner, per_class)
    if len(fitted) != z.shape[1]:
        raise ValueError(f"{type(owner).__name__} was fitted on {len(fitted)} classes, got logits with {z.shape[1]}")
    return fitted


# Elements of one block of logits in the NLL fits below: 2 MiB of float64 per N×K
# temporary. Small blocks stay in cache, bound the memory at any N × K and are reused by
# the allocator: with 32 MiB blocks and autograd, 100 L-BFGS iterations of vector
# scaling on 10,000 × 1,000 logits left 3.5 GB of fragmented heap behind.
_FIT_BLOCK_ELEMENTS = 1 << 18

# Correction pairs L-BFGS keeps (no more than there are parameters): a strongly penalised
# matrix scaling is ill-conditioned, and scipy's default 10 stopped 2e-4 short of the optimum
# after 100 iterations where 100 pairs reach it.
_HISTORY = 100

# The gradient of a map's parameters from one block of inputs and the NLL's gradient with
# respect to the map's outputs, softmax(out) − onehot(y): one tensor per parameter.
Pullback = Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]]
# A penalty on the parameters: its value and its gradient, one tensor per parameter.
Penalty = Callable[[], tuple[float, list[torch.Tensor]]]


def _fit_nll(
    calibrated: Callable[[torch.Tensor], torch.Tensor],
    pullback: Pullback,
    z: torch.Tensor,
    y: torch.Tensor,
    params: list[torch.Tensor],
    max_iter: int,
    penalty: Penalty | None = None,
) -> None:
    """Fit ``params`` in place: L-BFGS on the mean NLL of softmax(calibrated(z)) (+ penalty).

    ``params`` are the float64 tensors that ``calibrated`` reads, so the fitted and the
    applied formula are one. The gradient is analytic, ``pullback`` of the residual
    softmax − onehot (for a map linear in its parameters, two lines each), summed block by
    block so the working memory stays bounded; a test checks every pullback against
    autograd.
    """
    # The objectives are smooth and convex (the map is linear in its parameters) and cheap
    # to evaluate on the whole validation set: the setting L-BFGS is made for. scipy's
    # L-BFGS-B with tight tolerances: the defaults can stop while flat directions such as
    # the biases are still ~1e-3 off in probability.
    from scipy.optimize import minimize

    sizes = np.cumsum([p.numel() for p in params])[:-1]
    rows = max(1, _FIT_BLOCK_ELEMENTS // max(1, z.shape[1]))

    def load(theta: np.ndarray) -> None:
        for p, part in zip(params, np.split(theta, sizes)):
            p.copy_(torch.from_numpy(part).view_as(p))

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        load(theta)
        value, grads = 0.0, [torch.zeros_like(p) for p in params]
        for start in range(0, len(z), rows):
            block, target = z[start:start + rows], y[start:start + rows]
            log_p = torch.log_softmax(calibrated(block), dim=1)
            value -= float(log_p.gather(1, target[:, None]).sum())
            residual = log_p.exp_()
            residual[torch.arange(len(target)), target] -= 1.0
            for total, part in zip(grads, pullback(block, residual)):
                total += part
        value /= len(z)
        grads = [g / len(z) for g in grads]
        if penalty is not None:
            extra, extra_grads = penalty()
            value += extra
            grads = [g + e for g, e in zip(grads, extra_grads)]
        return value, np.concatenate([g.reshape(-1).numpy() for g in grads])

    start = np.concatenate([p.reshape(-1).numpy() for p in params]).copy()
    # L-BFGS-B's own algebra is small; its BLAS threads would spin against torch's between
    # the two (12x slower for a 2,000 × 5 Dirichlet fit on 2 cores), so it gets one.
    with threadpool_limits(limits=1, user_api="blas"):
        result = minimize(objective, start, jac=True, method="L-BFGS-B",
                          options={"maxiter": max_iter, "maxcor": min(_HISTORY, len(start)), "ftol": 1e-15,
                                   "gtol": 1e-10})
    load(result.x)


def _linear_pullback(rows: torch.Tensor, residual: torch.Tensor) -> list[torch.Tensor]:
    """The gradient of Σ NLL through out = rows @ Wᵀ + b: (residualᵀ rows, Σ residual)."""
    return [residual.T @ rows, residual.sum(0)]


def _log(q: np.ndarray) -> np.ndarray:
    # A class calibrated to exactly 0 becomes log 0 = -inf: probability 0 after renormalising.
    with np.errstate(divide="ignore"):
        return np.log(q)


def _floats(values: torch.Tensor | ArrayLike) -> list:
    """A tensor or array of any shape as nested lists of Python floats, for JSON."""
    return np.asarray(values, dtype=np.float64).tolist()


class Calibrator:
    """Base class. Logit transforms implement ``fit`` and ``_calibrated(z)`` on float64
    logits; calibrators that do not end in a softmax override ``predict_proba`` instead."""

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> Calibrator:
        return self

    def too_costly(self, n: int, k: int) -> str | None:
        """Why fitting on ``n`` logits of ``k`` classes would take too long, in one line
        naming the setting that allows it; None (the default) when it will not. The run
        skips such a calibrator with that line instead of running for an hour."""
        return None

    def params(self) -> dict:
        """The fitted parameters as plain JSON values (floats and lists of floats); none here."""
        return {}

    def load_params(self, params: dict) -> Calibrator:
        """Set the fitted state from ``params()``'s output (``calibrators.json``): the
        calibrator then predicts as it did, without refitting. Returns self."""
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        return torch.softmax(self._calibrated(_as_logits(logits)), dim=1).numpy()

    def _calibrated(self, z: torch.Tensor) -> torch.Tensor:
        return z


class Uncalibrated(Calibrator):
    """softmax(z): the model as trained, reported as calibrator ``none``."""


# Elements of one block of logits in the temperature fit: 8 MiB of float64, small enough
# to stay in cache (ten times faster than 128 MiB blocks at 1,000,000 × 100) and to bound
# the memory whatever N and K are.
_BLOCK_ELEMENTS = 1 << 20


def _nll_derivatives(z: torch.Tensor, y: torch.Tensor, beta: float) -> tuple[float, float, float]:
    """The mean NLL of softmax(β z) and its first two derivatives in β, block by block.

    With p = softmax(β z_i): NLL = logsumexp(β z_i) − β z_iy, d/dβ = E_p[z_i] − z_iy and
    d²/dβ² = Var_p[z_i] ≥ 0, so the NLL is convex in the inverse temperature β. Each
    row is shifted by its largest logit first (c = z − max z), which changes none of the
    three and keeps exp(β c) ≤ 1 and the variance free of cancellation."""
    rows = max(1, _BLOCK_ELEMENTS // max(1, z.shape[1]))
    value = slope = curvature = 0.0
    for start in range(0, len(z), rows):
        shifted = z[start:start + rows] - z[start:start + rows].amax(dim=1, keepdim=True)
        target = shifted.gather(1, y[start:start + rows, None]).squeeze(1)
        weights = (shifted * beta).exp_()
        total = weights.sum(dim=1)
        mean = torch.einsum("ij,ij->i", weights, shifted) / total
        second = torch.einsum("ij,ij->i", weights, shifted.square_()) / total
        value += float((total.log() - beta * target).sum())
        slope += float((mean - target).sum())
        curvature += float((second - mean.square()).clamp(min=0).sum())
    n = len(z)
    return value / n, slope / n, curvature / n


def _fit_inverse_temperature(z: torch.Tensor, y: torch.Tensor, max_iter: int) -> float:
    """The β = 1/T that minimises the mean NLL of softmax(β z): Newton's method on the
    convex NLL(β), from β = 1, halving a step that would leave β > 0 or raise the NLL.
    A handful of passes over the logits, where a line search evaluates many."""
    beta = 1.0
    value, slope, curvature = _nll_derivatives(z, y, beta)
    for _ in range(max_iter):
        if curvature <= 0 or not math.isfinite(curvature):
            break  # every row constant: any T fits equally well, keep T = 1
        step = slope / curvature
        while True:
            candidate = beta - step
            if candidate > 0:
                new_value, new_slope, new_curvature = _nll_derivatives(z, y, candidate)
                if new_value <= value + 1e-15 * abs(value):
                    break
            step /= 2
            if abs(step) <= 1e-15 * beta:
                return beta
        beta, value, slope, curvature = candidate, new_value, new_slope, new_curvature
        if abs(step) <= 1e-12 * beta:
            break
    return beta


class TemperatureScaling(Calibrator):
    """softmax(z / T) with one temperature T > 0 that minimises the validation NLL.

    The NLL is convex in the inverse temperature β = 1/T (its second derivative is the
    variance of the logits under the calibrated softmax), so Newton's method on β in
    float64 reaches the optimum in a few passes over the logits, done in blocks so the
    memory stays bounded at any N × K (:func:`_fit_inverse_temperature`). Dividing by a
    positive T never changes the argmax, so accuracy is unchanged.

    References: Guo et al. 2017, "On Calibration of Modern Neural Networks", §4.2
    (temperature scaling).
    """

    def __init__(self, max_iter: int = 100) -> None:
        _check_at_least_one("max_iter", max_iter)
        self.max_iter = max_iter
        # log T = 0 (T = 1) until fitted, i.e. the uncalibrated model.
        self.log_temperature = torch.zeros((), dtype=torch.float64)

    @property
    def temperature(self) -> float:
        return float(self.log_temperature.exp())

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> TemperatureScaling:
        z = _as_logits(logits)
        y = _as_labels(labels, z)
        beta = _fit_inverse_temperature(z, y, self.max_iter)
        self.log_temperature = torch.tensor(-math.log(beta), dtype=torch.float64)
        return self

    def params(self) -> dict:
        """``{"T": T}``."""
        return {"T": self.temperature}


    def load_params(self, params: dict) -> TemperatureScaling:
        if not params.get("T", 0) > 0:
            raise ValueError(f"TemperatureScaling needs a temperature T > 0, got {params.get('T')!r}")
        self.log_temperature = torch.tensor(math.log(params["T"]), dtype=torch.float64)
        return self

    def _calibrated(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.log_temperature.exp()


class VectorScaling(Calibrator):
    """softmax(w ⊙ z + b) with a scale w_k and a bias b_k per class, minimising the validation NLL.

    Fitted with L-BFGS from w = 1, b = 0 (the uncalibrated model). Temperature scaling
    is the special case w = 1/T, b = 0, so at the optimum the validation NLL is never
    higher than temperature scaling's. Unlike a temperature, per-class scales and biases
    can change the arg-max and hence the accuracy. ``scale`` and ``bias`` hold w and b
    (length K) after ``fit``.

    References: Guo et al. 2017, "On Calibration of Modern Neural Networks", §4.2
    (vector scaling).
    """

    def __init__(self, max_iter: int = 100) -> None:
        _check_at_least_one("max_iter", max_iter)
        self.max_iter = max_iter
        self.scale: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> VectorScaling:
        z = _as_logits(logits)
        y = _as_labels(labels, z)
        k = z.shape[1]
        self.scale = torch.ones(k, dtype=torch.float64)
        self.bias = torch.zeros(k, dtype=torch.float64)
        _fit_nll(self._calibrated, lambda rows, residual: [(residual * rows).sum(0), residual.sum(0)], z, y,
                 [self.scale, self.bias], self.max_iter)
        return self

    def params(self) -> dict:
        """``{"w": [w_1..w_K], "b": [b_1..b_K]}``."""
        return {"w": _floats(_require_fitted(self, self.scale)), "b": _floats(_require_fitted(self, self.bias))}


    def load_params(self, params: dict) -> VectorScaling:
        self.scale, self.bias = (torch.tensor(params[key], dtype=torch.float64) for key in ("w", "b"))
        return self

    def _calibrated(self, z: torch.Tensor) -> torch.Tensor:
        scale = _check_fitted(self, self.scale, z)
        return z * scale + _require_fitted(self, self.bias)


class MatrixScaling(Calibrator):
    """softmax(W z + b) with a full K×K matrix W and a bias b, minimising

        NLL + off_diagonal_l2 · K · Σ_{i≠j} W_ij²

    (NLL the mean over the validation set), with L-BFGS from W = I, b = 0 (the
    uncalibrated model). ``weight`` and ``bias`` hold W and b after ``fit``.

    Unpenalised, the K² + K parameters overfit when K is large: Guo et al. report matrix
    scaling far worse than temperature scaling on CIFAR-100 (K = 100: 10 100 parameters
    for 5 000 validation samples). The penalty falls on the off-diagonal entries only, so
    it shrinks towards vector scaling (W diagonal), which costs nothing: at the optimum
    the validation NLL is never higher than vector or temperature scaling's.

    This is not Kull et al.'s ODIR (Dirichlet calibration): ODIR maps log-probabilities,
    penalises the off-diagonal entries and the intercepts with two weights chosen by
    cross-validation; here the map acts on logits, the intercepts b are free and the one
    weight is fixed, so its rows cannot be compared with the paper's.

    Why the factor K: the curvature of the mean NLL in one entry W_ij scales like 1/K
    (softmax probabilities are ~1/K), so a fixed weight that is ample for K = 10 leaves
    K = 100 overfitting. Why 1e-2 (a weight of 0.1 per entry at K = 10, 1 at K = 100):
    on synthetic logits (std 4; labels drawn from a temperature-, vector- or
    matrix-shaped truth; 5 000 validation, 20 000 test samples), at K = 10 its test NLL
    was within 0.006 of the best weight tried (0.001 for the matrix-shaped truth, which
    larger weights start to miss); at K = 100, where an unpenalised fit was 1.9-2.8
    nats worse than temperature scaling and a per-entry weight of 1e-2 still 0.7-1.0
    worse, it was within 0.03. Set 0 for Guo et al.'s unregularised matrix scaling;
    Kull et al. tune the weight by cross-validation, worth doing for a paper table.

    References: Guo et al. 2017, "On Calibration of Modern Neural Networks", §4.2
    (matrix scaling; the unpenalised fit is ``off_diagonal_l2=0``); Kull et al. 2019,
    "Beyond temperature scaling: Obtaining well-calibrated multiclass probabilities with
    Dirichlet calibration" (ODIR, the penalty this one is not).
    """

    def __init__(self, max_iter: int = 100, off_diagonal_l2: float = 1e-2, max_classes: int = 200) -> None:
        _check_at_least_one("max_iter", max_iter)
        _check_at_least_one("max_classes", max_classes)
        self.max_classes = max_classes
        if not off_diagonal_l2 >= 0:
            raise ValueError(f"off_diagonal_l2 must be >= 0, got {off_diagonal_l2}")
        self.max_iter = max_iter
        self.off_diagonal_l2 = off_diagonal_l2
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def too_costly(self, n: int, k: int) -> str | None:
        """Above ``max_classes`` classes: the K² + K parameters and the N·K² cost of every
        evaluation (1,001,000 parameters at K = 1,000; 200 classes took 30 s for 50,000
        logits on 2 cores)."""
        if k <= self.max_classes:
            return None
        return (f"matrix scaling fits K² + K = {k * k + k:,} parameters for K = {k:,} classes, above "
                f"calibrator.matrix.max_classes={self.max_classes} (its cost grows with K²): skipped; raise "
                f"calibrator.matrix.max_classes to fit it anyway, or leave it out of calibrator=[...].")

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> MatrixScaling:
        z = _as_logits(logits)
        y = _as_labels(labels, z)
        k = z.shape[1]
        # _fit_nll updates these two tensors in place.
        weight = self.weight = torch.eye(k, dtype=torch.float64)
        bias = self.bias = torch.zeros(k, dtype=torch.float64)
        off_diagonal = 1.0 - torch.eye(k, dtype=torch.float64)

        def penalty() -> tuple[float, list[torch.Tensor]]:
            off = weight * off_diagonal
            return (self.off_diagonal_l2 * k * float(off.square().sum()),
                    [2 * self.off_diagonal_l2 * k * off, torch.zeros_like(bias)])

        _fit_nll(self._calibrated, _linear_pullback, z, y, [weight, bias], self.max_iter, penalty)
        return self

    def params(self) -> dict:
        """``{"W": K×K rows, "b": [b_1..b_K]}``."""
        return {"W": _floats(_require_fitted(self, self.weight)), "b": _floats(_require_fitted(self, self.bias))}


    def load_params(self, params: dict) -> MatrixScaling:
        self.weight, self.bias = (torch.tensor(params[key], dtype=torch.float64) for key in ("W", "b"))
        return self

    def _calibrated(self, z: torch.Tensor) -> torch.Tensor:
        bias = _check_fitted(self, self.bias, z)
        # Rows of z are samples, so W z for every sample is z @ Wᵀ.
        return z @ _require_fitted(self, self.weight).T + bias


class _OneVsRest(Calibrator, ABC, Generic[State]):
    """One binary calibrator g_k per class, fitted on (s_k, [y = k]), then renormalised:

        q_k = g_k(s_k(z)),    p_k = q_k / Σ_j q_j

    where s(z) is softmax(z) unless a subclass overrides ``_scores``. The division is
    done in log space (a softmax of log q_k), so q_k that are tiny but positive do not
    underflow to an all-zero row. A row in which every q_k is exactly 0 has nothing to
    renormalise and falls back to the uncalibrated softmax(z). ``per_class[k]`` holds
    the fitted state of g_k.

    References: Zadrozny & Elkan 2002, "Transforming Classifier Scores into Accurate
    Multiclass Probability Estimates" (one-vs-rest, then normalise); Guo et al. 2017,
    "On Calibration of Modern Neural Networks", §4.2.
    """

    def __init__(self) -> None:
        self.per_class: list[State] | None = None

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> _OneVsRest[State]:
        z = _as_logits(logits)
        y = _as_labels(labels, z).numpy()
        scores = self._scores(z)
        self.per_class = [self._fit_class(scores[:, k], (y == k).astype(np.float64)) for k in range(z.shape[1])]
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        z = _as_logits(logits)
        per_class = _check_fitted(self, self.per_class, z)
        scores = self._scores(z)
        log_q = torch.from_numpy(
            np.column_stack([self._log_calibrated_class(state, scores[:, k]) for k, state in enumerate(per_class)])
        )
        # softmax of an all -inf row is NaN; torch.where replaces exactly those rows.
        all_zero = torch.isneginf(log_q.amax(dim=1, keepdim=True))
        return torch.where(all_zero, torch.softmax(z, dim=1), torch.softmax(log_q, dim=1)).numpy()

    def _scores(self, z: torch.Tensor) -> np.ndarray:
        """The per-class score each g_k maps: the softmax probabilities by default."""
        return torch.softmax(z, dim=1).numpy()

    @abstractmethod
    def _fit_class(self, score: np.ndarray, target: np.ndarray) -> State:
        """Fit g_k on the scores of class k and the 0/1 (float) targets [y = k]."""

    @abstractmethod
    def _log_calibrated_class(self, state: State, score: np.ndarray) -> np.ndarray:
        """log g_k(score), with -inf where g_k is 0."""


def _logistic_terms(scores: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray, C: float,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For t_ik = a_k s_ik + b_k and targets [y_i = k]: each class's penalised log-loss
    Σ_i softplus(t_ik) − Σ_{y_i = k} t_ik + a_k²/(2C), its gradient (K×2) and Hessian
    (K×3: aa, ab, bb) in (a_k, b_k), summed over row blocks of bounded size."""
    n, k = scores.shape
    loss, grad, hess = np.zeros(k), np.zeros((k, 2)), np.zeros((k, 3))
    rows = max(1, _BLOCK_ELEMENTS // k)
    for start in range(0, n, rows):
        s = scores[start:start + rows]
        t = s * a + b
        prob = 0.5 * (1.0 + np.tanh(0.5 * t))  # σ(t) without overflow
        weight = prob * (1.0 - prob)
        loss += np.logaddexp(0.0, t).sum(axis=0)
        grad[:, 0] += (prob * s).sum(axis=0)
        grad[:, 1] += prob.sum(axis=0)
        hess += np.stack([(weight * s * s).sum(axis=0), (weight * s).sum(axis=0), weight.sum(axis=0)], axis=1)
    # The targets' part: each sample's own class only.
    own = scores[np.arange(n), y]
    own_sum, own_count = np.bincount(y, weights=own, minlength=k), np.bincount(y, minlength=k)
    loss -= a * own_sum + b * own_count - a * a / (2 * C)
    grad -= np.stack([own_sum - a / C, own_count], axis=1)
    hess[:, 0] += 1.0 / C
    return loss, grad, hess


def _fit_logistic_columns(scores: np.ndarray, y: np.ndarray, C: float, fitted: np.ndarray,
                          max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """K one-feature logistic regressions at once, column k of ``scores`` against
    [y = k], each minimising its log-loss summed over the samples plus a_k²/(2C)
    (scikit-learn's ``LogisticRegression(C)``, the intercept unpenalised): Newton's
    method on every (a_k, b_k) together from (1, 0), halving the step of any class whose
    loss would rise. Classes outside ``fitted`` stay at (1, 0)."""
    k = scores.shape[1]
    a, b = np.ones(k), np.zeros(k)
    loss, grad, hess = _logistic_terms(scores, y, a, b, C)
    active = fitted.copy()
    # A damping of the Hessian's diagonal: where every σ(t) saturates (a class the scores
    # separate) the Hessian is singular; the damping changes the steps, not the optimum.
    damping = 1e-9 * len(scores)
    for _ in range(max_iter):
        h_aa, h_ab, h_bb = hess[:, 0] + damping, hess[:, 1], hess[:, 2] + damping
        det = h_aa * h_bb - h_ab**2
        step_a = np.where(active, (h_bb * grad[:, 0] - h_ab * grad[:, 1]) / det, 0.0)
        step_b = np.where(active, (h_aa * grad[:, 1] - h_ab * grad[:, 0]) / det, 0.0)
        scale = np.ones(k)
        for _ in range(30):
            new_loss, new_grad, new_hess = _logistic_terms(scores, y, a - scale * step_a, b - scale * step_b, C)
            worse = active & (new_loss > loss + 1e-12 * np.abs(loss))
            if not worse.any():
                break
            scale[worse] /= 2
        a, b = a - scale * step_a, b - scale * step_b
        loss, grad, hess = new_loss, new_grad, new_hess
        done = np.abs(scale * step_a) + np.abs(scale * step_b) <= 1e-12 * (1 + np.abs(a) + np.abs(b))
        active &= ~done
        if not active.any():
            break
    return a, b


class PlattScaling(_OneVsRest[tuple[float, float]]):
    """One-vs-rest Platt scaling on each class's softmax log-odds:

        s_k = log p_k − log(1 − p_k),   q_k = σ(a_k s_k + b_k),   p_k ← q_k / Σ_j q_j

    with p = softmax(z), so s_k = z_k − log Σ_{j≠k} e^{z_j}, computed in that form so that
    it stays exact when p_k is within rounding of 0 or 1. Why not the raw logit z_k: a
    logit is only defined up to a shift shared by the whole row, so z_k alone says little
    about p_k without the other logits; the one-dimensional sigmoid on z_k left a
    74%-accurate CIFAR-10 ResNet-20 with a test ECE of 0.176 (0.038 uncalibrated), while
    s_k carries exactly what the binning calibrators read from p_k. With a_k = 1, b_k = 0
    the sigmoid gives back p_k, so the fit starts from the uncalibrated probabilities.

    Each (a_k, b_k) is the logistic regression of [y = k] on the single feature s_k that
    scikit-learn's ``LogisticRegression(C)`` fits (the same objective, solved for every
    class at once by Newton's method, :func:`_fit_logistic_columns`, so 1,000 classes cost
    a few passes over the scores); ``per_class[k] = (a_k, b_k)``. ``C`` is scikit-learn's inverse L2
    strength on a_k (the intercept is not penalised): the penalty a_k² / (2C) is set
    against a *sum* of log-losses over the validation set, so C = 1 is negligible with
    thousands of samples, yet it keeps a_k finite when s_k separates class k perfectly,
    which happens for the easy classes of an accurate network.

    A class with only negatives (missing from the validation labels) or only positives
    cannot be fitted by a logistic regression. It gets the constant a_k = 0,
    σ(b_k) = (N₊ + 1) / (N + 2), the estimate Platt's own smoothed targets give, so a
    missing class keeps a small non-zero probability 1 / (N + 2) rather than 0. Rows never
    fall back to softmax here: σ > 0 and the renormalisation is done in log space.

    References: Platt 1999, "Probabilistic Outputs for Support Vector Machines and
    Comparisons to Regularized Likelihood Methods" (the sigmoid on a classifier's score);
    Zadrozny & Elkan 2002, "Transforming Classifier Scores into Accurate Multiclass
    Probability Estimates" (one-vs-rest, then normalise); Guo et al. 2017, "On
    Calibration of Modern Neural Networks", §4.1 and §4.2 (one-vs-rest extension).
    """

    def __init__(self, C: float = 1.0) -> None:
        if not C > 0:
            raise ValueError(f"C must be > 0, got {C}")
        super().__init__()
        self.C = C

    def params(self) -> dict:
        """``{"a": [a_1..a_K], "b": [b_1..b_K]}``."""
        a, b = zip(*_require_fitted(self, self.per_class))
        return {"a": list(a), "b": list(b)}


    def load_params(self, params: dict) -> PlattScaling:
        self.per_class = [(float(a), float(b)) for a, b in zip(params["a"], params["b"], strict=True)]
        return self

    def _scores(self, z: torch.Tensor) -> np.ndarray:
        """The log-odds s_k = log p_k − log(1 − p_k) of every class (N×K), in O(N·K).

        log(1 − p_k) is log1p(−p_k) for every class but the row's top one, whose p_k ≤ ½
        cannot cancel; for the top class, where p_k may round to 1, it is the log of the
        other classes' total, a log-sum-exp over the row with the top class left out."""
        log_p = torch.log_softmax(z, dim=1)
        log_rest = torch.log1p(-log_p.exp())
        top = log_p.argmax(dim=1, keepdim=True)
        others = log_p.scatter(1, top, -torch.inf)
        log_rest.scatter_(1, top, torch.logsumexp(others, dim=1, keepdim=True))
        return (log_p - log_rest).numpy()

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> PlattScaling:
        """Every class's (a_k, b_k) at once: :func:`_fit_logistic_columns`."""
        z = _as_logits(logits)
        y = _as_labels(labels, z).numpy()
        n, k = z.shape
        positives = np.bincount(y, minlength=k)
        a, b = _fit_logistic_columns(self._scores(z), y, self.C, fitted=(positives > 0) & (positives < n))
        # A class with one label only: the log-odds of (N₊ + 1) / (N + 2), Platt's smoothed targets.
        one_label = (positives == 0) | (positives == n)
        a[one_label] = 0.0
        b[one_label] = np.log((positives[one_label] + 1) / (n - positives[one_label] + 1))
        self.per_class = list(zip(a.tolist(), b.tolist()))
        return self

    def _fit_class(self, score: np.ndarray, target: np.ndarray) -> tuple[float, float]:
        # Not used: fit() solves every class at once.
        raise NotImplementedError

    def _log_calibrated_class(self, state: tuple[float, float], score: np.ndarray) -> np.ndarray:
        a, b = state
        # log σ(t) = -log(1 + e^{-t}), evaluated without overflow for large |t|.
        return -np.logaddexp(0.0, -(a * score + b))


class HistogramBinning(_OneVsRest[np.ndarray]):
    """One-vs-rest histogram binning of the softmax probabilities p_k = softmax(z)_k.

    For class k and the equal-width bins B_m = ((m-1)/M, m/M] (0 in B_1, the convention
    of ``calibrun.metrics``), θ_km is the fraction of validation samples with p_k in B_m
    whose label is k, or the bin centre (m - ½)/M if no validation p_k falls in B_m (no
    evidence, so keep roughly the uncalibrated value). Then q_k = θ_{k,m(p_k)} and
    p_k ← q_k / Σ_j q_j; a row whose q_k are all 0 falls back to softmax(z).
    ``per_class[k]`` holds θ_k1..θ_kM. A class missing from the validation labels gets
    θ = 0 in every non-empty bin.

    References: Zadrozny & Elkan 2001, "Obtaining calibrated probability estimates from
    decision trees and naive Bayesian classifiers"; Guo et al. 2017, "On Calibration of
    Modern Neural Networks", §4.1 and §4.2 (one-vs-rest extension).
    """

    def __init__(self, n_bins: int = 15) -> None:
        _check_at_least_one("n_bins", n_bins)
        super().__init__()
        self.n_bins = n_bins

    def params(self) -> dict:
        """``{"bin_edges": [0, 1/M, .., 1], "values": K rows of θ_k1..θ_kM}``."""
        values = _require_fitted(self, self.per_class)
        return {"bin_edges": _floats(np.arange(self.n_bins + 1) / self.n_bins), "values": _floats(values)}


    def load_params(self, params: dict) -> HistogramBinning:
        self.n_bins = len(params["bin_edges"]) - 1
        self.per_class = [np.asarray(values, dtype=np.float64) for values in params["values"]]
        return self

    def _fit_class(self, score: np.ndarray, target: np.ndarray) -> np.ndarray:
        # The same binning code as the ECE, so a calibrated bin is an ECE bin.
        bins = equal_width_bins(score, target, self.n_bins)
        centre = (np.arange(self.n_bins) + 0.5) / self.n_bins
        return np.where(bins.count > 0, bins.acc, centre)

    def _log_calibrated_class(self, state: np.ndarray, score: np.ndarray) -> np.ndarray:
        return _log(state[equal_width_index(score, self.n_bins)])


class IsotonicCalibration(_OneVsRest[IsotonicRegression]):
    """One-vs-rest isotonic regression of [y = k] on the softmax probability p_k.

    g_k is the non-decreasing step function fitted by scikit-learn's
    ``IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1)``, so test scores
    outside the validation range take the nearest end value; q_k = g_k(p_k) and
    p_k ← q_k / Σ_j q_j, and a row whose q_k are all 0 falls back to softmax(z). A class
    missing from the validation labels gets g_k = 0. ``per_class[k]`` is the fitted
    ``IsotonicRegression``.

    References: Zadrozny & Elkan 2002, "Transforming Classifier Scores into Accurate
    Multiclass Probability Estimates"; Guo et al. 2017, "On Calibration of Modern Neural
    Networks", §4.1 and §4.2 (one-vs-rest extension).
    """

    def params(self) -> dict:
        """``{"thresholds": K lists of p_k knots, "values": K lists of g_k at those knots}``;
        g_k interpolates linearly between knots and is constant beyond the end ones."""
        fitted = _require_fitted(self, self.per_class)
        return {"thresholds": [_floats(g.X_thresholds_) for g in fitted],
                "values": [_floats(g.y_thresholds_) for g in fitted]}


    def load_params(self, params: dict) -> IsotonicCalibration:
        # Refitting on its own knots gives back the same monotone piecewise-linear map.
        self.per_class = [IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(x, y)
                          for x, y in zip(params["thresholds"], params["values"], strict=True)]
        return self

    def _fit_class(self, score: np.ndarray, target: np.ndarray) -> IsotonicRegression:
        return IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(score, target)

    def _log_calibrated_class(self, state: IsotonicRegression, score: np.ndarray) -> np.ndarray:
        return _log(state.predict(score))


class DirichletCalibration(Calibrator):
    """softmax(W log p + b) with p = softmax(z): a linear map of the log-probabilities,
    full K×K W and intercepts b, fitted on the validation NLL plus a penalty.

    ``regularisation``: ``odir`` (the default, Kull et al.'s off-diagonal and intercept
    regularisation: λ·Σ_{i≠j} W_ij² + μ·Σ_j b_j²), ``l2`` (λ·(Σ W_ij² + Σ b_j²), every
    entry) or ``none`` (multinomial logistic regression on log p; a test checks it
    against scikit-learn's). λ and μ are chosen by ``folds``-fold cross-validation on the
    validation split (shuffled with ``cv_seed``), the pair with the lowest held-out NLL,
    then W and b are refitted on the whole split; the grid is ``lambdas`` × ``mus``
    (``mus`` unused by ``l2``). The penalty is not divided by K(K−1) and K, as in the
    authors' library (dirichletcal, ``reg_norm=False``) and experiment code. L-BFGS from
    W = I, b = 0 (the uncalibrated model). Above ``max_classes`` classes the K² + K
    parameters are skipped with one line (:meth:`too_costly`).

    References: Kull, Perelló-Nieto, Kängsepp, Silva Filho, Song and Flach 2019, "Beyond
    temperature scaling: Obtaining well-calibrated multiclass probabilities with Dirichlet
    calibration" (NeurIPS): the map on log p, ODIR and its cross-validation (5 folds,
    lowest log-loss); authors' code github.com/dirichletcal/dirichlet_python.
    """

    REGULARISATIONS = ("odir", "l2", "none")
    # The time of one NLL evaluation, to tell beforehand a fit that would run for hours:
    # a fixed overhead plus N·K·(K + 1) multiply-adds at the rate 2 cores reach (measured:
    # 0.65 ms per evaluation at 500 × 10, 20 ms at 10,000 × 100, 85 ms at 50,000 × 100).
    EVALUATION_OVERHEAD_S, MULTIPLY_ADDS_PER_S = 5e-4, 5e9

    def __init__(self, regularisation: str = "odir", lambdas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0),
                 mus: tuple[float, ...] = (1e-3, 1e-1, 10.0), folds: int = 5, cv_seed: int = 0,
                 max_iter: int = 100, max_classes: int = 200, max_seconds: float = 600.0) -> None:
        if regularisation not in self.REGULARISATIONS:
            raise ValueError(f"regularisation={regularisation!r} is not supported; allowed: "
                             f"{', '.join(self.REGULARISATIONS)}")
        for name, grid in (("lambdas", lambdas), ("mus", mus)):
            if not len(grid) or min(grid) < 0:
                raise ValueError(f"{name} must be a non-empty list of weights >= 0, got {list(grid)}")
        if folds < 2:
            raise ValueError(f"folds must be at least 2, got {folds}")
        _check_at_least_one("max_iter", max_iter)
        _check_at_least_one("max_classes", max_classes)
        self.regularisation, self.lambdas, self.mus = regularisation, tuple(lambdas), tuple(mus)
        self.folds, self.cv_seed, self.max_iter, self.max_classes = folds, cv_seed, max_iter, max_classes
        self.max_seconds = float(max_seconds)
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.chosen: tuple[float, float] = (0.0, 0.0)

    def too_costly(self, n: int, k: int) -> str | None:
        """Above ``max_classes`` classes, or when the cross-validated fits would take more
        than ``max_seconds`` by the estimate above (at most ``max_iter`` evaluations each)."""
        if k > self.max_classes:
            return (f"Dirichlet calibration fits K² + K = {k * k + k:,} parameters for K = {k:,} classes, above "
                    f"calibrator.dirichlet.max_classes={self.max_classes}: skipped; raise "
                    f"calibrator.dirichlet.max_classes to fit it anyway, or leave it out of calibrator=[...].")
        fits = (len(self._grid()) * self.folds if len(self._grid()) > 1 else 0) + 1
        seconds = fits * self.max_iter * (self.EVALUATION_OVERHEAD_S + n * k * (k + 1) / self.MULTIPLY_ADDS_PER_S)
        if seconds <= self.max_seconds:
            return None
        return (f"Dirichlet calibration's {fits} cross-validated fits on {n:,} × {k:,} logits would take up to about "
                f"{seconds / 60:,.0f} minutes, above calibrator.dirichlet.max_seconds={self.max_seconds:g}: skipped; "
                f"raise it, shrink the grid (lambdas, mus, folds), or leave it out of calibrator=[...].")

    def _grid(self) -> list[tuple[float, float]]:
        if self.regularisation == "none":
            return [(0.0, 0.0)]
        if self.regularisation == "l2":
            return [(lam, lam) for lam in self.lambdas]
        return [(lam, mu) for lam in self.lambdas for mu in self.mus]

    def _fit_weights(self, x: torch.Tensor, y: torch.Tensor, lam: float, mu: float,
                     start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """W and b on log-probabilities ``x`` for one penalty (λ, μ), from ``start`` or W = I, b = 0."""
        k = x.shape[1]
        weight, bias = ((start[0].clone(), start[1].clone()) if start is not None
                        else (torch.eye(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)))
        penalised = torch.ones(k, k, dtype=torch.float64) - (torch.eye(k, dtype=torch.float64)
                                                            if self.regularisation == "odir" else 0.0)

        def penalty() -> tuple[float, list[torch.Tensor]]:
            masked = weight * penalised
            return (lam * float(masked.square().sum()) + mu * float(bias.square().sum()),
                    [2 * lam * masked, 2 * mu * bias])

        _fit_nll(lambda rows: rows @ weight.T + bias, _linear_pullback, x, y, [weight, bias], self.max_iter,
                 penalty if self.regularisation != "none" else None)
        return weight, bias

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> DirichletCalibration:
        z = _as_logits(logits)
        y = _as_labels(labels, z)
        x = torch.log_softmax(z, dim=1)
        grid = self._grid()
        if len(grid) > 1:
            order = np.random.default_rng(self.cv_seed).permutation(len(y))
            held_out = np.array_split(order, self.folds)
            # From the strongest penalty to the weakest, each fold's fit starting from its fit
            # at the previous grid point: nearby penalties have nearby optima.
            starts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            losses = [self._held_out_nll(x, y, held_out, lam, mu, starts) for lam, mu in reversed(grid)][::-1]
            self.chosen = grid[int(np.argmin(losses))]
        else:
            self.chosen = grid[0]
        self.weight, self.bias = self._fit_weights(x, y, *self.chosen)
        return self

    def _held_out_nll(self, x: torch.Tensor, y: torch.Tensor, held_out: list[np.ndarray], lam: float,
                      mu: float, starts: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> float:
        """The mean NLL over the folds of a fit on the others (the cross-validation score);
        each fold's fit starts from ``starts[fold]`` and is stored there."""
        total = 0.0
        for index, fold in enumerate(held_out):
            keep = np.setdiff1d(np.arange(len(y)), fold)
            weight, bias = starts[index] = self._fit_weights(x[keep], y[keep], lam, mu, starts.get(index))
            total += float(F.cross_entropy(x[fold] @ weight.T + bias, y[fold], reduction="sum"))
        return total / len(y)

    def params(self) -> dict:
        """``{"W": K×K rows, "b": [b_1..b_K], "lambda": λ, "mu": μ}`` (the chosen penalty)."""
        return {"W": _floats(_require_fitted(self, self.weight)), "b": _floats(_require_fitted(self, self.bias)),
                "lambda": self.chosen[0], "mu": self.chosen[1]}

    def load_params(self, params: dict) -> DirichletCalibration:
        self.weight, self.bias = (torch.tensor(params[key], dtype=torch.float64) for key in ("W", "b"))
        self.chosen = (float(params.get("lambda", 0.0)), float(params.get("mu", 0.0)))
        return self

    def _calibrated(self, z: torch.Tensor) -> torch.Tensor:
        bias = _check_fitted(self, self.bias, z)
        return torch.log_softmax(z, dim=1) @ _require_fitted(self, self.weight).T + bias


def _softmax_np(z: np.ndarray | torch.Tensor) -> np.ndarray:
    return torch.softmax(torch.as_tensor(z, dtype=torch.float64), dim=1).numpy()


def _onehot(y: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(y), k))
    out[np.arange(len(y)), y] = 1.0
    return out


class EnsembleTemperatureScaling(Calibrator):
    """p = w₀·softmax(z/T) + w₁·softmax(z) + w₂/K: temperature scaling mixed with the
    uncalibrated model and the uniform distribution, weights on the simplex.

    T is fitted first, then w with T fixed, both on the validation split. ``loss=mse``
    (the default, as the authors' code does for both steps whatever its argument says):
    T minimises the mean squared error to the one-hot labels within ``temperature_bounds``
    (their (0.05, 5)), w the same error by SLSQP from (1, 0, 0). ``loss=nll``: T is
    :class:`TemperatureScaling`'s NLL optimum and w minimises the NLL. A mixture with
    w₁ or w₂ > 0 can change the arg-max only where softmax(z/T) and softmax(z) disagree,
    which they never do (same order), so accuracy is kept.

    References: Zhang, Kailkhura and Han 2020, "Mix-n-Match: Ensemble and Compositional
    Methods for Uncertainty Calibration in Deep Learning" (ICML), ensemble temperature
    scaling; authors' code github.com/zhang64-llnl/Mix-n-Match-Calibration
    (util_calibration.py: temperature_scaling, ensemble_scaling, ets_calibrate).
    """

    LOSSES = ("mse", "nll")

    def __init__(self, loss: str = "mse", temperature_bounds: tuple[float, float] = (0.05, 5.0)) -> None:
        if loss not in self.LOSSES:
            raise ValueError(f"loss={loss!r} is not supported; allowed: {', '.join(self.LOSSES)}")
        low, high = temperature_bounds
        if not 0 < low < high:
            raise ValueError(f"temperature_bounds must be 0 < low < high, got {list(temperature_bounds)}")
        self.loss, self.temperature_bounds = loss, (float(low), float(high))
        self.temperature: float | None = None
        self.weights: np.ndarray | None = None

    def _error(self, p: np.ndarray, onehot: np.ndarray) -> float:
        if self.loss == "mse":
            return float(np.mean((p - onehot) ** 2))
        return float(-np.mean(np.log(np.clip((p * onehot).sum(axis=1), 1e-300, None))))

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> EnsembleTemperatureScaling:
        from scipy.optimize import minimize, minimize_scalar

        z = _as_logits(logits)
        y = _as_labels(labels, z).numpy()
        onehot, zz = _onehot(y, z.shape[1]), z.numpy()
        if self.loss == "nll":
            self.temperature = TemperatureScaling().fit(zz, y).temperature
        else:
            found = minimize_scalar(lambda t: self._error(_softmax_np(zz / t), onehot), bounds=self.temperature_bounds,
                                    method="bounded", options={"xatol": 1e-10})
            self.temperature = float(found.x)
        parts = self._parts(zz)
        found = minimize(lambda w: self._error(np.tensordot(w, parts, axes=1), onehot), np.array([1.0, 0.0, 0.0]),
                         method="SLSQP", bounds=[(0.0, 1.0)] * 3, tol=1e-12,
                         constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}])
        # SLSQP keeps the constraints to its tolerance; project exactly onto the simplex.
        weights = np.clip(found.x, 0.0, None)
        self.weights = weights / weights.sum()
        return self

    def _parts(self, z: np.ndarray) -> np.ndarray:
        """The three distributions mixed: softmax(z/T), softmax(z), uniform (3 × N × K)."""
        return np.stack([_softmax_np(z / self.temperature), _softmax_np(z), np.full(z.shape, 1.0 / z.shape[1])])

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        weights = _require_fitted(self, self.weights)
        return np.tensordot(weights, self._parts(_as_logits(logits).numpy()), axes=1)

    def params(self) -> dict:
        """``{"T": T, "w": [w₀, w₁, w₂]}``."""
        return {"T": self.temperature, "w": _floats(_require_fitted(self, self.weights))}

    def load_params(self, params: dict) -> EnsembleTemperatureScaling:
        self.temperature, self.weights = float(params["T"]), np.asarray(params["w"], dtype=np.float64)
        return self


class MixNMatch(Calibrator):
    """Ensemble, then composition: :class:`EnsembleTemperatureScaling` followed by one
    isotonic regression shared by all classes (IRM), fitted on the ETS probabilities of
    every (sample, class) pair against the one-hot labels, then renormalised.

    The isotonic map is the same for every class and increasing, and a 10⁻⁹·p tie-break
    (as in the authors' code) keeps each row's order, so the arg-max and the accuracy
    are those of ETS. ``base=none`` applies IRM to softmax(z) alone. Departure from the
    authors' code: their IRM output is not renormalised; calibrun's calibrators return
    rows summing to 1, so it is divided by its row sum (which keeps the order).

    References: Zhang, Kailkhura and Han 2020, "Mix-n-Match: Ensemble and Compositional
    Methods for Uncertainty Calibration in Deep Learning" (ICML): the ensemble (ETS) and
    composition strategies and the accuracy-preserving multi-class isotonic regression;
    authors' code (util_calibration.py: mir_calibrate, ets_calibrate).
    """

    BASES = ("ets", "none")
    # Adding this fraction of p breaks the isotonic map's ties in each row's own order.
    TIE_BREAK = 1e-9

    def __init__(self, base: str = "ets", loss: str = "mse") -> None:
        if base not in self.BASES:
            raise ValueError(f"base={base!r} is not supported; allowed: {', '.join(self.BASES)}")
        self.base = base
        self.ensemble = EnsembleTemperatureScaling(loss=loss) if base == "ets" else None
        self.isotonic: IsotonicRegression | None = None

    def _base_proba(self, z: np.ndarray) -> np.ndarray:
        return self.ensemble.predict_proba(z) if self.ensemble is not None else _softmax_np(_as_logits(z))

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> MixNMatch:
        z = _as_logits(logits)
        y = _as_labels(labels, z).numpy()
        if self.ensemble is not None:
            self.ensemble.fit(z.numpy(), y)
        p = self._base_proba(z.numpy())
        self.isotonic = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(
            p.ravel(), _onehot(y, p.shape[1]).ravel())
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        isotonic = _require_fitted(self, self.isotonic)
        p = self._base_proba(np.asarray(logits))
        q = isotonic.predict(p.ravel()).reshape(p.shape) + self.TIE_BREAK * p
        return q / q.sum(axis=1, keepdims=True)

    def params(self) -> dict:
        """``{"ets": ETS's params or {}, "thresholds": [...], "values": [...]}`` (the isotonic knots)."""
        isotonic = _require_fitted(self, self.isotonic)
        return {"ets": self.ensemble.params() if self.ensemble is not None else {},
                "thresholds": _floats(isotonic.X_thresholds_), "values": _floats(isotonic.y_thresholds_)}

    def load_params(self, params: dict) -> MixNMatch:
        if self.ensemble is not None:
            self.ensemble.load_params(params["ets"])
        self.isotonic = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(
            params["thresholds"], params["values"])
        return self


# How far (relative) the top label stays above 1/K and the others below it, so that the
# argmax is unambiguous in float64 (1e-9 of a gap of 1e-10 is below its resolution).
_STRICT = 1e-6


class SplineCalibration(Calibrator):
    """Top-label recalibration by a spline of the cumulative accuracy.

    On the validation split, sorted by top-label confidence s: the cumulative difference
    of accuracy and confidence, (Σ_{j≤i} [correct_j] − Σ_{j≤i} s_j)/N, against the rank
    fraction i/(N − 1) is fitted by least squares with a natural cubic spline through
    ``knots`` equally spaced knots; its derivative is the local accuracy minus s, so the
    recalibrated confidence of the i-th sample is s_i plus that derivative, clipped to
    [0, 1], and a new confidence is interpolated linearly between the validation ones
    (constant beyond the ends). The top label stays the prediction, as in the paper: s′ is
    at least 1/K, and the other classes share the rest, 1 − s′, in their ratios, pulled
    towards an even split just enough that none exceeds s′ (evenly where the top class
    held everything). Without that pull, 1.4% of the predictions of an overconfident
    model on 50,000 × 1,000 logits moved to another class.

    The authors' map is not monotone in general (s plus the spline's slope can fall where
    the slope falls faster than s rises: by 0.001 on the demo's 500 validation logits).
    ``monotone=true`` replaces the recalibrated values by their isotonic regression on s
    (a departure from the paper, off by default), so a higher confidence never maps lower.

    References: Gupta, Rahimi, Ajanthan, Mensink, Sminchisescu and Hartley 2021,
    "Calibration of Neural Networks using Splines" (ICLR): the cumulative-accuracy spline
    and its derivative; 6 knots and the natural runout are the authors' code's
    (github.com/kartikgupta-at-anu/spline-calibration, recalibrate.py). The paper
    recalibrates the top label only; the rest of the row is calibrun's completion.
    """

    def __init__(self, knots: int = 6, monotone: bool = False) -> None:
        if knots < 2:
            raise ValueError(f"knots must be at least 2, got {knots}")
        self.knots, self.monotone = knots, bool(monotone)
        self.scores: np.ndarray | None = None
        self.calibrated: np.ndarray | None = None

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> SplineCalibration:
        from scipy.interpolate import CubicSpline

        z = _as_logits(logits)
        y = _as_labels(labels, z).numpy()
        p = _softmax_np(z)
        order = np.argsort(p.max(axis=1), kind="stable")
        scores = p.max(axis=1)[order]
        correct = (p.argmax(axis=1) == y)[order].astype(np.float64)
        n = len(scores)
        rank = np.linspace(0.0, 1.0, n)
        target = (np.cumsum(correct) - np.cumsum(scores)) / n
        knots = np.linspace(0.0, 1.0, self.knots)
        # A natural cubic spline is linear in its values at the knots: one basis spline per knot.
        basis = [CubicSpline(knots, np.eye(self.knots)[j], bc_type="natural") for j in range(self.knots)]
        design = np.column_stack([b(rank) for b in basis])
        values = np.linalg.lstsq(design, target, rcond=None)[0]
        slope = sum(v * b(rank, 1) for v, b in zip(values, basis))
        calibrated = np.clip(scores + slope, 0.0, 1.0)
        if self.monotone:
            calibrated = IsotonicRegression(y_min=0.0, y_max=1.0).fit_transform(scores, calibrated)
        self.scores, self.calibrated = scores, calibrated
        return self

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        scores = _require_fitted(self, self.scores)
        p = _softmax_np(_as_logits(logits))
        top = p.argmax(axis=1)
        rows = np.arange(len(p))
        old = p[rows, top]
        k = p.shape[1]
        # The top label stays the prediction, as in the paper: a most probable class holds
        # at least 1/K (just above, so that the argmax is unambiguous).
        new = np.maximum(np.interp(old, scores, _require_fitted(self, self.calibrated)), (1.0 + _STRICT) / k)
        out = self._others(p, top, old, new)
        out[rows, top] = new
        return out

    @staticmethod
    def _others(p: np.ndarray, top: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
        """The other classes' share of 1 − s′: their ratios (evenly where the top class held
        everything), pulled towards even just enough that none exceeds s′."""
        rows, rest = np.arange(len(p)), 1.0 - old
        ratios = np.divide(p, rest[:, None], out=np.zeros_like(p), where=rest[:, None] > 0)
        ratios[rest <= 0] = 1.0
        ratios[rows, top] = 0.0
        ratios /= ratios.sum(1, keepdims=True)
        even = 1.0 / (p.shape[1] - 1)
        # shares = t·ratios + (1 − t)·even with the largest t ≤ 1 that keeps (1 − s′)·share ≤ s′.
        allowed = np.divide(new, 1.0 - new, out=np.full_like(new, np.inf), where=new < 1.0)
        largest = ratios.max(1)
        bound = np.divide(allowed - even, largest - even, out=np.full_like(new, np.inf), where=largest > even)
        t = np.where(bound < 1.0, bound * (1.0 - _STRICT), 1.0)[:, None]
        return (1.0 - new)[:, None] * (t * ratios + (1.0 - t) * even)

    def params(self) -> dict:
        """``{"scores": validation confidences (sorted), "calibrated": their recalibrated values}``."""
        calibrated = _require_fitted(self, self.calibrated)
        return {"scores": _floats(_require_fitted(self, self.scores)), "calibrated": _floats(calibrated)}

    def load_params(self, params: dict) -> SplineCalibration:
        self.scores, self.calibrated = (np.asarray(params[key], dtype=np.float64) for key in ("scores", "calibrated"))
        return self


class BayesianBinningQuantiles(_OneVsRest[list]):
    """BBQ: one-vs-rest, each class's probability p_k averaged over equal-frequency
    binnings of the validation scores, each binning weighted by its Bayesian score.

    For a binning M of B bins (the interior edges at the ⌊iN/B⌋-th smallest score, each
    edge in the bin above; bin b spans [lo_b, hi_b] with lo_1 = 0 and hi_B = 1), with m_b
    positives among N_b validation scores and a Beta prior of equivalent sample size N′
    centred on the bin's midpoint c_b (α_b = N′/B·c_b, β_b = N′/B·(1 − c_b)): the score is
    Π_b Γ(N′/B)/Γ(N_b + N′/B) · Γ(m_b + α_b)/Γ(α_b) · Γ(N_b − m_b + β_b)/Γ(β_b), and the
    binning predicts (m_b + α_b)/(N_b + N′/B) in bin b. B runs over
    ⌈N^{1/3}/C⌉ … ⌈C·N^{1/3}⌉; the prediction is the score-weighted average over all B
    (Bayesian model averaging). ``per_class[k]`` holds, per binning, its log weight, its
    interior edges and its per-bin predictions.

    References: Naeini, Cooper and Hauskrecht 2015, "Obtaining Well Calibrated
    Probabilities Using Bayesian Binning" (AAAI), Eq. 3 (the BDeu score), Eq. 1 (model
    averaging), §3 (equal-frequency binnings, N′ = 2, C = 10). netcal's BBQ uses
    equal-width bins and a BIC score instead, so the two differ.
    """

    # The prior's mean is kept this far from 0 and 1, where its Beta parameters vanish.
    PRIOR_FLOOR = 1e-6

    def __init__(self, prior_strength: float = 2.0, range_factor: float = 10.0, max_classes: int = 100) -> None:
        if not prior_strength > 0:
            raise ValueError(f"prior_strength must be > 0, got {prior_strength}")
        if not range_factor >= 1:
            raise ValueError(f"range_factor must be >= 1, got {range_factor}")
        _check_at_least_one("max_classes", max_classes)
        super().__init__()
        self.prior_strength, self.range_factor = float(prior_strength), float(range_factor)
        self.max_classes = max_classes

    def too_costly(self, n: int, k: int) -> str | None:
        if k <= self.max_classes:
            return None
        return (f"BBQ averages about {int(2 * self.range_factor * n ** (1 / 3)):,} binnings per class for {k:,} "
                f"classes, above calibrator.bbq.max_classes={self.max_classes}: skipped; raise "
                f"calibrator.bbq.max_classes to fit it anyway, or leave it out of calibrator=[...].")

    def _bin_counts(self, n: int) -> range:
        cube = n ** (1 / 3)
        return range(max(1, math.ceil(cube / self.range_factor)), max(1, math.ceil(self.range_factor * cube)) + 1)

    def _fit_class(self, score: np.ndarray, target: np.ndarray) -> list:
        from scipy.special import gammaln

        order = np.argsort(score, kind="stable")
        ordered, hits = score[order], np.concatenate([[0.0], np.cumsum(target[order])])
        n, models = len(ordered), []
        for bins in self._bin_counts(n):
            interior = ordered[(np.arange(1, bins) * n) // bins]
            # Samples before each edge (the edge itself belongs to the bin above), then per bin.
            cuts = np.concatenate([[0], np.searchsorted(ordered, interior, side="left"), [n]])
            count, positive = np.diff(cuts), np.diff(hits[cuts])
            bounds = np.concatenate([[0.0], interior, [1.0]])
            # A bin squeezed to the score 0 (or 1) would give the prior a zero parameter.
            centre = np.clip((bounds[:-1] + bounds[1:]) / 2, self.PRIOR_FLOOR, 1 - self.PRIOR_FLOOR)
            share = self.prior_strength / bins
            alpha, beta = share * centre, share * (1 - centre)
            log_score = float(np.sum(gammaln(share) - gammaln(count + share) + gammaln(positive + alpha)
                                     - gammaln(alpha) + gammaln(count - positive + beta) - gammaln(beta)))
            models.append((log_score, interior, (positive + alpha) / (count + share)))
        return models

    def _log_calibrated_class(self, state: list, score: np.ndarray) -> np.ndarray:
        log_scores = np.array([m[0] for m in state])
        weights = np.exp(log_scores - log_scores.max())
        weights /= weights.sum()
        q = sum(w * values[np.searchsorted(interior, score, side="right")]
                for w, (_, interior, values) in zip(weights, state))
        return _log(q)

    def params(self) -> dict:
        """``{"models": K lists of {"log_score", "edges", "values"}}`` (every binning averaged)."""
        fitted = _require_fitted(self, self.per_class)
        return {"models": [[{"log_score": m[0], "edges": _floats(m[1]), "values": _floats(m[2])} for m in state]
                           for state in fitted]}

    def load_params(self, params: dict) -> BayesianBinningQuantiles:
        self.per_class = [[(float(m["log_score"]), np.asarray(m["edges"], dtype=np.float64),
                            np.asarray(m["values"], dtype=np.float64)) for m in state] for state in params["models"]]
        return self
