"""Corrupted test sets: the official CIFAR-10-C and CIFAR-100-C releases, and folders
that ``calibrun-corrupt`` made in the same layout for any dataset, read memory-mapped one
(corruption, severity) block at a time."""

from __future__ import annotations

import json
import logging
import urllib.error
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, TypedDict, cast

import numpy as np
import torch

from calibrun import UserError
from calibrun.data.splits import Split, stratified_indices

log = logging.getLogger(__name__)

SEVERITIES = (1, 2, 3, 4, 5)
# The 15 corruptions of the benchmark (Hendrycks & Dietterich 2019, Figure 1); the
# releases hold 4 more (speckle_noise, gaussian_blur, spatter, saturate), usable by name.
BENCHMARK = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")


class Release(TypedDict):
    """Where a corrupted release lives and what it holds."""

    folder: str
    num_classes: int
    md5: str
    url: str


class CorruptedImages:
    """``<corruption>.npy`` (uint8, b·n × H × W × 3: b blocks of n images, block k holding
    severity ``block_severities[k]``) and ``labels.npy`` (b·n labels, one block repeated).

    ``sets()`` yields ``(corruption, severity, Split)`` for the chosen corruptions and
    severities; ``Split.index`` is each image's position in the clean test set. ``subset``
    draws a stratified subset of the n images (the same images in every block).
    Subclasses say where the files are (``folder``) and what they hold.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int]
    block_severities: tuple[int, ...] = SEVERITIES
    corruptions: list[str]
    severities: list[int]
    subset: int | None
    subset_seed: int

    @property
    def folder(self) -> Path:
        """The folder holding the ``.npy`` files."""
        raise NotImplementedError

    def _choose(self, corruptions: list[str] | None, severities: list[int] | None, known: tuple[str, ...],
                subset: int | None, subset_seed: int) -> None:
        """Check and keep the corruptions and severities asked for (``None``: all)."""
        unknown = [c for c in corruptions or () if c not in known]
        if unknown:
            raise UserError(f"shift.corruptions: unknown {', '.join(unknown)}; allowed: {', '.join(known)}.")
        bad = [s for s in severities or () if s not in self.block_severities]
        if bad:
            raise UserError(f"shift.severities: {bad} not among {list(self.block_severities)}.")
        self.corruptions = list(corruptions or known)
        self.severities = list(severities or self.block_severities)
        self.subset, self.subset_seed = subset, subset_seed

    def _ensure_files(self) -> None:
        """Name what is missing, if anything."""
        needed = ["labels.npy", *(f"{c}.npy" for c in self.corruptions)]
        missing = [f for f in needed if not (self.folder / f).is_file()]
        if missing:
            raise UserError(f"{self.folder.resolve() / missing[0]} is missing ({len(missing)} of the files needed).")

    def _positions(self, n: int) -> np.ndarray:
        """Each image's position in the clean test set (the releases keep its order)."""
        return np.arange(n)

    def _load(self, file: str) -> np.ndarray:
        """``file`` memory-mapped, or a UserError naming it."""
        path = self.folder / file
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise UserError(f"{path.resolve()} is not a readable .npy array ({err}); "
                            f"download or make it again.") from None

    def _labels(self) -> tuple[np.ndarray, int]:
        """The labels of one severity block (the same for every severity) and n, the block size."""
        labels = np.asarray(self._load("labels.npy"))
        path = (self.folder / "labels.npy").resolve()
        blocks = len(self.block_severities)
        if labels.ndim != 1 or len(labels) % blocks or not len(labels):
            raise UserError(f"{path} holds shape {labels.shape}; expected {blocks}·n labels (one block per severity).")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise UserError(f"{path} has labels outside 0-{self.num_classes - 1} for {self.name}.")
        n = len(labels) // blocks
        if not (labels.reshape(blocks, n) == labels[:n]).all():
            raise UserError(f"{path} does not repeat one block of labels per severity, as the releases do.")
        return labels[:n].astype(np.int64), n

    # ------------------------------------------------------------------ blocks

    def sets(self) -> Iterator[tuple[str, int, Split]]:
        """``(corruption, severity, Split)`` for every chosen corruption and severity."""
        self._ensure_files()
        labels, n = self._labels()
        chosen = np.arange(n)
        if self.subset is not None and self.subset < n:
            _, chosen = stratified_indices(labels, self.subset, self.subset_seed, "shift.subset")
        index = torch.from_numpy(self._positions(n)[chosen])
        expected = (len(self.block_severities) * n, *self.image_shape, 3)
        for corruption in self.corruptions:
            images = self._load(f"{corruption}.npy")
            if images.dtype != np.uint8 or images.shape != expected:
                raise UserError(f"{(self.folder / f'{corruption}.npy').resolve()} holds {images.dtype} "
                                f"{images.shape}; expected uint8 {expected} to match labels.npy.")
            for severity in self.severities:
                block = np.asarray(images[self.block_severities.index(severity) * n + chosen])
                yield corruption, severity, Split(torch.from_numpy(block).permute(0, 3, 1, 2).contiguous(),
                                                  torch.from_numpy(labels[chosen]), index)


