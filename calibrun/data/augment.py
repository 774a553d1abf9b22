"""Batched augmentation and normalisation on the device: per-sample parameters, a
handful of tensor ops per batch, no per-image Python."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_crop_flip(images: torch.Tensor, pad: int, generator: torch.Generator | None) -> torch.Tensor:
    """Zero-pad by ``pad``, take a random crop of the original size and flip half of the
    images horizontally, with independent parameters per sample, in one gather.

    References: He et al. 2016, "Deep Residual Learning for Image Recognition", §4.2.
    """
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), device=device, generator=generator)
    rows = dy + torch.arange(h, device=device)
    cols = dx + torch.arange(w, device=device)
    flip = torch.rand(b, 1, device=device, generator=generator) < 0.5
    # Reversing the column index of a sample is its horizontal flip, so crop and flip
    # are one advanced-indexing gather.
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(b, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


# JiGen's PACS augmentation (the flags of its README's ResNet-18 command), batched: every
# sample draws its own crop box, flip, jitter factors and grayscale coin from one
# generator, and the whole batch is transformed by a handful of tensor ops (an affine
# grid, a few blends, one HSV round trip). Constants are Python scalars or made on the
# device: a small tensor copied from pageable host memory would make the host wait for
# the GPU on every batch.

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def random_crop_boxes(
    n: int,
    image_hw: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
    device: torch.device | None = None,
    tries: int = 10,
) -> torch.Tensor:
    """Per-sample crop boxes (x0, y0, w, h) as fractions of the image, drawn like
    torchvision's RandomResizedCrop: area fraction uniform in ``scale``, log aspect
    ratio uniform in log ``ratio``, the first of ``tries`` draws that fits is kept, and a
    sample with none that fits takes the whole image (torchvision's fallback for square
    images; for others it would also clamp the aspect ratio).

    References: Szegedy et al. 2015, "Going Deeper with Convolutions" (the crop);
    torchvision.transforms.RandomResizedCrop.get_params.
    """
    h, w = image_hw
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, device=device, generator=generator)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, tries, device=device, generator=generator))
    # Width and height as fractions of the image's own width and height.
    cw = torch.sqrt(area * aspect * h / w)
    ch = torch.sqrt(area / aspect * w / h)
    fits = (cw <= 1) & (ch <= 1)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first maximum
    any_fit = fits.any(1)
    cw = torch.where(any_fit, cw.gather(1, first).squeeze(1), 1.0)
    ch = torch.where(any_fit, ch.gather(1, first).squeeze(1), 1.0)
    x0 = (1 - cw) * torch.rand(n, device=device, generator=generator)
    y0 = (1 - ch) * torch.rand(n, device=device, generator=generator)
    return torch.stack([x0, y0, cw, ch], 1)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop each image to its box (x0, y0, w, h in fractions), mirror it where ``flip``,
    and resample to size×size, bilinearly, in one ``grid_sample``. Returns float images
    in the input's value range.

    There is no antialiasing: callers keep the crop-to-output ratio near 1 (PACS stores
    images at 227/222 of the output size, as JiGen does), where bilinear is enough.

    References: Jaderberg et al. 2015, "Spatial Transformer Networks" (affine grids).
    """
    b, c = images.shape[:2]
    x0, y0, cw, ch = boxes.unbind(1)
    theta = torch.zeros(b, 2, 3, device=images.device)
    # Output coordinates in [-1, 1] map to the box: a scale of w (h) about its centre; a
    # negative x scale reads the box right to left, which is the horizontal flip.
    theta[:, 0, 0] = torch.where(flip, -cw, cw)
    theta[:, 0, 2] = 2 * x0 + cw - 1
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = 2 * y0 + ch - 1
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma of float RGB images, N×1×H×W."""
    r, g, b = images.split(1, dim=1)
    return GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b


def _shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each image by its ``shift`` (fraction of a turn): RGB → HSV,
    h + shift mod 1, → RGB, for any value range (hue and saturation are ratios)."""
    r, g, b = images.unbind(1)
    v = images.amax(1)
    chroma = v - images.amin(1)
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    s = chroma / torch.where(v > 0, v, torch.ones_like(v))
    h = torch.where(v == r, (g - b) / safe, torch.where(v == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.remainder(h / 6 + shift.view(-1, 1, 1), 1.0)
    # HSV → RGB without branches: channel n (5, 3, 1 for R, G, B) is
    # v − v·s·clamp(min(k, 4 − k), 0, 1) with k = (n + 6h) mod 6.
    n = torch.arange(5.0, 0.0, -2.0, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6 * h.unsqueeze(1), 6.0)
    return v.unsqueeze(1) * (1 - s.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(
    images: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
    bound: float = 255.0,
) -> torch.Tensor:
    """torchvision's colour-jitter operations with one factor per sample (each argument
    has shape N): brightness, contrast, saturation, then hue, in that fixed order
    (torchvision shuffles the order per call). ``bound`` is the white value.

    References: torchvision.transforms.functional adjust_brightness, adjust_contrast,
    adjust_saturation, adjust_hue.
    """

    def per_sample(t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, 1, 1, 1)

    x = (images * per_sample(brightness)).clamp(0, bound)
    mean = grayscale(x).mean((1, 2, 3), keepdim=True)
    x = (per_sample(contrast) * x + (1 - per_sample(contrast)) * mean).clamp(0, bound)
    x = (per_sample(saturation) * x + (1 - per_sample(saturation)) * grayscale(x)).clamp(0, bound)
    return _shift_hue(x, hue)


def jigen_augment(
    images: torch.Tensor,
    size: int,
    generator: torch.Generator | None,
    scale: tuple[float, float] = (0.8, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.4),
    grayscale_p: float = 0.1,
) -> torch.Tensor:
    """JiGen's training augmentation with per-sample parameters: random resized crop to
    size×size, horizontal flip, colour jitter (brightness, contrast, saturation factors
    uniform in [1 − j, 1 + j], hue shift uniform in [−j, j]), random grayscale. uint8 in,
    float in [0, 255] out, not normalised.

    References: Carlucci et al. 2019, "Domain Generalization by Solving Jigsaw Puzzles"
    (CVPR), github.com/fmcarlucci/JigenDG data/data_helper.py get_train_transformers.
    """
    n, device = images.shape[0], images.device
    height, width = images.shape[-2:]
    boxes = random_crop_boxes(n, (height, width), scale, ratio, generator, device)
    flip = torch.rand(n, device=device, generator=generator) < flip_p
    x = resized_crop(images, boxes, flip, size)
    ranges = [(max(0.0, 1 - j), 1 + j) for j in jitter[:3]] + [(-jitter[3], jitter[3])]
    u = torch.rand(n, 4, device=device, generator=generator).unbind(1)
    brightness, contrast, saturation, hue = (lo + (hi - lo) * ui for (lo, hi), ui in zip(ranges, u))
    x = color_jitter(x, brightness, contrast, saturation, hue)
    gray = torch.rand(n, device=device, generator=generator) < grayscale_p
    return torch.where(gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)


class Normalize:
    """uint8 (or float in [0, 255]) → float, scaled to [0, 1] and standardised per
    channel (one fused affine)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, -1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.scale.device != images.device:
            self.scale, self.shift = self.scale.to(images.device), self.shift.to(images.device)
        return torch.addcmul(self.shift, images.float(), self.scale)
