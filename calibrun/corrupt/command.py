"""What ``calibrun-corrupt`` does, in order: compose ``conf/corrupt.yaml`` with the
overrides, load the test split of ``data``, choose the recipe, and write the folder
(:mod:`calibrun.corrupt.write`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig

from calibrun import UserError
from calibrun.compose import config_dir
from calibrun.config import build_component, first_line
from calibrun.corrupt import RECIPES, corruptions, get
from calibrun.corrupt._ops import require_cv2
from calibrun.corrupt.write import Settings, write_folder
from calibrun.data.splits import Split, stratified_indices

log = logging.getLogger("calibrun")

# The image sides the published constants were written for (make_cifar_c.py: 32;
# imagenet_c/corruptions.py: 224, applied by ``recipe=auto`` from this side up).
CIFAR_SIDE, IMAGENET_MIN_SIDE = 32, 200


def corrupt_config(overrides: list[str]) -> tuple[DictConfig, str, str]:
    """``conf/corrupt.yaml`` composed with ``overrides``, the data it names (``data``'s
    choice and the ``data.*`` overrides, e.g. ``pacs_sample,data.target=photo``) and the
    output folder (``out``, or ``outputs/corrupted/<that>``)."""
    with initialize_config_dir(config_dir=str(Path(config_dir()).resolve()), version_base="1.3"):
        try:
            cfg = compose(config_name="corrupt", overrides=overrides)
        except HydraException as err:
            raise UserError(f"calibrun-corrupt: {first_line(err)}") from None
    choice = next((o.split("=", 1)[1] for o in overrides if o.startswith("data=")), "cifar10")
    extra = [o for o in overrides if o.startswith("data.")]
    label = ",".join([choice, *extra])
    return cfg, label, cfg.out or str(Path("outputs") / "corrupted" / label)


def make_corrupted(cfg: DictConfig, label: str, out: Path) -> None:
    """The corrupted copy ``cfg`` asks for (of the data ``label`` names), written into ``out``."""
    from calibrun.predict import resolve_device

    require_cv2()
    names = _chosen_corruptions(cfg.corruptions)
    severities = _chosen_severities(cfg.severities)
    if int(cfg.batch_size) < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be at least 1.")
    device = resolve_device(str(cfg.device))
    data = build_component(cfg.data, "data")
    split = _subset(data.splits()["test"], cfg.subset, int(cfg.subset_seed))
    h, w = split.images.shape[-2:]
    settings = Settings(data=label, num_classes=int(data.num_classes), image_shape=[int(h), int(w)],
                        n=len(split), severities=severities, recipe=_recipe(str(cfg.recipe), h, w),
                        seed=int(cfg.seed), batch_size=int(cfg.batch_size),
                        subset=None if cfg.subset is None else int(cfg.subset), subset_seed=int(cfg.subset_seed))
    log.info("calibrun-corrupt: %d test images (%d×%d) × %d corruptions × %d severities, recipe %s, on %s, into %s",
             len(split), h, w, len(names), len(severities), settings.recipe, device, out)
    record = write_folder(split, out, names, settings, device)
    shift = "cifar10c" if settings.image_shape == [32, 32] and severities == [1, 2, 3, 4, 5] else "corrupted"
    log.info("Wrote %d corruptions in %.0f s. Evaluate a run on them: calibrun-evaluate RUN shift=%s shift.root=%s",
             len(record.done), sum(record.seconds.get(n, 0.0) for n in names), shift, out)


def _chosen_corruptions(value: object) -> list[str]:
    """``corruptions``: null (all 19) or a list of names, each checked."""
    if value is None:
        return list(corruptions())
    names = [str(v) for v in value] if not isinstance(value, str) else [value]  # type: ignore[attr-defined]
    for name in names:
        get(name)
    return names


def _chosen_severities(value: object) -> list[int]:
    """``severities``: a list of distinct values in 1-5, kept in increasing order."""
    values = [value] if isinstance(value, int) else list(value)  # type: ignore[call-overload]
    if not values or any(v not in (1, 2, 3, 4, 5) for v in values) or len(set(values)) != len(values):
        raise UserError(f"severities={values}: give distinct severities from 1-5, e.g. [1,2,3,4,5].")
    return sorted(int(v) for v in values)


def _recipe(recipe: str, h: int, w: int) -> str:
    """``recipe``, with ``auto`` resolved by the image size."""
    if recipe != "auto":
        if recipe not in RECIPES:
            raise UserError(f"recipe={recipe}: choose from auto, {', '.join(RECIPES)}.")
        return recipe
    if (h, w) == (CIFAR_SIDE, CIFAR_SIDE):
        return "cifar"
    if min(h, w) >= IMAGENET_MIN_SIDE:
        return "imagenet"
    raise UserError(f"recipe=auto: the constants were published for 32×32 (cifar) and 224×224 (imagenet) images, "
                    f"and these are {h}×{w}; choose recipe=cifar or recipe=imagenet.")


def _subset(split: Split, size: object, seed: int) -> Split:
    """A stratified ``size``-image subset of ``split`` (all of it for null)."""
    if size is None or int(size) >= len(split):  # type: ignore[call-overload]
        return split
    _, chosen = stratified_indices(split.labels.numpy(), int(size), seed, "subset")  # type: ignore[call-overload]
    return split.take(np.asarray(chosen))
