"""Blur: Gaussian, glass, defocus, motion and zoom (Hendrycks & Dietterich 2019,
Section 3; ``make_cifar_c.py`` and ``imagenet_c/corruptions.py``, functions of the same
names)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from calibrun.corrupt import Corruption, unit
from calibrun.corrupt._ops import _padded_index, clipped_zoom, gaussian_blur, motion_blur, require_cv2


class GaussianBlur(Corruption):
    """``skimage.filters.gaussian(x, sigma=c)`` per channel."""

    name, random = "gaussian_blur", False
    params = {"cifar": (0.4, 0.6, 0.7, 0.8, 1), "imagenet": (1, 2, 3, 4, 6)}

    def apply(self, images: torch.Tensor, c: float, rng: np.random.Generator) -> torch.Tensor:
        return gaussian_blur(unit(images), c).clamp(0, 1) * 255


class GlassBlur(Corruption):
    """Blur (σ), move pixels locally, blur again; c = (σ, max shift, iterations).

    The recipe's loop means to swap each pixel with a neighbour up to ``max shift`` away
    (``x[h, w], x[h', w'] = x[h', w'], x[h, w]``), but on NumPy arrays the right-hand side
    holds views, so the pixel at (h, w) takes its neighbour's value and the neighbour
    keeps its own. The published CIFAR-10-C and ImageNet-C were made that way, and so is
    this: a copy, not a swap. Shifts are drawn from [−max, max − 1], as ``randint`` does."""

    name, random = "glass_blur", True
    params = {"cifar": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
              "imagenet": ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))}

    def apply(self, images: torch.Tensor, c: tuple[float, int, int], rng: np.random.Generator) -> torch.Tensor:
        sigma, delta, iterations = c
        # The recipe stores the first blur as uint8 (np.uint8 truncates) before moving pixels.
        x = (gaussian_blur(unit(images), sigma) * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        n, h, w, _ = x.shape
        for _ in range(iterations):
            # The recipe's draws, one call per row as it makes them: (row, column, image, (dx, dy)).
            shifts = np.stack([rng.integers(-delta, delta, size=(w - 2 * delta, n, 2))
                               for _ in range(h - 2 * delta)])
            x = _moved_pixels(x, torch.as_tensor(shifts, device=x.device), delta)
        return gaussian_blur(x.permute(0, 3, 1, 2).float() / 255, sigma).clamp(0, 1) * 255


def _moved_pixels(x: torch.Tensor, shifts: torch.Tensor, delta: int) -> torch.Tensor:
    """One pass of the recipe's loop, all pixels at once. The loop visits rows h−δ … δ+1,
    then columns w−δ … δ+1, both downwards, and gives each pixel the value its neighbour
    holds at that moment: the neighbour's value at the start of the pass if it is visited
    later (or never), the value it took if it was visited earlier. Following those links
    back to a pixel that still holds its starting value (pointer doubling, a few rounds)
    gives every pixel's final value without the loop's h·w sequential steps."""
    n, h, w, _ = x.shape
    rows = torch.arange(h - delta, delta, -1, device=x.device)
    cols = torch.arange(w - delta, delta, -1, device=x.device)
    visited = (rows[:, None] * w + cols[None, :]).flatten()  # flat positions in the loop's order
    step = torch.full((h * w,), h * w, device=x.device)      # never visited: after every step
    step[visited] = torch.arange(len(visited), device=x.device)
    source = ((rows[:, None, None] + shifts[..., 1]) * w + cols[None, :, None] + shifts[..., 0])
    source = source.reshape(len(visited), n).T               # (image, visited pixel)
    link = torch.arange(h * w, device=x.device).repeat(n, 1)
    link[:, visited] = source
    # resolved: the pixel's value is the starting value at link (not yet another moved pixel's)
    resolved = torch.ones(n, h * w, dtype=torch.bool, device=x.device)
    resolved[:, visited] = step[source] >= step[visited]
    while not bool(resolved.all()):
        link, resolved = (torch.where(resolved, link, link.gather(1, link)),
                          resolved | resolved.gather(1, link))
    flat = x.reshape(n, h * w, 3)
    return flat.gather(1, link[..., None].expand(-1, -1, 3)).reshape(n, h, w, 3)


class DefocusBlur(Corruption):
    """A disk of radius c[0], anti-aliased by a Gaussian of σ = c[1] (``disk``), applied as
    ``cv2.filter2D`` does: correlation, edges mirrored about the edge pixel."""

    name, random = "defocus_blur", False
    params = {"cifar": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
              "imagenet": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))}

    def apply(self, images: torch.Tensor, c: tuple[float, float], rng: np.random.Generator) -> torch.Tensor:
        kernel = torch.from_numpy(disk(*c)).to(device=images.device, dtype=torch.float32)
        radius = kernel.shape[0] // 2
        x = unit(images)
        h, w = x.shape[-2:]
        padded = x[..., _padded_index(h, radius, "mirror", x.device), :][..., _padded_index(w, radius, "mirror",
                                                                                              x.device)]
        blurred = F.conv2d(padded, kernel.expand(3, 1, -1, -1).contiguous(), groups=3)
        return blurred.clamp(0, 1) * 255


def disk(radius: float, alias_blur: float) -> np.ndarray:
    """The recipe's ``disk``: the pixels within ``radius`` of the centre of a 17×17 grid
    (or 2·radius + 1 past radius 8), normalised, then ``cv2.GaussianBlur`` (3×3, or 5×5
    past radius 8) with σ = ``alias_blur``."""
    cv2 = require_cv2()
    offsets = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    ksize = (3, 3) if radius <= 8 else (5, 5)
    xx, yy = np.meshgrid(offsets, offsets)
    aliased = np.array(xx**2 + yy**2 <= radius**2, dtype=np.float32)
    aliased /= aliased.sum()
    return cv2.GaussianBlur(aliased, ksize=ksize, sigmaX=alias_blur)


class MotionBlur(Corruption):
    """ImageMagick's motion blur (radius c[0], σ c[1]) at an angle drawn from U(−45°, 45°),
    written back as 8-bit PNG (rounded)."""

    name, random = "motion_blur", True
    params = {"cifar": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
              "imagenet": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))}

    def apply(self, images: torch.Tensor, c: tuple[int, float], rng: np.random.Generator) -> torch.Tensor:
        angles = rng.uniform(-45, 45, size=len(images))
        return motion_blur(images.float(), c[0], c[1], angles).round()


class ZoomBlur(Corruption):
    """The mean of the image and its centre zoomed by each factor of
    ``np.arange(*c)`` (``clipped_zoom``)."""

    name, random = "zoom_blur", False
    params = {"cifar": ((1, 1.06, 0.01), (1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.01), (1, 1.26, 0.01)),
              "imagenet": ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03))}

    def apply(self, images: torch.Tensor, c: tuple[float, float, float], rng: np.random.Generator) -> torch.Tensor:
        x = unit(images)
        factors = np.arange(*c)
        total = x.clone()
        for factor in factors:
            total += clipped_zoom(x, float(factor))
        return (total / (len(factors) + 1)).clamp(0, 1) * 255
