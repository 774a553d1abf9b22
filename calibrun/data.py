"""Datasets as uint8 tensors, their splits, the decode cache, and the device loader.

Every dataset returns ``{"train", "val", "test"}`` :class:`Split` objects holding the
whole split as one uint8 N×3×H×W tensor. :class:`DeviceLoader` moves a split to the
training device once and cuts, shuffles and augments batches there with batched tensor
ops (no DataLoader workers, no per-image Python), in the spirit of airbench.
"""

from __future__ import annotations

import hashlib
import logging
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from calibrun import UserError
from calibrun._io import atomic_torch_save

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclass
class Split:
    """One split: images (uint8 N×3×H×W), labels (int64 N) and ``index``, each image's
    position in the source set it came from (the training or the test set)."""

    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, positions: np.ndarray) -> Split:
        pos = torch.as_tensor(positions, dtype=torch.long)
        return Split(self.images[pos], self.labels[pos], self.index[pos])


Transform = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


def stratified_indices(labels: np.ndarray, size: int, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into (rest, chosen) with ``size`` chosen, stratified by
    label. Both halves are sorted so that the order never depends on the shuffle."""
    n = len(labels)
    if not 0 < size < n:
        raise UserError(f"{what}={size} must be between 1 and {n - 1} (the split has {n} images).")
    try:
        rest, chosen = train_test_split(np.arange(n), test_size=size, stratify=labels, random_state=seed)
    except ValueError as err:
        raise UserError(f"{what}={size}: cannot draw a stratified subset ({err}).") from None
    return np.sort(rest), np.sort(chosen)


def resolve_val_size(val_size: float, n_train: int) -> int:
    """``val_size`` ≥ 1 is a count of images, below 1 a fraction of the training set.

    A count that would leave less than half of a small training set (an image-folder
    subset, say) for training is reduced to 10% of it, with a warning.
    """
    if val_size <= 0:
        raise UserError(f"data.val_size must be positive, got {val_size}.")
    size = round(val_size * n_train) if val_size < 1 else int(val_size)
    if size > n_train // 2:
        reduced = max(1, round(0.1 * n_train))
        log.warning(
            "data.val_size=%s would leave %d of %d training images; using %d (10%%) for validation instead.",
            val_size, n_train - size, n_train, reduced,
        )
        size = reduced
    return size


def make_splits(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    val_size: float,
    split_seed: int,
    train_subset: int | None = None,
    test_subset: int | None = None,
) -> dict[str, Split]:
    """Stratified val hold-out from the training set, then optional stratified subsets.

    The hold-out depends on ``split_seed`` only, so it is the same for every training
    seed, and it is drawn before ``train_subset`` so that a subset never changes it.
    """
    train = Split(train_x, train_y, torch.arange(len(train_y)))
    test = Split(test_x, test_y, torch.arange(len(test_y)))
    rest, val = stratified_indices(train_y.numpy(), resolve_val_size(val_size, len(train_y)), split_seed, "data.val_size")
    splits = {"train": train.take(rest), "val": train.take(val), "test": test}
    if train_subset is not None:
        _, chosen = stratified_indices(splits["train"].labels.numpy(), train_subset, split_seed, "data.train_subset")
        splits["train"] = splits["train"].take(chosen)
    if test_subset is not None:
        _, chosen = stratified_indices(test_y.numpy(), test_subset, split_seed, "data.test_subset")
        splits["test"] = test.take(chosen)
    return splits


# --------------------------------------------------------------------------- augmentation


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


class Normalize:
    """uint8 → float, scaled to [0, 1] and standardised per channel (one fused affine)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, -1, 1, 1)
        self.shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.scale.device != images.device:
            self.scale, self.shift = self.scale.to(images.device), self.shift.to(images.device)
        return torch.addcmul(self.shift, images.float(), self.scale)


