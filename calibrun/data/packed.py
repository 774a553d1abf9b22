"""An image-folder dataset packed into one file: the encoded image bytes, their labels and
splits, so that a full dataset (CIFAR-10's 60,000 JPEGs: 53 MB) travels as one file and is
decoded where it is used (``data.format=packed``).

The file is an uncompressed ``.npz`` of plain arrays (read without pickle):

- ``encoded``: uint8, every image file's bytes one after the other, unchanged;
- ``offsets``: int64 (N + 1,), image i is ``encoded[offsets[i]:offsets[i + 1]]``;
- ``labels``: int64 (N,), the class index; ``splits``: uint8 (N,), 0 train, 1 test;
- ``classes``: the class names, sorted, as in ``data.format=folder``.

Pack a folder laid out as ``root/train/<class>/*`` and ``root/test/<class>/*`` with
``calibrun-pack ROOT OUT.npz``.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from calibrun import UserError
from calibrun._io import atomic_open
from calibrun.data.decode import cached_tensors, fill_images, list_images

SPLITS = ("train", "test")
ARRAYS = ("encoded", "offsets", "labels", "splits", "classes")


def pack_folder(root: Path, out: Path) -> dict[str, int]:
    """Write ``out`` (see the module docstring) from the folder ``root``; returns the
    number of images per split. The image bytes are copied as they are, not re-encoded."""
    train_dir = root / "train"
    if not train_dir.is_dir() or not (root / "test").is_dir():
        raise UserError(f"{root.resolve()} must hold train/<class>/* and test/<class>/* to be packed.")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    files = [(path, label, index) for index, split in enumerate(SPLITS)
             for path, label in list_images(root / split, classes, unknown_classes="not in the training set")]
    blobs = [path.read_bytes() for path, _, _ in tqdm(files, desc="pack", unit="img", leave=False, disable=None)]
    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    splits = np.array([index for _, _, index in files], dtype=np.uint8)
    with atomic_open(out, "wb") as handle:
        np.savez(handle, encoded=np.frombuffer(b"".join(blobs), dtype=np.uint8), offsets=offsets,
                 labels=np.array([label for _, label, _ in files], dtype=np.int64), splits=splits,
                 classes=np.array(classes))
    return {split: int((splits == i).sum()) for i, split in enumerate(SPLITS)}


def read_packed(path: Path, names: tuple[str, ...] = ARRAYS) -> dict[str, np.ndarray]:
    """The arrays ``names`` of a packed file (all checked to be there, lengths checked when
    read); a one-line UserError for anything else."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in ARRAYS if name not in npz.files]
            arrays = {name: npz[name] for name in names if name in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserError(f"Cannot read packed dataset {path}: {str(err).splitlines()[0]}. Make it with "
                        "calibrun-pack ROOT OUT.npz.") from None
    n = len(arrays.get("labels", []))
    if missing or ("offsets" in arrays and (len(arrays["offsets"]) != n + 1 or len(arrays["splits"]) != n)):
        problem = "lacks " + ", ".join(missing) if missing else "its arrays disagree in length"
        raise UserError(f"{path} is not a packed dataset ({problem}); make it with calibrun-pack ROOT OUT.npz.")
    return arrays


def decode_packed(arrays: dict[str, np.ndarray], path: Path) -> tuple[torch.Tensor, ...]:
    """(train images, train labels, test images, test labels), images uint8 N×3×H×W."""
    out = []
    for index, split in enumerate(SPLITS):
        chosen = np.flatnonzero(arrays["splits"] == index)
        if not len(chosen):
            raise UserError(f"{path} holds no {split} images.")
        decoded = (_decode_bytes(arrays["encoded"][arrays["offsets"][i]:arrays["offsets"][i + 1]], path, i)
                   for i in chosen)
        images = fill_images(decoded, len(chosen), f"decode {split}", lambda row: f"image {chosen[row]} of {path}")
        out += [images, torch.from_numpy(arrays["labels"][chosen].copy())]
    return tuple(out)


def _decode_bytes(encoded: np.ndarray, path: Path, index: int | np.integer) -> np.ndarray:
    """One encoded image to uint8 H×W×3, naming the pack and the image if it is unreadable."""
    try:
        with Image.open(io.BytesIO(encoded.tobytes())) as img:
            return np.array(img.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise UserError(f"Cannot decode image {index} of {path}: {err}") from None


def load_packed(path: Path, cache_dir: Path, num_classes: int) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """(class names, decoded splits) of a packed file, decoded once into ``cache_dir``: the
    cache is named by the pack's path, size and modification time."""
    if not path.is_file():
        raise UserError(f"data.format=packed expects data.root to be a packed file (.npz); {path.resolve()} "
                        "is not a file. Make one with calibrun-pack ROOT OUT.npz.")
    classes = [str(c) for c in read_packed(path, ("classes",))["classes"]]
    if len(classes) != num_classes:
        raise UserError(f"{path} holds {len(classes)} classes but data.num_classes={num_classes}.")
    st = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache_file = cache_dir / f"packed-{digest}.pt"
    # The image bytes are read only when the cache must be built.
    return classes, cached_tensors(cache_file, len(SPLITS), lambda: decode_packed(read_packed(path), path))

