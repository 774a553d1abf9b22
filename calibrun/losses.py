"""Training objectives (DESIGN §4). Each is called as ``loss(logits, targets)`` and
returns the mean over the batch.

The training loop calls two hooks on every loss, whatever it is: ``set_epoch(epoch)``
before each epoch and ``mix(inputs, targets)`` before each forward pass. Both do
nothing by default; losses that need the epoch (λ warm-up) or the inputs (mixup)
override them, so the loop never branches on which loss it runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Loss(nn.Module):
    """Base class: the hooks the training loop calls for every loss."""

    def set_epoch(self, epoch: int) -> None:
        """Told the 0-based epoch before it starts."""

    def mix(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """May transform a training batch before the forward pass; identity by default."""
        return inputs, targets


class CrossEntropy(Loss):
    """Cross-entropy, −log p_y with p = softmax(z), averaged over the batch.

    References: Guo et al. 2017, "On Calibration of Modern Neural Networks" (the
    uncalibrated baseline).
    """

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets)
