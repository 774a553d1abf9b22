"""The device loader: batches cut, shuffled and augmented where the split lives."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from calibrun.data.splits import Split

# A dataset's train_transform or eval_transform: uint8 batch and generator in, float batch out.
Transform = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


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
        """Seed the next iteration's shuffle and augmentation for ``epoch``."""
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
