"""Splits as uint8 tensors: the :class:`Split` container, the stratified val hold-out
and the stratified train/test subsets."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from calibrun import UserError

log = logging.getLogger(__name__)


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
        """The images at ``positions`` (positions in this split, not ``index`` values)."""
        pos = torch.as_tensor(positions, dtype=torch.long)
        return Split(self.images[pos], self.labels[pos], self.index[pos])


def stratified_indices(labels: np.ndarray, size: int, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(len(labels))`` into (rest, chosen) with ``size`` chosen, stratified by
    label. Both halves are sorted so that the order never depends on the shuffle.
    ``what`` names the config key in error messages."""
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
    n_val = resolve_val_size(val_size, len(train_y))
    rest, val = stratified_indices(train_y.numpy(), n_val, split_seed, "data.val_size")
    splits = {"train": train.take(rest), "val": train.take(val), "test": test}
    return take_subsets(splits, train_subset, test_subset, split_seed)


def take_subsets(
    splits: dict[str, Split], train_subset: int | None, test_subset: int | None, seed: int
) -> dict[str, Split]:
    """``splits`` with its train and test splits cut to the stratified subsets that
    ``data.train_subset`` / ``data.test_subset`` ask for; val is never cut."""
    sizes = {"train": train_subset, "test": test_subset}
    return {
        name: subset(split, sizes[name], seed, f"data.{name}_subset") if name in sizes else split
        for name, split in splits.items()
    }


def subset(split: Split, size: int | None, seed: int, what: str) -> Split:
    """A stratified subset of ``size`` images; the whole split when it is no larger."""
    if size is None or size >= len(split):
        if size is not None and size > len(split):
            log.warning("%s=%d is more than the %d images there are; using all of them.", what, size, len(split))
        return split
    _, chosen = stratified_indices(split.labels.numpy(), size, seed, what)
    return split.take(chosen)
