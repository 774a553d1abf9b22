"""Smooth calibration error and the smooth reliability curve (Błasiok & Nakkiran 2023).

The top-label residuals ``confidence - correct`` are smoothed over the confidence axis
with a Gaussian kernel reflected at 0 and 1; smooth ECE is the density-weighted mean of
the smoothed residual's absolute value, at the bandwidth σ* where it equals σ (the
paper's fixed point, found by bisection). The discretisation follows relplot, the
authors' package, step for step (its grid, mesh and density floor), so the two agree to
rounding; relplot is the cross-check in the tests.

Everything is computed for a batch of sample weights at once: ``weights`` (B × n) holds
one row per weighting of the n samples, ones for the sample itself and multinomial
counts for a bootstrap resample (``calibrun.bootstrap``), which is then the same
estimator as on the resampled images, without resampling them.

References: Błasiok & Nakkiran (2023), "Smooth ECE: Principled Reliability Diagrams via
Kernel Smoothing", §3 (smECE_σ with the reflected Gaussian kernel, eq. 3) and §4 (σ* with
smECE_σ* = σ*); relplot 1.0 (``relplot.metrics.smECE``).
"""

from __future__ import annotations

import numpy as np
from scipy import fft, sparse

# relplot's discretisation: the kernel is applied on a grid of max(2000, 20/σ)//2 + 1
# points and the error is read on a mesh of max(200, 10/σ) points.
_GRID_POINTS = 2000
_MESH_POINTS = 200
# Added to the smoothed density before dividing by it (relplot's eps), so that an empty
# stretch of the axis contributes nothing instead of 0/0.
_DENSITY_FLOOR = 1e-4
# The bandwidth search: σ = 1 if it already satisfies σ ≤ smECE_σ, else 10 halvings of
# [0, 1]; below this σ the search stops shrinking it (relplot's eps).
_MIN_BANDWIDTH = 1e-3
_BISECTION_STEPS = 10


def _grid_sizes(sigma: np.ndarray) -> np.ndarray:
    # np.rint rounds half to even, as Python's round does in relplot.
    return np.maximum(_GRID_POINTS, np.rint(20 / sigma)).astype(np.int64) // 2 + 1


def _mesh(sigma: float) -> np.ndarray:
    return np.linspace(0, 1, max(round(10 / sigma), _MESH_POINTS))


def _kept_start(size: int) -> int:
    """Where relplot's np.convolve(extended, kernel, "valid")[size // 2: size // 2 + size]
    starts in the full convolution of the reflected grid (3·size − 2) with the kernel."""
    return size - 1 + size // 2


