"""Out-of-distribution image sets for ``ood=...``: each has a ``name`` and a
``split()`` of uint8 images (their own labels are kept but never scored)."""

from __future__ import annotations

import logging
import urllib.error
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from calibrun import UserError
from calibrun.data.base import ImageDataset
from calibrun.data.splits import Split, subset

log = logging.getLogger(__name__)


class SVHN:
    """The SVHN test set (26,032 digits, 32×32), read from the official ``test_32x32.mat``
    (``X``: 32×32×3×N, ``y``: N×1 with 10 for the digit 0).

    References: Netzer et al. 2011, "Reading Digits in Natural Images with Unsupervised
    Feature Learning"; as an OOD set for CIFAR models: Hendrycks & Gimpel 2017.
    """

    url: ClassVar[str] = "http://ufldl.stanford.edu/housenumbers/test_32x32.mat"
    md5: ClassVar[str] = "eb5a983be6a315427106f1b164d9cef3"
    file_name: ClassVar[str] = "test_32x32.mat"

    def __init__(self, root: str = "data/svhn", download: bool = False, subset: int | None = None,
                 subset_seed: int = 0, name: str = "svhn") -> None:
        self.root, self.download, self.name = Path(root), download, name
        self.subset, self.subset_seed = subset, subset_seed

    def split(self) -> Split:
        """The test images (optionally a stratified subset), labels 0-9."""
        path = self.root / self.file_name
        if not path.is_file() and self.download:
            self._download()
        if not path.is_file():
            raise UserError(f"{path.resolve()} is missing. Download {self.url} (MD5 {self.md5}) into "
                            f"{self.root.resolve()}, run with ood.download=true, or set ood.root=DIR.")
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError

        try:
            mat = loadmat(path)
            images, labels = np.asarray(mat["X"]), np.asarray(mat["y"]).ravel().astype(np.int64)
        except (MatReadError, ValueError, OSError, KeyError, TypeError, NotImplementedError) as err:
            raise UserError(f"{path.resolve()} is not a readable SVHN .mat file ({err}); download it again.") from None
        layout_ok = images.dtype == np.uint8 and images.ndim == 4 and images.shape[:3] == (32, 32, 3)
        if not layout_ok or images.shape[3] != len(labels):
            raise UserError(f"{path.resolve()} holds X {images.dtype} {images.shape}, y {labels.shape}; "
                            "expected uint8 32×32×3×N and N labels.")
        labels[labels == 10] = 0
        split = Split(torch.from_numpy(images).permute(3, 2, 0, 1).contiguous(), torch.from_numpy(labels),
                      torch.arange(len(labels)))
        return subset(split, self.subset, self.subset_seed, "ood.subset")

    def _download(self) -> None:
        from torchvision.datasets.utils import check_integrity, download_url

        try:
            download_url(self.url, str(self.root), self.file_name, self.md5)
        except (urllib.error.URLError, OSError, RuntimeError) as err:
            raise UserError(f"Downloading {self.url} failed ({err}). Fetch it elsewhere (MD5 {self.md5}) into "
                            f"{self.root.resolve()}.") from None
        path = self.root / self.file_name
        if path.is_file() and not check_integrity(str(path), self.md5):
            raise UserError(f"{path.resolve()} does not have SVHN's MD5 {self.md5}: a broken or different "
                            "download. Delete it and run again.")


class OtherTestSet:
    """The test split of a calibrun dataset as an OOD set (CIFAR-100 for a CIFAR-10
    model, CIFAR-10 for a CIFAR-100 model); ``dataset`` is built by Hydra."""

    def __init__(self, dataset: ImageDataset, name: str, subset: int | None = None, subset_seed: int = 0) -> None:
        self.dataset, self.name, self.subset, self.subset_seed = dataset, name, subset, subset_seed
        dataset.config_key = "ood.dataset"  # the keys its messages name, as a user sets them

    def split(self) -> Split:
        """The dataset's test images (optionally a stratified subset)."""
        return subset(self.dataset.splits()["test"], self.subset, self.subset_seed, "ood.subset")
