"""A corrupted copy of a test split, written in the layout of the CIFAR-10-C release:
``<corruption>.npy`` (uint8, b·n × H × W × 3, one block of n images per severity, in
order), ``labels.npy`` (the n labels once per block), plus ``index.npy`` (each image's
position in the clean test split) and ``corrupt.json`` (what the folder holds and how it
was made). :class:`calibrun.data.CorruptedCIFAR` and :class:`calibrun.data.CorruptedFolder`
read it.

Each corruption is written to ``<corruption>.partial`` and renamed when complete, and
``corrupt.json`` lists the finished ones, so a killed run resumes where it stopped. The
random draws of a batch come from ``(seed, corruption, severity, first image)``: the same
settings give the same files, whichever corruptions are made and in which order.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from calibrun import UserError, __version__
from calibrun.corrupt import corruptions
from calibrun.data.splits import Split

log = logging.getLogger(__name__)

RECORD = "corrupt.json"
SOURCE = ("Hendrycks & Dietterich 2019, Benchmarking Neural Network Robustness to Common Corruptions and "
          "Perturbations (ICLR); github.com/hendrycks/robustness, ImageNet-C/create_c/make_cifar_c.py (cifar) "
          "and ImageNet-C/imagenet_c/imagenet_c/corruptions.py (imagenet)")


@dataclass
class Settings:
    """What decides the folder's content; a folder made with other settings is refused."""

    data: str
    num_classes: int
    image_shape: list[int]
    n: int
    severities: list[int]
    recipe: str
    seed: int
    batch_size: int
    subset: int | None
    subset_seed: int


@dataclass
class Record(Settings):
    """``corrupt.json``: the settings, the corruptions finished and their time."""

    done: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    source: str = SOURCE
    calibrun: str = __version__


def write_folder(split: Split, out: Path, names: list[str], settings: Settings, device: torch.device) -> Record:
    """Every corruption of ``names`` at ``settings.severities`` of ``split``'s images into
    ``out``, skipping those already there; the updated record."""
    out.mkdir(parents=True, exist_ok=True)
    record = _open_record(out, settings)
    blocks = len(settings.severities)
    np.save(out / "labels.npy", np.tile(split.labels.numpy().astype(np.int64), blocks))
    np.save(out / "index.npy", split.index.numpy().astype(np.int64))
    for name in names:
        if name in record.done and (out / f"{name}.npy").is_file():
            log.info("%s: already in %s", name, out)
            continue
        started = time.perf_counter()
        _write_corruption(split, out, name, settings, device)
        record.seconds[name] = round(time.perf_counter() - started, 3)
        record.done = [n for n in record.done if n != name] + [name]
        (out / RECORD).write_text(json.dumps(asdict(record), indent=2) + "\n")
        images = blocks * settings.n
        log.info("%s: %d severities × %d images in %.1f s (%.0f images/s)", name, blocks, settings.n,
                 record.seconds[name], images / max(record.seconds[name], 1e-9))
    return record


def _open_record(out: Path, settings: Settings) -> Record:
    """The folder's record, or a new one; a UserError if it was made with other settings."""
    path = out / RECORD
    if not path.is_file():
        return Record(**asdict(settings))
    try:
        found = json.loads(path.read_text())
        record = Record(**found)
    except (ValueError, TypeError) as err:
        raise UserError(f"{path.resolve()} is not a calibrun-corrupt record ({err}); delete {out} or "
                        f"choose another out=.") from None
    differ = [f"{key} {found[key]!r} there, {value!r} now" for key, value in asdict(settings).items()
              if found.get(key) != value]
    if differ:
        raise UserError(f"{out} holds corruptions made with other settings ({'; '.join(differ)}); "
                        f"choose another out= or delete the folder.")
    return record


def _write_corruption(split: Split, out: Path, name: str, settings: Settings, device: torch.device) -> None:
    """One corruption, every severity, batch by batch into ``<name>.partial``, then renamed."""
    corruption = corruptions()[name]
    n, (h, w) = settings.n, settings.image_shape
    partial = out / f"{name}.partial"
    blocks = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8,
                                       shape=(len(settings.severities) * n, h, w, 3))
    steps = [(k, s, start) for k, s in enumerate(settings.severities) for start in range(0, n, settings.batch_size)]
    for k, severity, start in tqdm(steps, desc=name, unit="batch", leave=False, disable=None):
        images = split.images[start:start + settings.batch_size].to(device).contiguous()
        rng = np.random.default_rng([settings.seed, zlib.crc32(name.encode()), severity, start])
        corrupted = corruption(images, severity, settings.recipe, rng)
        blocks[k * n + start:k * n + start + len(images)] = corrupted.permute(0, 2, 3, 1).cpu().numpy()
    blocks.flush()
    del blocks
    partial.replace(out / f"{name}.npy")