class CropFlipData:
    """Base for small-image datasets trained with pad-and-crop plus flip."""

    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    crop_pad: int = 4
    num_classes: int

    def splits(self) -> dict[str, Split]:
        raise NotImplementedError

    def train_transform(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self._normalize(random_crop_flip(images, self.crop_pad, generator))

    def eval_transform(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self._normalize(images)

    @cached_property
    def _normalize(self) -> Normalize:
        return Normalize(self.mean, self.std)


# --------------------------------------------------------------------------- CIFAR


class CIFAR(CropFlipData):
    """CIFAR-10/100 from torchvision's official release, or from an image folder.

    ``format="torchvision"`` reads (and with ``download=True`` fetches, MD5-checked)
    ``cifar-10-batches-py`` / ``cifar-100-python`` under ``root``. ``format="folder"``
    reads ``root/train/<class>/*`` and ``root/test/<class>/*``; its decoded images are
    cached as one uint8 tensor file under ``cache_dir`` (default ``root/.calibrun_cache``).

    References: Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images".
    """

    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)
    crop_pad = 4

    def __init__(
        self,
        name: str = "cifar10",
        num_classes: int = 10,
        root: str = "data",
        format: str = "torchvision",
        download: bool = True,
        val_size: float = 5000,
        split_seed: int = 0,
        train_subset: int | None = None,
        test_subset: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        expected = {"cifar10": 10, "cifar100": 100}
        if name not in expected:
            raise UserError(f"data.name={name!r} is not a CIFAR variant; allowed: cifar10, cifar100.")
        if format not in ("torchvision", "folder"):
            raise UserError(f"data.format={format!r} is not supported; allowed: torchvision, folder.")
        if format == "torchvision" and num_classes != expected[name]:
            raise UserError(f"data.num_classes={num_classes} but {name} has {expected[name]} classes.")
        self.name, self.num_classes, self.root, self.format = name, num_classes, Path(root), format
        self.download, self.val_size, self.split_seed = download, val_size, split_seed
        self.train_subset, self.test_subset = train_subset, test_subset
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / ".calibrun_cache"

    def splits(self) -> dict[str, Split]:
        loaded = self._load_torchvision() if self.format == "torchvision" else self._load_folder()
        return make_splits(*loaded, self.val_size, self.split_seed, self.train_subset, self.test_subset)

    def _load_torchvision(self) -> tuple[torch.Tensor, ...]:
        import torchvision.datasets as tvd

        dataset_cls = tvd.CIFAR10 if self.name == "cifar10" else tvd.CIFAR100
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.root / f".{self.name}.lock")):
                train = dataset_cls(str(self.root), train=True, download=self.download)
                test = dataset_cls(str(self.root), train=False, download=False)
        except (RuntimeError, OSError, urllib.error.URLError) as err:
            raise UserError(self._missing_message(dataset_cls, err)) from None
        # torchvision keeps CIFAR decoded as uint8 N×H×W×C already: a transpose is all
        # the "decoding" there is, so no extra cache file is written.
        return (
            torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(train.targets, dtype=torch.long),
            torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(test.targets, dtype=torch.long),
        )

    def _missing_message(self, dataset_cls: type, err: BaseException) -> str:
        root = self.root.resolve()
        folder = root / dataset_cls.base_folder
        reason = f"the download failed ({err})" if self.download else "data.download=false"
        return (
            f"{self.name.upper()} was not found in {folder} and {reason}. "
            f"Either run with network access and data.download=true, which fetches "
            f"{dataset_cls.url} into {root} and checks its MD5; or download that archive "
            f"yourself, put it in {root} and run once with data.download=true to check and "
            f"extract it (no network needed then); or point data.root (or the CALIBRUN_DATA "
            f"environment variable) at a folder that already holds {dataset_cls.base_folder}. "
            f"Images in class folders work too: data.format=folder with "
            f"data.root/train/<class>/* and data.root/test/<class>/*."
        )

    def _load_folder(self) -> tuple[torch.Tensor, ...]:
        train_dir, test_dir = self.root / "train", self.root / "test"
        for d in (train_dir, test_dir):
            if not d.is_dir():
                raise UserError(
                    f"data.format=folder expects {d.resolve()} with one sub-folder per class "
                    f"(data.root/train/<class>/*, data.root/test/<class>/*)."
                )
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
        if len(classes) != self.num_classes:
            raise UserError(
                f"{train_dir.resolve()} has {len(classes)} class folders but data.num_classes={self.num_classes}."
            )
        files = {split: _list_images(self.root / split, classes) for split in ("train", "test")}
        return _cached_decode(files, self.cache_dir)


