"""CIFAR-10/100, from torchvision's official release or from an image folder."""

from __future__ import annotations

import urllib.error
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock

from calibrun import UserError
from calibrun.data.base import CropFlipDataset
from calibrun.data.decode import cached_decode, default_cache_dir, list_images
from calibrun.data.packed import load_packed
from calibrun.data.splits import Split, make_splits

if TYPE_CHECKING:  # for the annotation only: _load_torchvision imports torchvision when it runs
    from torchvision.datasets import CIFAR10


class CIFAR(CropFlipDataset):
    """CIFAR-10/100 from torchvision's official release, or from an image folder.

    ``format="torchvision"`` reads (and with ``download=True`` fetches, MD5-checked)
    ``cifar-10-batches-py`` / ``cifar-100-python`` under ``root``. ``format="folder"``
    reads ``root/train/<class>/*`` and ``root/test/<class>/*``; its decoded images are
    cached as one uint8 tensor file under ``cache_dir`` (default ``root/.calibrun_cache``).
    ``format="packed"`` reads such a folder packed into the one file ``root``
    (:mod:`calibrun.data.packed`), cached beside it.
    ``augment=False`` drops the pad-and-crop and flip of the training images.

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
        augment: bool = True,
    ) -> None:
        expected = {"cifar10": 10, "cifar100": 100}
        if name not in expected:
            raise UserError(f"data.name={name!r} is not a CIFAR variant; allowed: cifar10, cifar100.")
        if format not in ("torchvision", "folder", "packed"):
            raise UserError(f"data.format={format!r} is not supported; allowed: torchvision, folder, packed.")
        if format == "torchvision" and num_classes != expected[name]:
            raise UserError(f"data.num_classes={num_classes} but {name} has {expected[name]} classes.")
        self.name, self.num_classes, self.root, self.format = name, num_classes, Path(root), format
        self.download, self.val_size, self.split_seed = download, val_size, split_seed
        self.train_subset, self.test_subset = train_subset, test_subset
        # A packed file's cache sits beside it, as a folder's sits inside the folder.
        self.cache_dir = default_cache_dir(self.root.parent if format == "packed" else self.root, cache_dir)
        self.augment = augment

    def splits(self) -> dict[str, Split]:
        """A stratified val hold-out of the training set, the official test set, and the subsets."""
        load = {"torchvision": self._load_torchvision, "folder": self._load_folder, "packed": self._load_packed}
        train_x, train_y, test_x, test_y = load[self.format]()
        return make_splits(train_x, train_y, test_x, test_y, self.val_size, self.split_seed, self.train_subset,
                           self.test_subset)

    def _load_torchvision(self) -> tuple[torch.Tensor, ...]:
        """(train images, train labels, test images, test labels) of the official release."""
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

    def _missing_message(self, dataset_cls: type[CIFAR10], err: BaseException) -> str:
        """What to download and where to put it, when the official release is missing."""
        root, key = self.root.resolve(), self.config_key
        folder = root / dataset_cls.base_folder
        reason = f"the download failed ({err})" if self.download else f"{key}.download=false"
        # The bundled sample is a stand-in for the training data only, not for an OOD set.
        sample = (f" To try calibrun offline without it: data={self.name}_sample, a sample of real "
                  f"{self.name.upper()} images bundled with calibrun."
                  if key == "data" and self.name == "cifar10" else "")
        return (
            f"{self.name.upper()} was not found in {folder} and {reason}. "
            f"Either run with network access and {key}.download=true, which fetches "
            f"{dataset_cls.url} into {root} and checks its MD5; or download that archive "
            f"yourself, put it in {root} and run once with {key}.download=true to check and "
            f"extract it (no network needed then); or point {key}.root (or the CALIBRUN_DATA "
            f"environment variable) at a folder that already holds {dataset_cls.base_folder}. "
            f"Images in class folders work too: {key}.format=folder with "
            f"{key}.root/train/<class>/* and {key}.root/test/<class>/*.{sample}"
        )

    def _load_packed(self) -> tuple[torch.Tensor, ...]:
        """(train images, train labels, test images, test labels) of the packed file
        ``root`` (:mod:`calibrun.data.packed`), decoded once into the decode cache."""
        self.classes, loaded = load_packed(self.root, self.cache_dir, self.num_classes)
        return loaded

    def _load_folder(self) -> tuple[torch.Tensor, ...]:
        """(train images, train labels, test images, test labels) of ``root/{train,test}/<class>/*``;
        the classes are the training folder's sub-folders, sorted."""
        train_dir, test_dir = self.root / "train", self.root / "test"
        for d in (train_dir, test_dir):
            if not d.is_dir():
                raise UserError(
                    f"{self.config_key}.format=folder expects {d.resolve()} with one sub-folder per class "
                    f"({self.config_key}.root/train/<class>/*, {self.config_key}.root/test/<class>/*)."
                )
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
        self.classes = classes  # the class names, for messages about the data
        if len(classes) != self.num_classes:
            raise UserError(
                f"{train_dir.resolve()} has {len(classes)} class folders but "
                f"{self.config_key}.num_classes={self.num_classes}."
            )
        files = {
            split: list_images(self.root / split, classes, unknown_classes="not in the training set")
            for split in ("train", "test")
        }
        return cached_decode(files, self.cache_dir)
