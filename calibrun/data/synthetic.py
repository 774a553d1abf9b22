"""Synthetic images: class-coloured stripes plus noise, generated in memory from a seed."""

from __future__ import annotations

import torch

from calibrun import UserError
from calibrun.data.base import CropFlipDataset
from calibrun.data.splits import Split


class Synthetic(CropFlipDataset):
    """A tiny, learnable, offline dataset for tests and smoke runs.

    Each class is a base colour plus horizontal stripes of a class-specific frequency,
    with Gaussian pixel noise; a fraction ``label_noise`` of labels is redrawn at random
    so that no model reaches 100% and calibration has something to measure.
    """

    crop_pad = 2

    def __init__(
        self,
        num_classes: int = 4,
        image_size: int = 16,
        train_size: int = 512,
        val_size: int = 256,
        test_size: int = 256,
        noise: float = 0.35,
        label_noise: float = 0.1,
        split_seed: int = 0,
    ) -> None:
        if num_classes < 2:
            raise UserError(f"data.num_classes must be at least 2, got {num_classes}.")
        too_small = {key: value for key, value in (("train_size", train_size), ("val_size", val_size),
                                                   ("test_size", test_size)) if value < 1}
        if too_small:
            key, value = next(iter(too_small.items()))
            raise UserError(f"data.{key} must be at least 1, got {value}.")
        if image_size < 4:
            raise UserError(f"data.image_size must be at least 4 pixels, got {image_size}.")
        self.num_classes, self.image_size, self.noise, self.label_noise = num_classes, image_size, noise, label_noise
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.split_seed = split_seed

    def splits(self) -> dict[str, Split]:
        """The same images and labels for the same ``split_seed``, generated in memory."""
        g = torch.Generator().manual_seed(self.split_seed)
        k, s = self.num_classes, self.image_size
        colours = 0.25 + 0.5 * torch.rand(k, 3, 1, 1, generator=g)
        rows = torch.arange(s, dtype=torch.float32).view(1, 1, s, 1)
        freq = torch.arange(1, k + 1, dtype=torch.float32).view(k, 1, 1, 1) * torch.pi / s
        prototypes = colours + 0.2 * torch.sin(freq * rows)
        out = {}
        for split, n in self.sizes.items():
            labels = torch.arange(n) % k
            pixels = prototypes[labels] + self.noise * torch.randn(n, 3, s, s, generator=g)
            images = (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
            flip = torch.rand(n, generator=g) < self.label_noise
            labels = torch.where(flip, torch.randint(0, k, (n,), generator=g), labels)
            out[split] = Split(images, labels, torch.arange(n))
        return out
