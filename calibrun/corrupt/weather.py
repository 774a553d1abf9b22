"""Weather: snow, frost, fog and spatter (Hendrycks & Dietterich 2019, Section 3;
``make_cifar_c.py`` and ``imagenet_c/corruptions.py``, functions of the same names)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from calibrun import UserError
from calibrun.corrupt import Corruption, unit
from calibrun.corrupt._ops import clipped_zoom, gaussian_blur, motion_blur, plasma_fractal, require_cv2, to_device

FROST = Path(__file__).with_name("frost")
# The recipe draws np.random.randint(5) from its six file names: the sixth is never used.
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")


class Snow(Corruption):
    """A thresholded, zoomed Gaussian snow layer, motion-blurred at an angle drawn from
    U(−135°, −45°) and added twice (once turned 180°), over the image brightened towards
    1.5·grey + 0.5. c = (mean, sd, zoom, threshold, blur radius, blur σ, image weight)."""

    name, random = "snow", True
    params = {"cifar": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
                        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
                        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
              "imagenet": ((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
                           (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
                           (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))}

    def apply(self, images: torch.Tensor, c: tuple[float, ...], rng: np.random.Generator) -> torch.Tensor:
        mean, sd, zoom, threshold, radius, sigma, weight = c
        x = unit(images)
        n, _, h, w = x.shape
        layer = clipped_zoom(to_device(rng.normal(mean, sd, size=(n, 1, h, w)), x), zoom)
        layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
        # The recipe passes the layer to ImageMagick as an 8-bit PNG and reads back 8 bits.
        layer = (layer.clamp(0, 1) * 255).to(torch.uint8).float()
        layer = motion_blur(layer, int(radius), sigma, rng.uniform(-135, -45, size=n)).round() / 255
        grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]  # cv2.COLOR_RGB2GRAY
        x = weight * x + (1 - weight) * torch.maximum(x, grey * 1.5 + 0.5)
        return (x + layer + layer.flip(-1, -2)).clamp(0, 1) * 255


class Frost(Corruption):
    """c[0]·image + c[1]·a random crop of one of five frost photographs, scaled by c[2]
    first (the CIFAR recipe shrinks them to 0.2 with ``cv2.resize``)."""

    name, random = "frost", True
    params = {"cifar": ((1, 0.2, 0.2), (1, 0.3, 0.2), (0.9, 0.4, 0.2), (0.85, 0.4, 0.2), (0.75, 0.45, 0.2)),
              "imagenet": ((1, 0.4, 1), (0.8, 0.6, 1), (0.7, 0.7, 1), (0.65, 0.7, 1), (0.6, 0.75, 1))}

    def apply(self, images: torch.Tensor, c: tuple[float, float, float], rng: np.random.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        frosts = frost_images(c[2])
        small = [f.shape[:2] for f in frosts if f.shape[0] <= h or f.shape[1] <= w]
        if small:
            raise UserError(f"frost: the recipe's frost photographs ({small[0][0]}×{small[0][1]} at scale {c[2]}) "
                            f"are smaller than the {h}×{w} images; resize the images or leave frost out.")
        crops = np.empty((n, h, w, 3), dtype=np.uint8)
        for i in range(n):
            frost = frosts[rng.integers(len(frosts))]
            top, left = rng.integers(0, frost.shape[0] - h), rng.integers(0, frost.shape[1] - w)
            crops[i] = frost[top:top + h, left:left + w]
        layer = to_device(crops, images.float()).permute(0, 3, 1, 2)
        return (c[0] * images.float() + c[1] * layer).clamp(0, 255)


@lru_cache(maxsize=4)
def frost_images(scale: float) -> tuple[np.ndarray, ...]:
    """The frost photographs as RGB uint8 H×W×3, shrunk by ``scale`` as the recipe does
    (``cv2.imread`` then ``cv2.resize(fx=fy=scale)``, bilinear)."""
    cv2 = require_cv2()
    out = []
    for file in FROST_FILES:
        bgr = cv2.imread(str(FROST / file))
        if scale != 1:
            bgr = cv2.resize(bgr, (0, 0), fx=scale, fy=scale)
        out.append(np.ascontiguousarray(bgr[..., ::-1]))
    return tuple(out)


class Fog(Corruption):
    """c[0]·a diamond-square plasma map (decay c[1]) added, then rescaled by the image's
    maximum: x·max / (max + c[0]). The map's side is the smallest power of two covering
    the image (32 for CIFAR, 256 for 224-pixel images, as in the recipe)."""

    name, random = "fog", True
    params = {"cifar": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
              "imagenet": ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))}

    def apply(self, images: torch.Tensor, c: tuple[float, float], rng: np.random.Generator) -> torch.Tensor:
        x = unit(images)
        n, _, h, w = x.shape
        mapsize = 1 << (max(h, w) - 1).bit_length()
        plasma = to_device(plasma_fractal(n, mapsize, c[1], rng)[:, None, :h, :w], x)
        peak = x.amax(dim=(1, 2, 3), keepdim=True)
        return ((x + c[0] * plasma) * peak / (peak + c[0])).clamp(0, 1) * 255


class Spatter(Corruption):
    """Water (c[5] = 0: pale turquoise drops with edges from ``cv2.Canny``) or mud (c[5] = 1:
    brown blobs) from a thresholded, blurred Gaussian layer. c = (mean, sd, blur σ,
    threshold, intensity or mud blur σ, kind)."""

    name, random = "spatter", True
    params = {"cifar": ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                        (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
              "imagenet": ((0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                           (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1))}

    def apply(self, images: torch.Tensor, c: tuple[float, ...], rng: np.random.Generator) -> torch.Tensor:
        mean, sd, sigma, threshold, strength, kind = c
        x = unit(images)
        n, _, h, w = x.shape
        liquid = gaussian_blur(to_device(rng.normal(mean, sd, size=(n, 1, h, w)), x), sigma)
        liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
        if kind == 0:
            mask = to_device(np.stack([_water_mask(layer, strength) for layer in liquid[:, 0].cpu().numpy()]), x)
            colour = torch.tensor([175, 238, 238], device=x.device, dtype=x.dtype)[None, :, None, None] / 255
            return (x + mask[:, None] * colour).clamp(0, 1) * 255
        mud = gaussian_blur((liquid > threshold).to(x.dtype), strength)
        mud = torch.where(mud < 0.8, torch.zeros_like(mud), mud)
        colour = torch.tensor([63, 42, 20], device=x.device, dtype=x.dtype)[None, :, None, None] / 255
        return (x * (1 - mud) + colour * mud).clamp(0, 1) * 255


def _water_mask(liquid: np.ndarray, strength: float) -> np.ndarray:
    """The water branch's mask for one H×W liquid layer, with the recipe's OpenCV calls:
    Canny edges, their distance transform (capped at 20), blurred, equalised, embossed,
    blurred, times the layer (as uint8), scaled to max ``strength``. A layer without
    any drop gives no water (the recipe would divide by zero)."""
    cv2 = require_cv2()
    layer = (liquid.astype(np.float64) * 255).astype(np.uint8)
    dist = cv2.distanceTransform(255 - cv2.Canny(layer, 50, 150), cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
    dist = cv2.blur(cv2.filter2D(dist, cv2.CV_8U, emboss), (3, 3)).astype(np.float32)
    mask = layer * dist
    peak = mask.max()
    return mask / peak * strength if peak > 0 else np.zeros_like(mask)
