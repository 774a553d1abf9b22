"""Datasets as uint8 tensors, their splits, the decode cache, and the device loader.

Every dataset returns ``{"train", "val", "test"}`` :class:`Split` objects holding the
whole split as one uint8 N×3×H×W tensor. :class:`DeviceLoader` moves a split to the
training device once and cuts, shuffles and augments batches there with batched tensor
ops (no DataLoader workers, no per-image Python), in the spirit of airbench.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tarfile
import urllib.error
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import ClassVar

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
    position in the source set it came from (CIFAR: the training or the test set; PACS:
    the whole dataset, so indices of different splits never collide)."""

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
    for split, size in (("train", train_subset), ("test", test_subset)):
        splits[split] = subset(splits[split], size, split_seed, f"data.{split}_subset")
    return splits


def subset(split: Split, size: int | None, seed: int, what: str) -> Split:
    """A stratified subset of ``size`` images; the whole split when it is no larger."""
    if size is None or size >= len(split):
        if size is not None and size > len(split):
            log.warning("%s=%d is more than the %d images there are; using all of them.", what, size, len(split))
        return split
    _, chosen = stratified_indices(split.labels.numpy(), size, seed, what)
    return split.take(chosen)


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


# JiGen's recipe for PACS, batched: every sample draws its own crop box, flip, jitter
# factors and grayscale coin from one generator, and the whole batch is transformed by a
# handful of tensor ops (an affine grid, a few blends, one HSV round trip). Constants are
# Python scalars or made on the device: a small tensor copied from pageable host memory
# would make the host wait for the GPU on every batch.

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
    boxes = random_crop_boxes(n, images.shape[-2:], scale, ratio, generator, device)
    flip = torch.rand(n, device=device, generator=generator) < flip_p
    x = resized_crop(images, boxes, flip, size)
    ranges = [(max(0.0, 1 - j), 1 + j) for j in jitter[:3]] + [(-jitter[3], jitter[3])]
    u = torch.rand(n, 4, device=device, generator=generator).unbind(1)
    x = color_jitter(x, *(lo + (hi - lo) * ui for (lo, hi), ui in zip(ranges, u)))
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


