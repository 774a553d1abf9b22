"""The logits file format: ``logits`` (N×K floats) and ``labels`` (N integers), saved
as an ``.npz`` (a run's ``logits/<split>.npz``, with the images' ``index`` in their
dataset) or given as a ``.pt`` dict by a user, read with one set of checks whose
messages say what is wrong and how to save it right."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import TypedDict

import numpy as np

from calibrun import UserError
from calibrun._io import atomic_open
from calibrun.calibrators import looks_like_probabilities
from calibrun.config import first_line


class _LogitArrays(TypedDict):
    """The arrays every logits file holds, by name: typed keys let mypy check ``np.savez(**arrays)``."""

    logits: np.ndarray
    labels: np.ndarray


class _IndexedLogitArrays(_LogitArrays, total=False):
    """A run's logits file: also the images' ``index`` in their dataset."""

    index: np.ndarray


def save_logits(path: Path, logits: np.ndarray, labels: np.ndarray, index: np.ndarray | None = None) -> None:
    """Write float32 ``logits``, int64 ``labels`` (and ``index``, the rows' positions in
    their dataset) to the ``.npz`` at ``path``, atomically."""
    arrays: _IndexedLogitArrays = {"logits": np.asarray(logits, dtype=np.float32),
                                   "labels": np.asarray(labels, dtype=np.int64)}
    if index is not None:
        arrays["index"] = np.asarray(index, dtype=np.int64)
    with atomic_open(path) as fh:
        np.savez(fh, **arrays)


def load_logits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The ``logits`` (N×K floats) and ``labels`` (N integers) saved in ``path``: an
    ``.npz`` (a run's ``logits/<split>.npz``) or a ``.pt`` file holding a dict with the same
    two keys (tensors or arrays)."""
    logits, labels = _read_pt(path) if path.suffix == ".pt" else _read_npz(path)
    if logits.ndim != 2 or not np.issubdtype(logits.dtype, np.floating) or not np.isfinite(logits).all():
        raise UserError(f"{path}: 'logits' must be a finite float N×K array, got {logits.dtype} {logits.shape}.")
    _check_labels(path, labels, *logits.shape)
    if looks_like_probabilities(logits):
        raise UserError(f"{path}: 'logits' look like probabilities (every row in [0, 1], summing to 1); "
                        "save the logits, or np.log of the probabilities.")
    return logits, labels


def _check_labels(path: Path, labels: np.ndarray, n: int, classes: int) -> None:
    """Labels that index the logits' rows and classes; the message says which part is off."""
    wanted = f"'labels' must be {n} integers in 0..{classes - 1} (one per row of 'logits')"
    if labels.shape != (n,):
        raise UserError(f"{path}: {wanted}; they have shape {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: {wanted}; they are {labels.dtype}.")
    if n and (labels.min() < 0 or labels.max() >= classes):
        raise UserError(f"{path}: {wanted}; they run from {labels.min()} to {labels.max()}.")


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    how = "np.savez(path, logits=z, labels=y)"
    if path.is_file() and not zipfile.is_zipfile(path):
        single = (" holds one array (.npy)" if path.suffix == ".npy"
                  else " is not an .npz archive (damaged, or another file)")
        raise UserError(f"Cannot read logits from {path}: it{single}; save logits and labels together: {how}.")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [key for key in ("logits", "labels") if key not in f.files]
            if missing:
                held = ", ".join(map(repr, f.files)) or "no arrays"
                raise UserError(f"Cannot read logits from {path}: it holds {held} and lacks "
                                f"{', '.join(map(repr, missing))} ({how}).")
            return f["logits"], f["labels"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UserError(f"Cannot read logits from {path} ({first_line(err)}); it is damaged or not a "
                        "logits file (an .npz with 'logits' and 'labels' arrays).") from None


def _read_pt(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import torch

    try:
        # weights_only: a logits file must never run code on loading.
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise UserError(f"Cannot read logits from {path} ({first_line(err)}); it is damaged or not a "
                        "torch.save'd dict.") from None
    missing = [key for key in ("logits", "labels") if not isinstance(saved, dict) or key not in saved]
    if missing:
        raise UserError(f"{path} must hold a dict with 'logits' and 'labels' (torch.save({{'logits': z, "
                        f"'labels': y}}, path)); it lacks {', '.join(map(repr, missing))}.")

    def array(value: object) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            # numpy has no bfloat16: low-precision logits are widened, as calibrun's own are.
            return (value.float() if value.is_floating_point() else value).detach().cpu().numpy()
        return np.asarray(value)

    return array(saved["logits"]), array(saved["labels"])