def _interpolate(t: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Rows of ``grid`` (values at i/(G-1)) linearly interpolated at the points ``t``."""
    size = grid.shape[-1]
    left = (t * (size - 1)).astype(int).clip(0, size - 2)
    frac = t * (size - 1) - left
    return grid[..., left] * (1 - frac) + grid[..., left + 1] * frac


class SmoothedResiduals:
    """Kernel-smoothed residuals ``f - y`` and density of the scores ``f`` in [0, 1],
    under each row of ``weights`` (B × n); grids are computed once per grid size."""

    def __init__(self, f: np.ndarray, y: np.ndarray, weights: np.ndarray, single: bool = False,
                 columns: np.ndarray | None = None):
        self.f, self.residual, self.weights = f, f - y, weights
        # The weights as n × B, C-ordered: sparse products take them without a copy.
        self.columns = np.ascontiguousarray(weights.T) if columns is None else columns
        # Single precision halves the FFTs' time; the bootstrap's resamples use it (a
        # relative error near 1e-6), the estimate itself does not.
        self.dtype = np.float32 if single else np.float64
        self._spectra: dict[int, tuple[int, np.ndarray]] = {}

    def _spectrum(self, size: int) -> tuple[int, np.ndarray]:
        """FFT length and the transform of the reflected grids, (2, B, ·): residual, count."""
        if size not in self._spectra:
            # Each score is split between its two neighbouring grid points (linear weights).
            left = (self.f * (size - 1)).astype(int).clip(0, size - 2)
            frac = self.f * (size - 1) - left
            n = len(self.f)
            spread = sparse.csr_matrix((np.concatenate([1 - frac, frac]),
                                        (np.tile(np.arange(n), 2), np.concatenate([left, left + 1]))), shape=(n, size))
            counts = np.asarray(spread.T @ self.columns).T
            residuals = np.asarray(spread.multiply(self.residual[:, None]).tocsr().T @ self.columns).T
            grids = np.stack([residuals, counts])
            # Reflection at both ends: the kernel's mass beyond 0 or 1 folds back inside.
            extended = np.concatenate([grids[..., ::-1][..., :-1], grids, grids[..., ::-1][..., 1:]],
                                      axis=-1).astype(self.dtype)
            # A circular convolution this long equals the linear one on the part kept below.
            length = fft.next_fast_len(4 * size - 3 - _kept_start(size), real=True)
            self._spectra[size] = (length, fft.rfft(extended, length, axis=-1, workers=-1))
        return self._spectra[size]

    def smoothed(self, sigma: np.ndarray, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Smoothed residual and density of ``rows`` on the grid of their bandwidths
        ``sigma`` (one per row, all of one grid size): (2, rows, G)."""
        size = int(_grid_sizes(sigma[:1])[0])
        length, spectrum = self._spectrum(size)
        values, which = np.unique(sigma, return_inverse=True)
        t = np.linspace(0, 1, size)
        kernels = np.exp(-(t - 0.5) ** 2 / (2 * values[:, None] ** 2)) / (np.sqrt(2 * np.pi) * values[:, None])
        kernel_spectra = fft.rfft(kernels.astype(self.dtype), length, axis=-1)
        full = fft.irfft(spectrum[:, rows] * kernel_spectra[which], length, axis=-1, workers=-1)
        start = _kept_start(size)
        return full[..., start:start + size]

    def error(self, sigma: np.ndarray) -> np.ndarray:
        """smECE_σ of each row at its own bandwidth ``sigma`` (B,)."""
        out = np.empty(len(sigma))
        sizes = _grid_sizes(sigma)
        for size in np.unique(sizes):
            rows = np.flatnonzero(sizes == size)
            smoothed = self.smoothed(sigma[rows], rows if len(rows) < len(sigma) else slice(None))
            for value in np.unique(sigma[rows]):
                same = sigma[rows] == value
                residual, density = _interpolate(_mesh(value), smoothed[:, same])
                out[rows[same]] = (np.abs(residual).sum(axis=1, dtype=np.float64)
                                   / (density + _DENSITY_FLOOR).sum(axis=1, dtype=np.float64))
        return out

    def bandwidth(self) -> np.ndarray:
        """σ* of each row: the largest σ the bisection finds with σ ≤ smECE_σ (B,)."""
        def holds(sigma: np.ndarray) -> np.ndarray:
            return (sigma < _MIN_BANDWIDTH) | (sigma < self.error(sigma))

        rows = len(self.weights)
        start, end = np.ones(rows), np.zeros(rows)
        at_one = holds(start)
        for _ in range(_BISECTION_STEPS):
            middle = (start + end) / 2
            ok = holds(middle)
            end, start = np.where(ok, middle, end), np.where(ok, start, middle)
        return np.where(at_one, 1.0, start)

    def curve(self, sigma: float, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The smooth reliability curve at ``t``: E[y | f = t] ≈ t − smoothed residual,
        and the smoothed density of the scores, each (B, len(t))."""
        residual, density = _interpolate(t, self.smoothed(np.full(len(self.weights), sigma)))
        return t - residual / (density + _DENSITY_FLOOR), density.astype(np.float64)


def smooth_ece_weighted(f: np.ndarray, y: np.ndarray, weights: np.ndarray, single: bool = False,
                        columns: np.ndarray | None = None) -> np.ndarray:
    """smECE at its fixed-point bandwidth for each row of ``weights`` (B,); ``columns``,
    if given, the same weights as a C-ordered n × B array."""
    smoothed = SmoothedResiduals(f, y, weights, single, columns)
    return smoothed.error(smoothed.bandwidth())
