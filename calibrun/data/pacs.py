"""PACS leave-one-domain-out: the official layout and split files, the download, and
JiGen's training augmentation."""

from __future__ import annotations

import logging
import tarfile
import urllib.error
import zipfile
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from sklearn.model_selection import train_test_split

from calibrun import UserError
from calibrun.data.augment import jigen_augment
from calibrun.data.base import ImageDataset
from calibrun.data.decode import cached_decode, default_cache_dir, list_images
from calibrun.data.splits import Split, take_subsets

log = logging.getLogger(__name__)

# (relative path "<domain>/<class>/<image>", class index, where it was found: "file:line" or the image path)
Entry = tuple[str, int, str]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
# How the source domains are split into train and val (see PACS).
SPLIT_MODES = ("official", "random", "jigen")
IMAGENET_STD = (0.229, 0.224, 0.225)


def _drive(file_id: str) -> str:
    # The /file/d/ form is the one torchvision's download_url hands to gdown, which
    # gets past Google Drive's confirmation page for large files.
    return f"https://drive.google.com/file/d/{file_id}"


class PACS(ImageDataset):
    """PACS leave-one-domain-out: train on three domains, test on the held-out ``target``.

    Reads the official layout, ``root/kfold/<domain>/<class>/<image>`` and
    ``root/<domain>_{train,crossval,test}_kfold.txt`` (lines ``<domain>/<class>/<image>
    <label 1-7>``). ``split="official"``: train and val are the source domains' train and
    crossval files; ``split="random"``: a hold-out of ``val_fraction`` of the source
    images drawn with ``split_seed`` (stratified by domain and class when possible);
    ``split="jigen"``: JiGen's protocol, floor(``val_fraction`` · n_d) images drawn at
    random (seeded by ``split_seed``, not stratified by class) from each source domain
    d's full image list. Test is every image of the target. A domain's images are those
    of its test file, or (``random`` and ``jigen``) without one, those found under
    ``kfold/<domain>``.

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
    # The augmentation flags of the ResNet-18 PACS command in JiGen's README:
    # --min_scale 0.8 --max_scale 1.0 --random_horiz_flip 0.5 --jitter 0.4 (hue =
    # min(0.5, jitter) in its data_helper.py) --tile_random_grayscale 0.1 --image_size 222.
    # JiGen greys each jigsaw tile; without the jigsaw task the whole image is greyed.
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
        if split not in SPLIT_MODES:
            raise UserError(f"data.split={split!r} is not supported; allowed: {', '.join(SPLIT_MODES)}.")
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
        self.cache_dir = default_cache_dir(self.root, cache_dir)
        self.sources = tuple(d for d in self.domains if d != target)
        # JiGen crops 222 out of PACS's native 227; the same ratio at other sizes.
        self.store_size = round(image_size * 227 / 222)

    # ------------------------------------------------------------------ splits

    def splits(self) -> dict[str, Split]:
        """Train and val from the source domains, test from the target (see the class docstring)."""
        self._ensure_data()
        # Each split mode builds the whole-size splits its own way; subsets and checks are shared.
        build = self._official_splits if self.split == "official" else self._held_out_splits
        splits = take_subsets(build(), self.train_subset, self.test_subset, self.split_seed)
        empty = [name for name, split in splits.items() if len(split) == 0]
        if empty:
            raise UserError(f"PACS under {self.root.resolve()} gives no images for the {' and '.join(empty)} split.")
        return splits

    def _official_splits(self) -> dict[str, Split]:
        """Train and val from the source domains' train and crossval files, test from the
        target's test file."""
        parts = {
            "train": [e for d in self.sources for e in self._read_split_file(d, "train")],
            "val": [e for d in self.sources for e in self._read_split_file(d, "crossval")],
            "test": self._read_split_file(self.target, "test"),
        }
        both = sorted({p for p, _, _ in parts["train"]} & {p for p, _, _ in parts["val"]})
        if both:
            raise UserError(
                f"{len(both)} image(s) are in both a train and a crossval split file under {self.root.resolve()}, "
                f"e.g. {both[0]}; the official files never overlap."
            )
        splits, _ = self._decode(parts)
        return splits

    def _held_out_splits(self) -> dict[str, Split]:
        """A seeded hold-out of the source domains' images for val (``random`` or
        ``jigen``), the rest for train, and every image of the target for test."""
        parts = {
            "sources": [e for d in self.sources for e in self._domain_images(d)],
            "test": self._domain_images(self.target),
        }
        decoded, paths = self._decode(parts)
        sources = decoded["sources"]
        domain = np.array([self.domains.index(paths[i].split("/")[0]) for i in sources.index.tolist()])
        hold_out = self._jigen_holdout if self.split == "jigen" else self._random_holdout
        rest, val = hold_out(sources.labels.numpy(), domain)
        return {"train": sources.take(rest), "val": sources.take(val), "test": decoded["test"]}

    def _decode(self, parts: dict[str, list[Entry]]) -> tuple[dict[str, Split], list[str]]:
        """One Split per part, cut from the decoded dataset of every image the parts name,
        and the sorted relative paths that ``Split.index`` points into.

        The decode cache holds that whole sorted dataset rather than one file per part,
        so runs with different targets that name the same images share one cache file.
        """
        label_of = self._labels(parts)
        paths = sorted(label_of)
        position = {p: i for i, p in enumerate(paths)}
        images, labels = cached_decode(
            {"pacs": [(self.kfold / p, label_of[p]) for p in paths]}, self.cache_dir, self.store_size, prefix="pacs"
        )
        dataset = Split(images, labels, torch.arange(len(paths)))
        splits = {
            name: dataset.take(np.unique([position[p] for p, _, _ in entries])) for name, entries in parts.items()
        }
        return splits, paths

    def _random_holdout(self, labels: np.ndarray, domain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A seeded hold-out of ``val_fraction`` of the source images, stratified by
        (domain, class) if every stratum allows it, else by class, else not at all."""
        n = len(labels)
        size = round(self.val_fraction * n)
        if not 0 < size < n:
            raise UserError(f"data.val_fraction={self.val_fraction} leaves no train or no val image of {n} sources.")
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

    def _jigen_holdout(self, labels: np.ndarray, domain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """JiGen's validation split: from each source domain's n_d images, floor(val_fraction
        · n_d) drawn uniformly at random (JiGen's ``int(samples * percent)``; no class
        stratification, so ``labels`` is unused), seeded by ``split_seed`` where JiGen's
        draw was unseeded.

        References: Carlucci et al. 2019, github.com/fmcarlucci/JigenDG
        data/JigsawLoader.py ``get_random_subset``, called per source domain with
        ``--val_size 0.1`` on the domain's full image list (data/data_helper.py).
        """
        rng = np.random.default_rng(self.split_seed)
        val = []
        for d in np.unique(domain):
            members = np.flatnonzero(domain == d)
            size = int(self.val_fraction * len(members))
            if not 0 < size < len(members):
                raise UserError(f"data.val_fraction={self.val_fraction} leaves no train or no val image of the "
                                f"{len(members)} {self.domains[d]} images (data.split=jigen holds out per domain).")
            val.append(rng.choice(members, size, replace=False))
        held_out = np.sort(np.concatenate(val))
        return np.setdiff1d(np.arange(len(domain)), held_out), held_out

    def _labels(self, parts: dict[str, list[Entry]]) -> dict[str, int]:
        """Each image's class index; an image listed with two labels is an error."""
        seen: dict[str, tuple[int, str]] = {}
        for entries in parts.values():
            for path, label, where in entries:
                first, first_where = seen.setdefault(path, (label, where))
                if first != label:
                    raise UserError(f"{path} has label {label + 1} at {where} but {first + 1} at {first_where}.")
        return {path: label for path, (label, _) in seen.items()}

    def _read_split_file(self, domain: str, part: str) -> list[Entry]:
        """(relative path, class index, "file:line") for each line of ``<domain>_<part>_kfold.txt``."""
        name = f"{domain}_{part}_kfold.txt"
        path = self.root / name
        if not path.is_file():
            raise UserError(
                f"PACS split file {path.resolve()} is missing (data.split={self.split} needs it). Get it with "
                f"data.download=true (from {self.split_urls.get(name, self.official_folder)}) or from the official "
                f"PACS folder {self.official_folder}; or use data.split=jigen or random, which need only {self.kfold}."
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
        if not entries:
            raise UserError(f"PACS split file {path.resolve()} lists no images; a source domain without images "
                            "would train on the others without a word. Restore the file, or use data.split=jigen.")
        if mismatched:
            # The label is what counts; a class folder that disagrees hints at a shifted file.
            log.warning("%s: %d line(s) have a label that differs from their class folder.", path, mismatched)
        return entries

    def _domain_images(self, domain: str) -> list[Entry]:
        """Every image of a domain: its test file, or (no such file) the class folders."""
        name = f"{domain}_test_kfold.txt"
        if (self.root / name).is_file():
            return self._read_split_file(domain, "test")
        folder = self.kfold / domain
        if not folder.is_dir():
            raise UserError(f"PACS domain folder {folder.resolve()} is missing, as is {self.root.resolve() / name}.")
        files = list_images(folder, self.classes, unknown_classes="that are not PACS classes")
        return [(path.relative_to(self.kfold).as_posix(), label, str(path.resolve())) for path, label in files]

    # ------------------------------------------------------------------ data on disk

    @property
    def kfold(self) -> Path:
        """The image folder, ``root/kfold/<domain>/<class>/<image>``."""
        return self.root / "kfold"

    def _ensure_data(self) -> None:
        """Download what is missing if allowed, else insist the image folder is there."""
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
        """Where PACS must go and how to get it, after ``reason`` it is not there."""
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
            f"them. With the image folders alone, data.split=jigen or random needs no split files.{stale}"
        )

    # ------------------------------------------------------------------ transforms

    def train_transform(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """JiGen's augmentation at ``image_size``, then ImageNet normalisation."""
        x = jigen_augment(images, self.image_size, generator, self.crop_scale, self.crop_ratio, self.flip_p,
                          self.jitter, self.grayscale_p)
        return self.normalize(x)

    def eval_transform(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The stored images resized to ``image_size`` (antialiased), then normalised."""
        size = (self.image_size, self.image_size)
        resized = F.interpolate(images.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
        return self.normalize(resized)
