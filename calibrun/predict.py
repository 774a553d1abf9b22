"""Inference over a whole split on the device: the logits every evaluation reads."""

from __future__ import annotations

import torch

from calibrun.data import DeviceLoader


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DeviceLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole split, in split order, computed in float32 on the device.

    Autocast is switched off even if a caller left it on: the saved logits are what the
    calibrators and metrics read, and bf16 logits (8 bits of mantissa) would quantise the
    confidences being calibrated. The weights are float32, so this costs only speed.
    """
    model.eval()
    outs, labels = [], []
    with torch.autocast(loader.device.type, enabled=False):
        for x, y in loader:
            outs.append(model(x).float())
            labels.append(y)
    return torch.cat(outs), torch.cat(labels)
