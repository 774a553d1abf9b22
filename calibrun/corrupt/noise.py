"""Noise: Gaussian, shot, impulse and speckle (Hendrycks & Dietterich 2019, Section 3;
``make_cifar_c.py`` and ``imagenet_c/corruptions.py``, functions of the same names)."""

from __future__ import annotations

import numpy as np
import torch

from calibrun.corrupt import Corruption, unit
from calibrun.corrupt._ops import to_device


class GaussianNoise(Corruption):
    """x + N(0, c²) per pixel and channel."""

    name, random = "gaussian_noise", True
    params = {"cifar": (0.04, 0.06, 0.08, 0.09, 0.10), "imagenet": (0.08, 0.12, 0.18, 0.26, 0.38)}

    def apply(self, images: torch.Tensor, c: float, rng: np.random.Generator) -> torch.Tensor:
        x = unit(images)
        return (x + to_device(rng.normal(scale=c, size=x.shape), x)).clamp(0, 1) * 255


class ShotNoise(Corruption):
    """Poisson(c·x) / c: photon counts of an exposure that catches c photons at full white."""

    name, random = "shot_noise", True
    params = {"cifar": (500, 250, 100, 75, 50), "imagenet": (60, 25, 12, 5, 3)}

    def apply(self, images: torch.Tensor, c: float, rng: np.random.Generator) -> torch.Tensor:
        counts = rng.poisson(images.cpu().numpy() / 255.0 * c)
        return (to_device(counts, unit(images)) / c).clamp(0, 1) * 255


class ImpulseNoise(Corruption):
    """Salt and pepper, ``skimage.util.random_noise(mode="s&p", amount=c)``: each pixel
    value turns to 0 or 1 (even odds) with probability c."""

    name, random = "impulse_noise", True
    params = {"cifar": (0.01, 0.02, 0.03, 0.05, 0.07), "imagenet": (0.03, 0.06, 0.09, 0.17, 0.27)}

    def apply(self, images: torch.Tensor, c: float, rng: np.random.Generator) -> torch.Tensor:
        x = unit(images)
        flipped = to_device(rng.random(x.shape) < c, x).bool()
        salt = to_device(rng.random(x.shape) < 0.5, x)
        return torch.where(flipped, salt, x) * 255


class SpeckleNoise(Corruption):
    """x + x·N(0, c²): noise that grows with the intensity."""

    name, random = "speckle_noise", True
    params = {"cifar": (0.06, 0.1, 0.12, 0.16, 0.2), "imagenet": (0.15, 0.2, 0.35, 0.45, 0.6)}

    def apply(self, images: torch.Tensor, c: float, rng: np.random.Generator) -> torch.Tensor:
        x = unit(images)
        return (x + x * to_device(rng.normal(scale=c, size=x.shape), x)).clamp(0, 1) * 255
