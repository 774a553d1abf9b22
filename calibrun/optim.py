"""Learning-rate schedules built from config (``conf/scheduler/``); the optimizers
themselves are torch's (``conf/optimizer/``), built as partials and given the model's
parameters by the training loop."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from calibrun import UserError


def lr_factor(step: int, steps_per_epoch: int, epochs: int, schedule: str, milestones: Sequence[float],
              gamma: float, warmup_epochs: float) -> float:
    """Learning-rate multiplier at an optimizer step: a linear warm-up over
    ``warmup_epochs``, then ``multistep`` (×``gamma`` after each milestone, given as a
    fraction of the run, so shortening a run keeps its shape) or ``cosine`` (to zero)."""
    epoch = step / steps_per_epoch
    if epoch < warmup_epochs:
        return (step + 1) / (warmup_epochs * steps_per_epoch)
    if schedule == "cosine":
        span = max(epochs - warmup_epochs, 1e-9)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - warmup_epochs) / span)))
    return gamma ** sum(epoch >= m * epochs for m in milestones)


def warmup_schedule(optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int, schedule: str = "multistep",
                    milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1,
                    warmup_epochs: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` following :func:`lr_factor`.

    References: He et al. 2016, "Deep Residual Learning for Image Recognition", §4.2
    (multistep); Loshchilov & Hutter 2017, "SGDR" (cosine); Goyal et al. 2017,
    "Accurate, Large Minibatch SGD" (linear warm-up).
    """
    schedule = getattr(schedule, "value", schedule)
    if schedule not in ("multistep", "cosine"):
        raise UserError(f"Unknown learning-rate schedule {schedule!r}; allowed: multistep, cosine.")
    args = (steps_per_epoch, epochs, schedule, tuple(milestones), gamma, warmup_epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, *args))
