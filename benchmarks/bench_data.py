"""Data-pipeline benchmark: calibrun's device loader against torchvision's usual one.

Both pipelines serve the same 5,000 training images, as augmented (pad-4 crop + flip)
and normalised float batches of 128 on the device, in the same process run:

- reference: a CIFAR10-style dataset (uint8 array in memory, ``Image.fromarray`` per
  item), PIL ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` + ``ToTensor`` +
  ``Normalize``, ``DataLoader(batch_size=128, shuffle=True, num_workers=2)``;
- calibrun: the uint8 split resident on the device, batched crop/flip/normalise.

Prints images/s for each and the ratio. Run with ``make bench``.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from calibrun.data import CIFAR, DeviceLoader, Split, Synthetic
from calibrun.samples import cache_root, sample_root


class ArrayDataset(Dataset):
    """What torchvision's CIFAR10 does per item: array → PIL image → transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: transforms.Compose) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def load_images(root: str | None, fmt: str, n: int) -> tuple[Split, str]:
    """``n`` CIFAR-10 training images from ``root``; the bundled sample when ``root`` is None."""
    cache_dir = None
    if root is None:
        root, fmt, cache_dir = sample_root("cifar10"), "folder", cache_root("cifar10_sample")
    try:
        splits = CIFAR(root=root, format=fmt, download=False, val_size=0.1, cache_dir=cache_dir).splits()
        # The whole training set: the val hold-out goes back in.
        parts = (splits["train"], splits["val"])
        split = Split(*(torch.cat([getattr(p, f) for p in parts]) for f in ("images", "labels", "index")))
        source = f"CIFAR-10 ({fmt}) from {root}"
    except Exception as err:  # noqa: BLE001 - any failure falls back to synthetic images
        print(f"(no CIFAR-10 under {root}: {str(err)[:120]}...; using synthetic 32x32 images)")
        data = Synthetic(num_classes=10, image_size=32, train_size=n, val_size=10, test_size=10)
        split = data.splits()["train"]
        source = "synthetic 32x32"
    return split.take(np.arange(min(n, len(split)))), source


def time_epochs(batches, epochs: int, device: torch.device) -> float:
    """Images per second over ``epochs`` full passes (worker start-up included, as a
    user pays it every epoch without persistent workers)."""
    seen = 0
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in batches():
            x = x.to(device, non_blocking=True)
            seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="CIFAR-10 folder (default: the sample bundled with calibrun)")
    parser.add_argument("--format", default="torchvision", choices=["torchvision", "folder"])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    split, source = load_images(args.root, args.format, args.images)
    # Both pipelines normalise with CIFAR-10's statistics, whatever the images are.
    ours = CIFAR()
    size = split.images.shape[-1]
    reference = ArrayDataset(
        split.images.permute(0, 2, 3, 1).numpy(),
        split.labels.numpy(),
        transforms.Compose([
            transforms.RandomCrop(size, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(ours.mean, ours.std),
        ]),
    )
    workers = 2
    ref_loader = DataLoader(reference, batch_size=128, shuffle=True, num_workers=workers, drop_last=True)
    loader = DeviceLoader(split, 128, device, ours.train_transform, shuffle=True, drop_last=True)

    def device_batches():
        loader.set_epoch(loader.epoch + 1)
        return iter(loader)

    time_epochs(device_batches, 1, device)  # warm-up: allocator, kernels
    ref = time_epochs(lambda: iter(ref_loader), args.epochs, device)
    dev = time_epochs(device_batches, args.epochs, device)
    print(f"images: {len(split)} x {args.epochs} epochs, {source}, batch 128, device {device}")
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"torchvision DataLoader (PIL, {workers} workers): {ref:10.0f} images/s")
    print(f"calibrun DeviceLoader (on {device}):        {dev:10.0f} images/s")
    print(f"ratio (calibrun / torchvision):             {dev / ref:10.1f}x")


if __name__ == "__main__":
    main()
