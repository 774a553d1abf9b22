"""Batched image operations the corruptions share, written to give what the recipe's
per-image SciPy, scikit-image and ImageMagick calls give, on N×3×H×W float tensors on
any device. Each says which call it stands for."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from calibrun import UserError


def require_cv2() -> Any:
    """OpenCV, or a one-line error naming the extra that installs it."""
    try:
        import cv2
    except ImportError:
        raise UserError("calibrun-corrupt needs OpenCV for the recipe's filters: "
                        "pip install 'calibrun[corrupt]' (opencv-python-headless).") from None
    return cv2


def _padded_index(n: int, radius: int, mode: str, device: torch.device) -> torch.Tensor:
    """Indices into a length-``n`` axis extended by ``radius`` on each side, as SciPy's
    ``mode`` extends it: ``nearest`` repeats the edge, ``reflect`` mirrors about the edge
    (d c b a | a b c d), ``mirror`` about the edge pixel (d c b | a b c d). Any radius,
    also one longer than the axis."""
    i = torch.arange(-radius, n + radius, device=device)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    if mode == "reflect":
        i = i % (2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    if mode == "mirror":
        period = max(2 * n - 2, 1)
        i = i % period
        return torch.where(i >= n, period - i, i)
    raise ValueError(f"unknown boundary mode {mode!r}")


def correlate1d(x: torch.Tensor, weights: torch.Tensor, dim: int, mode: str) -> torch.Tensor:
    """``scipy.ndimage.correlate1d`` along ``dim`` (-1 or -2) of an N×C×H×W tensor with an
    odd-length kernel centred on each pixel."""
    if dim == -2:
        # Windows along the last axis are contiguous: the product runs several times
        # faster on large images (10x at 227 pixels and σ = 6) than windows down columns.
        return correlate1d(x.transpose(-1, -2), weights, -1, mode).transpose(-1, -2)
    radius = (len(weights) - 1) // 2
    n = x.shape[dim]
    padded = x.index_select(dim, _padded_index(n, radius, mode, x.device))
    windows = padded.unfold(dim if dim >= 0 else x.dim() + dim, len(weights), 1)
    return windows @ weights.to(x)


def gaussian_weights(sigma: float, truncate: float) -> torch.Tensor:
    """SciPy's Gaussian kernel: radius ``int(truncate·σ + 0.5)``, normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * offsets**2 / sigma**2)
    return torch.from_numpy(w / w.sum())