class CorruptedCIFAR(CorruptedImages):
    """CIFAR-10-C / CIFAR-100-C: ``<corruption>.npy`` (uint8, 5·n × 32 × 32 × 3; rows
    [(s−1)·n, s·n) hold severity s; n = 10,000 in the releases) and ``labels.npy``.
    ``root`` is the folder holding the ``.npy`` files or its parent holding
    ``CIFAR-10-C/``. A folder ``calibrun-corrupt data=cifar10`` wrote reads the same way.

    References: Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to
    Common Corruptions and Perturbations" (ICLR).
    """

    releases: ClassVar[dict[str, Release]] = {
        "cifar10c": {"folder": "CIFAR-10-C", "num_classes": 10, "md5": "56bf5dcef84df0e2308c6dcbcbbd8499",
                     "url": "https://zenodo.org/records/2535967/files/CIFAR-10-C.tar"},
        "cifar100c": {"folder": "CIFAR-100-C", "num_classes": 100, "md5": "11f0ed0f1191edbf9fa23466ae6021d3",
                      "url": "https://zenodo.org/records/3555552/files/CIFAR-100-C.tar"},
    }
    image_shape = (32, 32)

    def __init__(self, name: str = "cifar10c", root: str = "data/CIFAR-10-C", corruptions: list[str] | None = None,
                 severities: list[int] | None = None, subset: int | None = None, subset_seed: int = 0,
                 download: bool = False) -> None:
        if name not in self.releases:
            raise UserError(f"shift.name={name!r} is not a corrupted release; allowed: {', '.join(self.releases)}.")
        self.name, self.root, self.download = name, Path(root), download
        self.release = self.releases[name]
        self.num_classes = int(self.release["num_classes"])
        self._choose(corruptions, severities, BENCHMARK + EXTRA, subset, subset_seed)
        # The 4 extra corruptions are read when named; the default is the benchmark's 15.
        self.corruptions = list(corruptions or BENCHMARK)

    # ------------------------------------------------------------------ files

    @property
    def folder(self) -> Path:
        """Where the ``.npy`` files are: ``root`` itself, or ``root/CIFAR-10-C``."""
        nested = self.root / str(self.release["folder"])
        return nested if not (self.root / "labels.npy").is_file() and nested.is_dir() else self.root

    def _ensure_files(self) -> None:
        """Download the release if asked to and files are missing; else name what is missing."""
        needed = ["labels.npy", *(f"{c}.npy" for c in self.corruptions)]
        missing = [f for f in needed if not (self.folder / f).is_file()]
        if missing and self.download:
            self._download()
            missing = [f for f in needed if not (self.folder / f).is_file()]
        if missing:
            present = sorted(p.stem for p in self.folder.glob("*.npy") if p.stem != "labels")
            raise UserError(
                f"{self.folder.resolve() / missing[0]} is missing ({len(missing)} of the files needed)"
                f"{'; present: ' + ', '.join(present) if present else ''}. Download {self.release['url']} "
                f"(MD5 {self.release['md5']}) and extract it into {self.root.resolve()}, run with "
                f"shift.download=true, or point shift.root=DIR at the folder holding the .npy files."
            )

    def _download(self) -> None:
        """Fetch and extract the release archive into ``root``, MD5-checked."""
        from torchvision.datasets.utils import check_integrity, download_and_extract_archive

        url, md5 = str(self.release["url"]), str(self.release["md5"])
        archive = self.root / url.rsplit("/", 1)[1]
        log.info("Downloading %s to %s (about 3 GB for the real release).", url, self.root)
        try:
            download_and_extract_archive(url, str(self.root), md5=md5)
        except (urllib.error.URLError, OSError) as err:
            raise UserError(f"Downloading {url} failed ({err}). Fetch it elsewhere (MD5 {md5}), extract it into "
                            f"{self.root.resolve()} and run again.") from None
        except RuntimeError as err:
            if archive.is_file() and not check_integrity(str(archive), md5):
                raise UserError(f"{archive.resolve()} does not have the release's MD5 {md5}: a broken or "
                                f"different download. Delete it and run again.") from None
            raise UserError(f"Downloading {url} failed: {err}") from None


