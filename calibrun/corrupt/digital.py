"""Digital: contrast, brightness, saturate, JPEG, pixelate and elastic transform
(Hendrycks & Dietterich 2019, Section 3; ``make_cifar_c.py`` and
``imagenet_c/corruptions.py``, functions of the same names)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from calibrun.corrupt import Corruption, unit
from calibrun.corrupt._ops import hsv_to_rgb, require_cv2, rgb_to_hsv, to_device


class Contrast(Corruption):
    """Each channel pulled towards its mean: (x − mean)·c + mean."""

    name, random = "contrast", False
    params = {"cifar": (0.75, 0.5, 0.4, 0.3, 0.15), "imagenet": (0.4, 0.3, 0.2, 0.1, 0.05)}

    def apply(self, images: torch.Tensor, c: float, rng: np.random.Generator) -> torch.Tensor:
        x = unit(images)
        means = x.mean(dim=(2, 3), keepdim=True)
        return ((x - means) * c + means).clamp(0, 1) * 255


class Brightness(Corruption):
    """HSV value + c (``skimage.color.rgb2hsv``/``hsv2rgb``)."""

    name, random = "brightness", False
    params = {"cifar": (0.05, 0.1, 0.15, 0.2, 0.3), "imagenet": (0.1, 0.2, 0.3, 0.4, 0.5)}

    def apply(self, images: torch.Tensor, c: float, rng: np.random.Generator) -> torch.Tensor:
        hsv = rgb_to_hsv(unit(images))
        hsv[:, 2] = (hsv[:, 2] + c).clamp(0, 1)
        return hsv_to_rgb(hsv).clamp(0, 1) * 255


class Saturate(Corruption):
    """HSV saturation · c[0] + c[1]."""

    name, random = "saturate", False
    params = {"cifar": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
              "imagenet": ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))}

    def apply(self, images: torch.Tensor, c: tuple[float, float], rng: np.random.Generator) -> torch.Tensor:
        hsv = rgb_to_hsv(unit(images))
        hsv[:, 1] = (hsv[:, 1] * c[0] + c[1]).clamp(0, 1)
        return hsv_to_rgb(hsv).clamp(0, 1) * 255


def _per_image(images: torch.Tensor, transform: object) -> torch.Tensor:
    """``transform`` (PIL image → PIL image) on each image, back as float N×3×H×W."""
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([np.asarray(transform(Image.fromarray(a))) for a in arrays])  # type: ignore[operator]
    return to_device(out, images.float()).permute(0, 3, 1, 2)


class JpegCompression(Corruption):
    """Saved as JPEG at quality c with Pillow and read back."""

    name, random = "jpeg_compression", False
    params = {"cifar": (80, 65, 58, 50, 40), "imagenet": (25, 18, 15, 10, 7)}

    def apply(self, images: torch.Tensor, c: int, rng: np.random.Generator) -> torch.Tensor:
        def jpeg(image: Image.Image) -> Image.Image:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=c)
            return Image.open(buffer)

        return _per_image(images, jpeg)


class Pixelate(Corruption):
    """Shrunk to c of its size and enlarged back, both with Pillow's box filter."""

    name, random = "pixelate", False
    params = {"cifar": (0.95, 0.9, 0.85, 0.75, 0.65), "imagenet": (0.6, 0.5, 0.4, 0.3, 0.25)}

    def apply(self, images: torch.Tensor, c: float, rng: np.random.Generator) -> torch.Tensor:
        def pixelate(image: Image.Image) -> Image.Image:
            w, h = image.size
            return image.resize((int(w * c), int(h * c)), Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX)

        return _per_image(images, pixelate)


class ElasticTransform(Corruption):
    """A random affine warp (corners moved by up to c[2] pixels), then a smooth random
    displacement field (uniform noise blurred with σ = c[1], times c[0]), per image with
    OpenCV and SciPy as in the recipe. The constants are pixels: 32·k for CIFAR; the
    ImageNet recipe writes 244·k ("should have been 224", its comment says), kept."""

    name, random = "elastic_transform", True
    params = {"cifar": tuple((32 * a, 32 * b, 32 * d) for a, b, d in
                             ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                              (0.1, 0.03, 0.03))),
              "imagenet": tuple((244 * a, 244 * b, 244 * d) for a, b, d in
                                ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02),
                                 (0.12, 0.01, 0.02)))}

    def apply(self, images: torch.Tensor, c: tuple[float, float, float], rng: np.random.Generator) -> torch.Tensor:
        arrays = images.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32) / 255
        out = np.stack([_elastic(a, c, rng) for a in arrays])
        return to_device(out, images.float()).permute(0, 3, 1, 2).clamp(0, 1) * 255


def _elastic(image: np.ndarray, c: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """One H×W×3 float image through the recipe's ``elastic_transform``."""
    from scipy.ndimage import gaussian_filter, map_coordinates

    cv2 = require_cv2()
    strength, smoothness, affine = c
    h, w = image.shape[:2]
    centre, half = np.array((h, w), dtype=np.float32) // 2, min(h, w) // 3
    source = np.array([centre + half, [centre[0] + half, centre[1] - half], centre - half], dtype=np.float32)
    target = source + rng.uniform(-affine, affine, size=source.shape).astype(np.float32)
    image = cv2.warpAffine(image, cv2.getAffineTransform(source, target), (w, h), borderMode=cv2.BORDER_REFLECT_101)
    dx, dy = ((gaussian_filter(rng.uniform(-1, 1, size=(h, w)), smoothness, mode="reflect", truncate=3)
               * strength).astype(np.float32) for _ in range(2))
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = np.stack([rows + dy, cols + dx])
    return np.stack([map_coordinates(image[..., k], coords, order=1, mode="reflect") for k in range(3)], -1)
