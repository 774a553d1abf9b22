"""The interface every dataset meets, which is all the training loop relies on."""

from __future__ import annotations

from abc import ABC, abstractmethod
from functools import cached_property

import torch

from calibrun.data.augment import Normalize, random_crop_flip
from calibrun.data.splits import Split


class ImageDataset(ABC):
    """A classification dataset held as uint8 tensors.

    ``splits()`` returns ``{"train", "val", "test"}`` :class:`Split` objects; the two
    transforms turn a uint8 batch already on the device into the normalised float batch
    the model sees. The transforms take a generator so that a resumed run draws the
    same augmentation (evaluation ignores it). Subclasses set ``num_classes`` and, for
    their own statistics, ``mean`` and ``std`` (per channel, for pixels in [0, 1]).
    """

    num_classes: int
    # The config section this dataset was built from, named in its messages
    # (calibrun.data.OtherTestSet sets ood.dataset).
    config_key: str = "data"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)

    @abstractmethod
    def splits(self) -> dict[str, Split]:
        """The train, val and test splits (may read, download or decode data)."""

    @abstractmethod
    def train_transform(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Augmented, normalised float training batch."""

    @abstractmethod
    def eval_transform(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Normalised float evaluation batch, without random augmentation."""

    @cached_property
    def normalize(self) -> Normalize:
        """The dataset's ``mean``/``std`` standardisation, built once per dataset."""
        return Normalize(self.mean, self.std)


class CropFlipDataset(ImageDataset):
    """Small images trained with pad-and-crop plus horizontal flip, evaluated as they are.

    ``augment = False`` trains on the images as they are (normalised only): the setting
    of a model left to overfit, which is what makes cross-entropy overconfident quickly.
    """

    crop_pad: int = 4
    augment: bool = True

    def train_transform(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Zero-pad by ``crop_pad``, random crop back to size, flip half, normalise
        (only normalise when ``augment`` is false)."""
        if not self.augment:
            return self.normalize(images)
        return self.normalize(random_crop_flip(images, self.crop_pad, generator))

    def eval_transform(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The images as they are, normalised."""
        return self.normalize(images)
