"""Image files to uint8 tensors: listing class folders, decoding, and the decode cache
that lets later runs load one tensor file instead of decoding every image again."""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from calibrun import UserError
from calibrun._io import atomic_torch_save

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}

# (image file, class index) pairs, the unit every loader hands to the decoder.
LabelledFiles = list[tuple[Path, int]]


def default_cache_dir(root: Path, cache_dir: str | None) -> Path:
    """Where a dataset under ``root`` keeps its decode cache: ``cache_dir`` if set, else
    ``root/.calibrun_cache``."""
    return Path(cache_dir) if cache_dir else root / ".calibrun_cache"


def list_images(folder: Path, classes: Sequence[str], unknown_classes: str) -> LabelledFiles:
    """The image files of ``folder/<class>/*``, labelled by the class's position in
    ``classes``, sorted by class then file name. A class without a sub-folder has no
    images; a sub-folder that is not in ``classes`` is an error, its message saying
    ``folder has class folders <unknown_classes>: [...]``."""
    unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in classes)
    if unknown:
        raise UserError(f"{folder.resolve()} has class folders {unknown_classes}: {unknown}.")
    return [
        (path, label)
        for label, cls in enumerate(classes)
        if (folder / cls).is_dir()
        for path in sorted((folder / cls).iterdir())
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


def decode_all(files: LabelledFiles, desc: str, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N×3×H×W, labels int64 N) of ``files``, which must share one size
    (after resizing to ``size``); ``desc`` labels the progress bar and errors."""
    if not files:
        raise UserError(f"No images to decode ({desc}).")
    arrays = (decode_image(path, size) for path, _ in files)
    images = fill_images(arrays, len(files), desc, lambda i: str(files[i][0]))
    return images, torch.tensor([label for _, label in files], dtype=torch.long)


def fill_images(arrays: Iterable[np.ndarray], n: int, desc: str, name: Callable[[int], str]) -> torch.Tensor:
    """The ``n`` decoded H×W×3 ``arrays`` as one uint8 N×3×H×W tensor, with a progress bar
    labelled ``desc``; ``name(i)`` names image i when the sizes disagree."""
    # Filled in place rather than stacked, so a large set (PACS: 1.5 GB) is held once.
    images: torch.Tensor | None = None
    for i, array in enumerate(tqdm(arrays, total=n, desc=desc, unit="img", leave=False, disable=None)):
        if images is None:
            images = torch.empty((n, 3, *array.shape[:2]), dtype=torch.uint8)
        elif array.shape[:2] != images.shape[2:]:
            raise UserError(f"Images must all have one size: {name(0)} is {tuple(images.shape[2:])}, "
                            f"{name(i)} is {array.shape[:2]}.")
        images[i] = torch.from_numpy(array).permute(2, 0, 1)
    assert images is not None, f"no images ({desc})"  # both callers refuse an empty set first
    return images


def cache_file_name(files: dict[str, LabelledFiles], size: int | None, prefix: str) -> str:
    """``<prefix>-<hash>.pt``, the hash covering ``size`` and each file's split, path,
    label, byte size and modification time, so editing the folder invalidates the cache.

    Existing caches stay valid only while this stays byte for byte the same.
    """
    digest = hashlib.sha1()
    # Added only when set, so that caches written before ``size`` existed stay valid.
    if size is not None:
        digest.update(f"size={size}\n".encode())
    for split, entries in files.items():
        for path, label in entries:
            st = path.stat()
            digest.update(f"{split}|{path.resolve()}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"{prefix}-{digest.hexdigest()[:16]}.pt"


def cached_decode(
    files: dict[str, LabelledFiles], cache_dir: Path, size: int | None = None, prefix: str = "folder"
) -> tuple[torch.Tensor, ...]:
    """Decode every image once (resized to size×size if given); later runs load one
    tensor file. Returns (images, labels) for each entry of ``files``, in order.
    """

    def decode() -> tuple[torch.Tensor, ...]:
        return tuple(t for split, entries in files.items() for t in decode_all(entries, f"decode {split}", size))

    return cached_tensors(cache_dir / cache_file_name(files, size, prefix), len(files), decode)


def cached_tensors(cache_file: Path, n_parts: int,
                   decode: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """``decode()``'s ``n_parts`` (images, labels) pairs, read from ``cache_file`` when it
    holds them, else decoded and saved there for the next run.

    Runs sharing the file serialise on a file lock; a cache folder that cannot be
    written only costs the cache, never the run.
    """
    cache_dir = cache_file.parent
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cache_file) + ".lock")
        lock.acquire()
    except OSError as err:
        log.warning("Decode cache %s is not writable (%s); decoding without a cache.", cache_dir, err)
        return decode()
    try:
        if cache_file.exists():
            cached = _read_cache(cache_file, n_parts)
            if cached is not None:
                return cached
        tensors = decode()
        atomic_torch_save(list(tensors), cache_file)
        log.info("Decoded %d images into %s", sum(len(labels) for labels in tensors[1::2]), cache_file)
        return tensors
    finally:
        lock.release()


def _read_cache(cache_file: Path, n_parts: int) -> tuple[torch.Tensor, ...] | None:
    """The (images, labels) pairs in ``cache_file``, or None after a warning if the file is
    damaged or holds something else: the caller then rebuilds it."""
    try:
        cached = torch.load(cache_file, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as err:
        log.warning("Decode cache %s is unreadable (%s); rebuilding it.", cache_file, str(err).splitlines()[0])
        return None
    pairs = list(cached) if isinstance(cached, (list, tuple)) else []
    valid = len(pairs) == 2 * n_parts and all(
        isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor) and images.dtype == torch.uint8
        and images.ndim == 4 and labels.ndim == 1 and len(images) == len(labels)
        for images, labels in zip(pairs[::2], pairs[1::2]))
    if not valid:
        log.warning("Decode cache %s does not hold the decoded images it should; rebuilding it.", cache_file)
        return None
    return tuple(pairs)