def decode_image(path: Path, size: int | None = None) -> np.ndarray:
    """Decode one image file to uint8 H×W×3 (resized to size×size if ``size`` is given,
    bilinear with PIL's antialiasing), naming the file if it is unreadable."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if size is not None and rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            # A copy: PIL's array view is read-only, and torch wants writable memory.
            return np.array(rgb, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise UserError(f"Cannot read image {path.resolve()}: {err}") from None


def _decode_all(files: list[tuple[Path, int]], desc: str, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if not files:
        raise UserError(f"No images to decode ({desc}).")
    # Filled in place rather than stacked, so a large set (PACS: 1.5 GB) is held once.
    images: torch.Tensor | None = None
    for i, (path, _) in enumerate(tqdm(files, desc=desc, unit="img", leave=False, disable=None)):
        array = decode_image(path, size)
        if images is None:
            images = torch.empty((len(files), 3, *array.shape[:2]), dtype=torch.uint8)
        elif array.shape[:2] != images.shape[2:]:
            raise UserError(
                f"Images must all have one size: {files[0][0]} is {tuple(images.shape[2:])}, "
                f"{path} is {array.shape[:2]}."
            )
        images[i] = torch.from_numpy(array).permute(2, 0, 1)
    return images, torch.tensor([label for _, label in files], dtype=torch.long)


def _cached_decode(
    files: dict[str, list[tuple[Path, int]]], cache_dir: Path, size: int | None = None, prefix: str = "folder"
) -> tuple[torch.Tensor, ...]:
    """Decode every image once (resized to size×size if given); later runs load one
    tensor file. Returns (images, labels) for each entry of ``files``, in order.

    The cache key covers each file's path, size and modification time, so editing the
    folder invalidates it. Runs sharing the folder serialise on a file lock.
    """
    digest = hashlib.sha1()
    # Added only when set, so that caches written before ``size`` existed stay valid.
    if size is not None:
        digest.update(f"size={size}\n".encode())
    for split, entries in files.items():
        for path, label in entries:
            st = path.stat()
            digest.update(f"{split}|{path.resolve()}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache_file = cache_dir / f"{prefix}-{digest.hexdigest()[:16]}.pt"

    def decode() -> tuple[torch.Tensor, ...]:
        return tuple(t for split, entries in files.items() for t in _decode_all(entries, f"decode {split}", size))

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
        log.info("Decoded %d images into %s", sum(len(labels) for labels in tensors[1::2]), cache_file)
        return tensors
    finally:
        lock.release()


# --------------------------------------------------------------------------- PACS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _drive(file_id: str) -> str:
    # The /file/d/ form is the one torchvision's download_url hands to gdown, which
    # gets past Google Drive's confirmation page for large files.
    return f"https://drive.google.com/file/d/{file_id}"


class PACS:
    """PACS leave-one-domain-out: train on three domains, test on the held-out ``target``.

    Reads the official layout, ``root/kfold/<domain>/<class>/<image>`` and
    ``root/<domain>_{train,crossval,test}_kfold.txt`` (lines ``<domain>/<class>/<image>
    <label 1-7>``). ``split="official"``: train and val are the source domains' train and
    crossval files; ``split="random"``: a hold-out of ``val_fraction`` of the source
    images drawn with ``split_seed`` (stratified by domain and class when possible). Test
    is every image of the target domain. A domain's images are those of its test file, or
    with ``split="random"`` and no such file, those found under ``kfold/<domain>``.

    Images are decoded once, resized to ``store_size`` = round(image_size·227/222) (the
    native 227 for the default 222), into one uint8 cache of the whole dataset; indices of
    all splits are positions in that sorted dataset. Training batches get JiGen's
    augmentation on the device; evaluation resizes to ``image_size``.

    References: Li et al. 2017, "Deeper, Broader and Artier Domain Generalization" (ICCV);
    Carlucci et al. 2019, "Domain Generalization by Solving Jigsaw Puzzles" (CVPR).
    """

    domains = ("art_painting", "cartoon", "photo", "sketch")
    classes = ("dog", "elephant", "giraffe", "guitar", "horse", "house", "person")
    mean = IMAGENET_MEAN
    std = IMAGENET_STD
    # JiGen's PACS settings (run_PACS_photo.sh): --min_scale 0.8 --max_scale 1.0
    # --random_horiz_flip 0.5 --jitter 0.4 (hue = min(0.5, jitter)) --tile_random_grayscale
    # 0.1. JiGen greys each jigsaw tile; without the jigsaw task the whole image is greyed.
    crop_scale = (0.8, 1.0)
    crop_ratio = (3 / 4, 4 / 3)
    flip_p = 0.5
    jitter = (0.4, 0.4, 0.4, 0.4)  # brightness, contrast, saturation, hue
    grayscale_p = 0.1

    # The images as DomainBed fetches them (a zip holding kfold/), and the official split
    # files from the authors' Google Drive folder. Class attributes, so tests can patch them.
    official_folder = "https://drive.google.com/drive/folders/0B6x7gtvErXgfUU1WcGY5SzdwZVk"
    archive_url = _drive("1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd")
    archive_name = "PACS.zip"
    split_urls: ClassVar[dict[str, str]] = {
        "art_painting_train_kfold.txt": _drive("1cSo_5_cQLKoURsWwsKqFmw9neWFvDIeV"),
        "art_painting_crossval_kfold.txt": _drive("1g7haGuvxmZA1SxPyGFZneDVi9wOm3nK4"),
        "art_painting_test_kfold.txt": _drive("1KVe_S73jECKG9MsIujF-yqZAjPrf0y_O"),
        "cartoon_train_kfold.txt": _drive("1EhlIyRoeZ5UPiUJs_UXGH-Ql1PS5qtYW"),
        "cartoon_crossval_kfold.txt": _drive("1suUUrxyPOmN_dAVdhVSaG-NZDMOsl8JR"),
        "cartoon_test_kfold.txt": _drive("14fpMKzcherr1onzp8jcyhmjJMjZSZ72h"),
        "photo_train_kfold.txt": _drive("1RyCVv67zVITU4JYYr1XxLnG5q165yu8s"),
        "photo_crossval_kfold.txt": _drive("1lXtOcPL-yWli_MuDZ0mQwLfq0XbzDu--"),
        "photo_test_kfold.txt": _drive("1opW_IbwDQQmuylquX5UvRFxbj3muP5sz"),
        "sketch_train_kfold.txt": _drive("13rWm64rW_dcdcyTFugu4fJcSCTkCB8YA"),
        "sketch_crossval_kfold.txt": _drive("1Rs0dUTduQ320bXwHBLQT1s82gyr92J9J"),
        "sketch_test_kfold.txt": _drive("1dFnnsWxYHvdCXmWdhPVwuJ8zgkb_wtbQ"),
    }

    def __init__(
        self,
        target: str = "sketch",
        num_classes: int = 7,
        root: str = "data/PACS",
        split: str = "official",
        val_fraction: float = 0.1,
        split_seed: int = 0,
        image_size: int = 222,
        download: bool = False,
        cache_dir: str | None = None,
        train_subset: int | None = None,
        test_subset: int | None = None,
    ) -> None:
        if target not in self.domains:
            raise UserError(f"data.target={target!r} is not a PACS domain; allowed: {', '.join(self.domains)}.")
        if split not in ("official", "random"):
            raise UserError(f"data.split={split!r} is not supported; allowed: official, random.")
        if num_classes != len(self.classes):
            raise UserError(f"data.num_classes={num_classes} but PACS has {len(self.classes)} classes.")
        if not 0 < val_fraction < 1:
            raise UserError(f"data.val_fraction must be between 0 and 1, got {val_fraction}.")
        if image_size < 8:
            raise UserError(f"data.image_size must be at least 8, got {image_size}.")
        self.target, self.num_classes, self.root, self.split = target, num_classes, Path(root), split
        self.val_fraction, self.split_seed, self.download = val_fraction, split_seed, download
        self.image_size = image_size
        self.train_subset, self.test_subset = train_subset, test_subset
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / ".calibrun_cache"
        self.sources = tuple(d for d in self.domains if d != target)
        # JiGen crops 222 out of PACS's native 227; the same ratio at other sizes.
        self.store_size = round(image_size * 227 / 222)

    # ------------------------------------------------------------------ splits

    def splits(self) -> dict[str, Split]:
        self._ensure_data()
        if self.split == "official":
            parts = {
                "train": [e for d in self.sources for e in self._read_split_file(d, "train")],
                "val": [e for d in self.sources for e in self._read_split_file(d, "crossval")],
                "test": self._read_split_file(self.target, "test"),
            }
        else:
            parts = {
                "sources": [e for d in self.sources for e in self._domain_images(d)],
                "test": self._domain_images(self.target),
            }
        if self.split == "official":
            both = sorted({p for p, _, _ in parts["train"]} & {p for p, _, _ in parts["val"]})
            if both:
                raise UserError(
                    f"{len(both)} image(s) are in both a train and a crossval split file under {self.root.resolve()}, "
                    f"e.g. {both[0]}; the official files never overlap."
                )
        label_of = self._labels(parts)
        paths = sorted(label_of)
        position = {p: i for i, p in enumerate(paths)}
        images, labels = _cached_decode(
            {"pacs": [(self.kfold / p, label_of[p]) for p in paths]}, self.cache_dir, self.store_size, prefix="pacs"
        )
        dataset = Split(images, labels, torch.arange(len(paths)))

        def take(entries: list[tuple[str, int, str]]) -> Split:
            return dataset.take(np.unique([position[p] for p, _, _ in entries]))

        if self.split == "official":
            splits = {name: take(entries) for name, entries in parts.items()}
        else:
            sources = take(parts["sources"])
            rest, val = self._random_holdout(sources, paths)
            splits = {"train": sources.take(rest), "val": sources.take(val), "test": take(parts["test"])}
        for name, size in (("train", self.train_subset), ("test", self.test_subset)):
            splits[name] = subset(splits[name], size, self.split_seed, f"data.{name}_subset")
        empty = [name for name, split in splits.items() if len(split) == 0]
        if empty:
            raise UserError(f"PACS under {self.root.resolve()} gives no images for the {' and '.join(empty)} split.")
        return splits

    def _random_holdout(self, sources: Split, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """A seeded hold-out of ``val_fraction`` of the source images, stratified by
        (domain, class) if every stratum allows it, else by class, else not at all."""
        n = len(sources)
        size = round(self.val_fraction * n)
        if not 0 < size < n:
            raise UserError(f"data.val_fraction={self.val_fraction} leaves no train or no val image of {n} sources.")
        labels = sources.labels.numpy()
        domain = np.array([self.domains.index(paths[i].split("/")[0]) for i in sources.index.tolist()])
        for strata in (domain * len(self.classes) + labels, labels):
            try:
                rest, val = train_test_split(np.arange(n), test_size=size, stratify=strata,
                                             random_state=self.split_seed)
                break
            except ValueError:  # a stratum too small for this hold-out
                continue
        else:
            rest, val = train_test_split(np.arange(n), test_size=size, random_state=self.split_seed)
        return np.sort(rest), np.sort(val)

    def _labels(self, parts: dict[str, list[tuple[str, int, str]]]) -> dict[str, int]:
        """Each image's class index; an image listed with two labels is an error."""
        seen: dict[str, tuple[int, str]] = {}
        for entries in parts.values():
            for path, label, where in entries:
                first, first_where = seen.setdefault(path, (label, where))
                if first != label:
                    raise UserError(f"{path} has label {label + 1} at {where} but {first + 1} at {first_where}.")
        return {path: label for path, (label, _) in seen.items()}

    def _read_split_file(self, domain: str, part: str) -> list[tuple[str, int, str]]:
        """(relative path, class index, "file:line") for each line of ``<domain>_<part>_kfold.txt``."""
        name = f"{domain}_{part}_kfold.txt"
        path = self.root / name
        if not path.is_file():
            raise UserError(
                f"PACS split file {path.resolve()} is missing (data.split={self.split} needs it). Get it with "
                f"data.download=true (from {self.split_urls.get(name, self.official_folder)}) or from the official "
                f"PACS folder {self.official_folder}; or use data.split=random, which needs only {self.kfold}."
            )
        entries, mismatched = [], 0
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path.resolve()}:{lineno}"
            fields = line.split()
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
                raise UserError(f"{where}: expected '<domain>/<class>/<image> <label>', got {line.strip()!r}.")
            rel, label = fields[0], int(fields[1])
            if not 1 <= label <= len(self.classes):
                raise UserError(f"{where}: label {label} is outside 1-{len(self.classes)} ({', '.join(self.classes)}).")
            if rel.split("/")[0] != domain:
                raise UserError(f"{where}: {rel} is not in the {domain} domain this file lists.")
            if not (self.kfold / rel).is_file():
                raise UserError(f"{where} names {rel}, but {self.kfold / rel} does not exist.")
            mismatched += rel.split("/")[1] != self.classes[label - 1]
            entries.append((rel, label - 1, where))
        if mismatched:
            # The label is what counts; a class folder that disagrees hints at a shifted file.
            log.warning("%s: %d line(s) have a label that differs from their class folder.", path, mismatched)
        return entries

    def _domain_images(self, domain: str) -> list[tuple[str, int, str]]:
        """Every image of a domain: its test file, or (no such file) the class folders."""
        name = f"{domain}_test_kfold.txt"
        if (self.root / name).is_file():
            return self._read_split_file(domain, "test")
        folder = self.kfold / domain
        if not folder.is_dir():
            raise UserError(f"PACS domain folder {folder.resolve()} is missing, as is {self.root.resolve() / name}.")
        unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in self.classes)
        if unknown:
            raise UserError(f"{folder.resolve()} has class folders that are not PACS classes: {unknown}.")
        return [
            (f"{domain}/{cls}/{p.name}", label, str(p.resolve()))
            for label, cls in enumerate(self.classes)
            if (folder / cls).is_dir()
            for p in sorted((folder / cls).iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]

    # ------------------------------------------------------------------ data on disk

    @property
    def kfold(self) -> Path:
        return self.root / "kfold"

    def _ensure_data(self) -> None:
        if self.download:
            self._download()
        elif not self.kfold.is_dir():
            raise UserError(self._missing_message("data.download=false"))

    def _download(self) -> None:
        """Fetch whatever is missing of the images and the split files, under a lock."""
        from torchvision.datasets.utils import download_and_extract_archive, download_url

        url = self.archive_url
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.root / ".pacs.lock")):
                if not self.kfold.is_dir():
                    download_and_extract_archive(url, str(self.root), filename=self.archive_name, remove_finished=True)
                for name, url in self.split_urls.items():
                    if not (self.root / name).is_file():
                        download_url(url, str(self.root), filename=name)
        except (RuntimeError, OSError, urllib.error.URLError, zipfile.BadZipFile, tarfile.TarError) as err:
            raise UserError(self._missing_message(f"the download of {url} failed ({err})")) from None
        if not self.kfold.is_dir():
            raise UserError(
                f"{self.archive_url} was extracted into {self.root.resolve()} but no {self.kfold.resolve()} appeared; "
                f"{self._missing_message('the archive has another layout')}"
            )

    def _missing_message(self, reason: str) -> str:
        root = self.root.resolve()
        leftover = root / self.archive_name
        stale = (
            f" A {leftover} left by an interrupted download is reused, not fetched again: delete it if incomplete."
            if leftover.exists() else ""
        )
        split_files = ", ".join(f"{name}: {url}" for name, url in self.split_urls.items())
        return (
            f"PACS was not found in {root} and {reason}. calibrun reads the official layout: the images in "
            f"{root}/kfold/<domain>/<class>/<image> (domains {', '.join(self.domains)}) and the split files "
            f"{root}/<domain>_{{train,crossval,test}}_kfold.txt (lines '<domain>/<class>/<image> <label 1-7>'). "
            f"Either run with network access and data.download=true, which fetches the images from "
            f"{self.archive_url} (a zip holding kfold/; Google Drive downloads need the gdown package) and the "
            f"split files ({split_files}); or download them yourself (all are in the "
            f"official PACS folder {self.official_folder}) and put them there; or point data.root (or the "
            f"CALIBRUN_DATA environment variable, read as $CALIBRUN_DATA/PACS) at a folder that already holds "
            f"them. With the image folders alone, data.split=random needs no split files.{stale}"
        )

    # ------------------------------------------------------------------ transforms

    def train_transform(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = jigen_augment(images, self.image_size, generator, self.crop_scale, self.crop_ratio, self.flip_p,
                          self.jitter, self.grayscale_p)
        return self._normalize(x)

    def eval_transform(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        size = (self.image_size, self.image_size)
        resized = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        return self._normalize(resized)

    @cached_property
    def _normalize(self) -> Normalize:
        return Normalize(self.mean, self.std)


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
