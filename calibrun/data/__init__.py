"""Datasets as uint8 tensors, their splits, the decode cache, and the device loader.

Every dataset (:class:`ImageDataset`) returns ``{"train", "val", "test"}`` :class:`Split`
objects holding the whole split as one uint8 N×3×H×W tensor. :class:`DeviceLoader` moves
a split to the training device once and cuts, shuffles and augments batches there with
batched tensor ops (no DataLoader workers, no per-image Python), in the spirit of airbench.

Modules depend one way: ``splits``, ``augment`` and ``decode`` know no dataset; ``base``
builds on the first two; ``cifar``, ``pacs`` and ``synthetic`` on ``base``; ``shift``
(corrupted test sets) and ``ood`` (out-of-distribution sets) on ``splits``; ``loader``
needs only ``splits``. The configs name the datasets here, e.g. ``calibrun.data.CIFAR``.
"""

from calibrun.data.augment import (
    Normalize,
    color_jitter,
    grayscale,
    jigen_augment,
    random_crop_boxes,
    random_crop_flip,
    resized_crop,
)
from calibrun.data.base import CropFlipDataset, ImageDataset
from calibrun.data.cifar import CIFAR
from calibrun.data.decode import IMAGE_SUFFIXES, cached_decode, decode_image, list_images
from calibrun.data.loader import DeviceLoader, Transform
from calibrun.data.ood import SVHN, OtherTestSet
from calibrun.data.pacs import PACS
from calibrun.data.shift import CorruptedCIFAR, CorruptedFolder, CorruptedImages
from calibrun.data.splits import Split, make_splits, resolve_val_size, stratified_indices, subset, take_subsets
from calibrun.data.synthetic import Synthetic

__all__ = [
    "CIFAR",
    "SVHN",
    "CorruptedCIFAR",
    "CorruptedFolder",
    "CorruptedImages",
    "OtherTestSet",
    "IMAGE_SUFFIXES",
    "PACS",
    "CropFlipDataset",
    "DeviceLoader",
    "ImageDataset",
    "Normalize",
    "Split",
    "Synthetic",
    "Transform",
    "cached_decode",
    "color_jitter",
    "decode_image",
    "grayscale",
    "jigen_augment",
    "list_images",
    "make_splits",
    "random_crop_boxes",
    "random_crop_flip",
    "resized_crop",
    "resolve_val_size",
    "stratified_indices",
    "subset",
    "take_subsets",
]
