"""Inference over a whole split on the device: the logits every evaluation reads, the
device they are computed on and the checkpoint the weights come from."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from calibrun import UserError
from calibrun.config import first_line
from calibrun.data import DeviceLoader


def resolve_device(name: str) -> torch.device:
    """``trainer.device`` as a torch device: ``auto`` is CUDA when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but CUDA is not available here; use trainer.device=auto or cpu.")
    return device


def load_checkpoint(path: Path, device: torch.device, keys: tuple[str, ...] = ("model",)) -> dict:
    """The checkpoint at ``path``, which must hold ``keys``; a damaged one is a UserError
    naming the file."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, AttributeError, ImportError) as err:
        raise UserError(f"Checkpoint {path} is unreadable ({first_line(err)}); delete it to start the run "
                        "again.") from None
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"Checkpoint {path} lacks {', '.join(missing)}: it is not a complete calibrun checkpoint; "
                        "delete it to start the run again.")
    return state


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