class CorruptedFolder(CorruptedImages):
    """A folder ``calibrun-corrupt`` wrote for any dataset (e.g. PACS-C): the layout of the
    releases, with ``corrupt.json`` saying what it holds (classes, image size, severities,
    corruptions, recipe, seed) and ``index.npy`` each image's position in the clean test
    split. ``corruptions=None`` reads every corruption the folder holds."""

    name = "corrupted"

    def __init__(self, root: str, corruptions: list[str] | None = None, severities: list[int] | None = None,
                 subset: int | None = None, subset_seed: int = 0) -> None:
        self.root = Path(root)
        self._asked = (corruptions, severities, subset, subset_seed)

    @cached_property
    def meta(self) -> dict[str, Any]:
        """``corrupt.json``, checked for the keys the reader needs."""
        path = self.root / "corrupt.json"
        if not path.is_file():
            raise UserError(f"{path.resolve()} is missing: shift.root must be a folder calibrun-corrupt wrote "
                            f"(calibrun-corrupt data=... out=DIR); for the official CIFAR-10-C/100-C releases "
                            f"use shift=cifar10c or shift=cifar100c.")
        try:
            meta = json.loads(path.read_text())
            int(meta["num_classes"]), int(meta["image_shape"][1]), list(meta["severities"]), list(meta["done"])
        except (ValueError, KeyError, TypeError, IndexError) as err:
            raise UserError(f"{path.resolve()} is not a calibrun-corrupt record ({err!r}).") from None
        return cast(dict[str, Any], meta)

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        """The classes of the dataset the folder was made from."""
        return int(self.meta["num_classes"])

    @property
    def image_shape(self) -> tuple[int, int]:  # type: ignore[override]
        """The images' height and width."""
        return int(self.meta["image_shape"][0]), int(self.meta["image_shape"][1])

    @property
    def block_severities(self) -> tuple[int, ...]:  # type: ignore[override]
        """The severities of the folder's blocks, in file order."""
        return tuple(int(s) for s in self.meta["severities"])

    @property
    def folder(self) -> Path:
        """``root`` itself."""
        return self.root

    def sets(self) -> Iterator[tuple[str, int, Split]]:
        """The blocks asked for, among those the folder holds."""
        corruptions, severities, subset, subset_seed = self._asked
        self._choose(corruptions, severities, tuple(self.meta["done"]), subset, subset_seed)
        yield from super().sets()

    def _positions(self, n: int) -> np.ndarray:
        """``index.npy``: each image's position in the clean test split it was made from."""
        index = np.asarray(self._load("index.npy"), dtype=np.int64)
        if index.shape != (n,):
            raise UserError(f"{(self.folder / 'index.npy').resolve()} holds {index.shape}; expected ({n},).")
        return index