def _list_images(split_dir: Path, classes: list[str]) -> list[tuple[Path, int]]:
    unknown = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise UserError(f"{split_dir.resolve()} has class folders not in the training set: {unknown}.")
    return [
        (path, label)
        for label, cls in enumerate(classes)
        if (split_dir / cls).is_dir()
        for path in sorted((split_dir / cls).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]


def decode_image(path: Path) -> np.ndarray:
    """Decode one image file to uint8 H×W×3, naming the file if it is unreadable."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise UserError(f"Cannot read image {path.resolve()}: {err}") from None


def _decode_all(files: list[tuple[Path, int]], desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = [decode_image(p) for p, _ in tqdm(files, desc=desc, unit="img", leave=False, disable=None)]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        odd = next(p for (p, _), a in zip(files, arrays) if a.shape != first)
        raise UserError(f"Images must all have one size: {files[0][0]} is {first[:2]}, {odd} is not.")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor([label for _, label in files], dtype=torch.long)


def _cached_decode(files: dict[str, list[tuple[Path, int]]], cache_dir: Path) -> tuple[torch.Tensor, ...]:
    """Decode every image once; later runs load one tensor file.

    The cache key covers each file's path, size and modification time, so editing the
    folder invalidates it. Runs sharing the folder serialise on a file lock.
    """
    digest = hashlib.sha1()
    for split, entries in files.items():
        for path, label in entries:
            st = path.stat()
            digest.update(f"{split}|{path.resolve()}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache_file = cache_dir / f"folder-{digest.hexdigest()[:16]}.pt"

    def decode() -> tuple[torch.Tensor, ...]:
        return (*_decode_all(files["train"], "decode train"), *_decode_all(files["test"], "decode test"))

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cache_file) + ".lock")
        lock.acquire()
    except OSError as err:
        log.warning("Decode cache %s is not writable (%s); decoding without a cache.", cache_dir, err)
        return decode()
    try:
        if cache_file.exists():
            try:
                return tuple(torch.load(cache_file, weights_only=True))
            except (RuntimeError, OSError, EOFError) as err:
                log.warning("Decode cache %s is unreadable (%s); rebuilding it.", cache_file, err)
        tensors = decode()
        atomic_torch_save(list(tensors), cache_file)
        log.info("Decoded %d images into %s", len(tensors[1]) + len(tensors[3]), cache_file)
        return tensors
    finally:
        lock.release()


# --------------------------------------------------------------------------- synthetic


class Synthetic(CropFlipData):
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
        self.num_classes, self.image_size, self.noise, self.label_noise = num_classes, image_size, noise, label_noise
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.split_seed = split_seed

    def splits(self) -> dict[str, Split]:
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


# --------------------------------------------------------------------------- loader


class DeviceLoader:
    """Batches from a split that lives on the device as uint8.

    Shuffling, cropping, flipping and normalising run on the device in batched ops. The
    shuffle and augmentation draws come from a generator seeded by ``(seed, epoch)``, so a
    resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        transform: Transform,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        self.images = split.images.to(device, non_blocking=True)
        self.labels = split.labels.to(device, non_blocking=True)
        self.batch_size, self.device, self.transform = batch_size, device, transform
        self.shuffle, self.drop_last, self.seed, self.channels_last = shuffle, drop_last, seed, channels_last
        self.generator = torch.Generator(device=device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iterate()

    def iterate(self, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The epoch's batches, without the first ``skip`` (a run resumed mid-epoch).

        Skipped batches are still augmented, so the random draws of the batches that
        follow are those of an uninterrupted epoch.
        """
        n = len(self.labels)
        self.generator.manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, device=self.device, generator=self.generator) if self.shuffle else None
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min(n, (b + 1) * self.batch_size)
            idx = order[lo:hi] if order is not None else slice(lo, hi)
            x = self.transform(self.images[idx], self.generator)
            if b < skip:
                continue
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[idx]
