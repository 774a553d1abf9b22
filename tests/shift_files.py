"""Small files in the official layouts, made by the tests from the bundled CIFAR-10 sample:
a CIFAR-10-C-style release and an SVHN test .mat."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
from conftest import CIFAR_SAMPLE
from scipy.io import savemat

from calibrun.data.decode import decode_image


def sample_test_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` test images of the bundled sample in class-folder order, N×32×32×3, and labels."""
    classes = sorted(p.name for p in (CIFAR_SAMPLE / "test").iterdir() if p.is_dir())
    files = [(f, k) for k, c in enumerate(classes) for f in sorted((CIFAR_SAMPLE / "test" / c).iterdir())]
    # Round-robin over the classes, so any n covers every class.
    by_class = [[f for f, k in files if k == c] for c in range(len(classes))]
    chosen = [(by_class[i % len(classes)][i // len(classes)], i % len(classes)) for i in range(n)]
    return np.stack([decode_image(f) for f, _ in chosen]), np.array([k for _, k in chosen], dtype=np.int64)


def corrupt(images: np.ndarray, corruption: str, severity: int) -> np.ndarray:
    """A simple deterministic corruption whose strength grows with ``severity``."""
    x = images.astype(np.float64)
    if corruption == "gaussian_noise":
        x = x + np.random.default_rng(severity).normal(0, 0.04 * severity * 255, x.shape)
    elif corruption == "contrast":
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = mean + (x - mean) * (1 - 0.15 * severity)
    else:  # a fog-like blend toward grey
        x = x * (1 - 0.12 * severity) + 200 * 0.12 * severity
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def write_cifar_c(root: Path, corruptions=("gaussian_noise", "contrast", "fog"), n: int = 100) -> Path:
    """``root/<corruption>.npy`` (5·n × 32 × 32 × 3 uint8, severity blocks in order) and
    ``root/labels.npy`` (the n labels repeated 5 times), as the releases lay them out."""
    root.mkdir(parents=True, exist_ok=True)
    images, labels = sample_test_images(n)
    for corruption in corruptions:
        np.save(root / f"{corruption}.npy", np.concatenate([corrupt(images, corruption, s) for s in range(1, 6)]))
    np.save(root / "labels.npy", np.tile(labels, 5))
    return root


def tar_of(folder: Path, archive: Path) -> Path:
    """``archive``, a tar holding ``folder`` under its own name (as CIFAR-10-C.tar holds CIFAR-10-C/)."""
    with tarfile.open(archive, "w") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def write_svhn_mat(path: Path, n: int = 200) -> Path:
    """A valid ``test_32x32.mat``: X 32×32×3×n uint8, y n×1 in 1..10 (10 = digit 0)."""
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                   "y": (np.arange(n) % 10 + 1).reshape(-1, 1).astype(np.uint8)})
    return path