def gaussian_blur(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """``skimage.filters.gaussian`` (i.e. ``scipy.ndimage.gaussian_filter``) over H and W
    of each channel: scikit-image's defaults are ``mode="nearest"``, ``truncate=4``."""
    w = gaussian_weights(sigma, truncate)
    return correlate1d(correlate1d(x, w, -1, mode), w, -2, mode)


def clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The recipe's ``clipped_zoom``: the central 1/``factor`` of each image enlarged back to
    its size. ``scipy.ndimage.zoom(order=1)`` maps output pixel o to input o·(n−1)/(m−1),
    which is bilinear interpolation with ``align_corners=True``; SciPy rounds the output
    size to ``round(n·factor)``."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    size = (int(round(ch * factor)), int(round(cw * factor)))
    zoomed = F.interpolate(crop, size=size, mode="bilinear", align_corners=True)
    trim_top, trim_left = (size[0] - h) // 2, (size[1] - w) // 2
    return zoomed[..., trim_top:trim_top + h, trim_left:trim_left + w]


def motion_blur(x: torch.Tensor, radius: int, sigma: float, angles: np.ndarray) -> torch.Tensor:
    """ImageMagick's ``-motion-blur radius×sigma+angle`` per image (``angles`` in degrees,
    one per image): a one-sided Gaussian of ``2·radius + 1`` taps along the angle, edge
    pixels repeated. Follows the NumPy port of ImageMagick's kernel in imagecorruptions
    (Michaelis et al. 2019), ``_motion_blur``: the taps stop where the shift leaves the
    image, without renormalising."""
    n, channels, h, w = x.shape
    width = 2 * radius + 1
    taps = np.arange(width, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    theta = np.deg2rad(np.asarray(angles, dtype=np.float64))[:, None]
    dy = -np.ceil(taps * np.sin(theta) - 0.5).astype(np.int64)  # N × taps
    dx = -np.ceil(taps * np.cos(theta) - 0.5).astype(np.int64)
    inside = np.cumprod((np.abs(dy) < h) & (np.abs(dx) < w), axis=1).astype(bool)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    flat = x.reshape(n, channels, h * w)
    out = torch.zeros_like(x)
    for tap in range(width):
        keep = torch.as_tensor(inside[:, tap], device=x.device)
        if not keep.any():
            break
        r = (rows[None, :] - torch.as_tensor(dy[:, tap], device=x.device)[:, None]).clamp(0, h - 1)
        c = (cols[None, :] - torch.as_tensor(dx[:, tap], device=x.device)[:, None]).clamp(0, w - 1)
        # Each image's pixels at its own shift, gathered along the flattened H·W axis.
        index = (r[:, :, None] * w + c[:, None, :]).reshape(n, 1, h * w).expand(n, channels, h * w)
        shifted = flat.gather(2, index).reshape(n, channels, h, w)
        out += shifted * (float(kernel[tap]) * keep.to(x))[:, None, None, None]
    return out


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """``skimage.color.rgb2hsv`` on N×3×H×W in [0, 1], ties resolved as it does (blue
    over green over red)."""
    r, g, b = x.unbind(1)
    value = x.amax(1)
    delta = value - x.amin(1)
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    sat = torch.where(delta == 0, torch.zeros_like(delta), delta / torch.where(value == 0, 1, value))
    hue = torch.where(r == value, (g - b) / safe, torch.zeros_like(r))
    hue = torch.where(g == value, 2 + (b - r) / safe, hue)
    hue = torch.where(b == value, 4 + (r - g) / safe, hue)
    hue = torch.where(delta == 0, torch.zeros_like(hue), (hue / 6) % 1)
    return torch.stack([hue, sat, value], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """``skimage.color.hsv2rgb`` on N×3×H×W."""
    hue, sat, value = x.unbind(1)
    sector = torch.floor(hue * 6)
    f = hue * 6 - sector
    p, q, t = value * (1 - sat), value * (1 - f * sat), value * (1 - (1 - f) * sat)
    options = torch.stack([torch.stack(c, 1) for c in
                           ((value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value), (value, p, q))])
    pick = (sector.long() % 6)[None, :, None].expand(1, -1, 3, -1, -1)
    return options.gather(0, pick)[0]


def plasma_fractal(n: int, mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """The recipe's diamond-square height maps (after FLHerne's mapgen), ``n`` at once:
    N×mapsize×mapsize in [0, 1]. ``mapsize`` is a power of two."""
    maps = np.zeros((n, mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = maps[:, 0:mapsize:step, 0:mapsize:step]
        squares = corners + np.roll(corners, -1, axis=1)
        squares += np.roll(squares, -1, axis=2)
        maps[:, half:mapsize:step, half:mapsize:step] = wibbled_mean(squares)
        centres = maps[:, half:mapsize:step, half:mapsize:step]
        corners = maps[:, 0:mapsize:step, 0:mapsize:step]
        across = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        maps[:, 0:mapsize:step, half:mapsize:step] = wibbled_mean(across)
        down = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        maps[:, half:mapsize:step, 0:mapsize:step] = wibbled_mean(down)
        step //= 2
        wibble /= wibbledecay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def to_device(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A NumPy array (drawn on the CPU, so that a seed gives the same files on any device)
    as a tensor of ``like``'s dtype on its device."""
    return torch.from_numpy(np.ascontiguousarray(array)).to(device=like.device, dtype=like.dtype)
