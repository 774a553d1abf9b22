"""The 19 image corruptions of Hendrycks & Dietterich (2019) at their published
severities, batched on any device: the 15 of the benchmark and the 4 extra ones
(speckle noise, Gaussian blur, spatter, saturate).

Each corruption is a :class:`Corruption` subclass in the module of its family (``noise``,
``blur``, ``weather``, ``digital``); defining one registers it. Its ``params`` hold the
five severities of each recipe: ``cifar``, the constants of ``make_cifar_c.py`` for
32×32 images, and ``imagenet``, those of ``imagenet_c/corruptions.py`` for 224×224 ones.
Where the recipe writes 32 or 224, the code uses the image's own height and width.

``apply`` takes uint8 N×3×H×W images and returns float N×3×H×W in [0, 255]; like the
recipe's ``np.uint8(...)``, :func:`corrupt` truncates them to uint8. Random draws come
from a NumPy generator on the CPU, so that a seed gives the same images on any device.

References: Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to
Common Corruptions and Perturbations" (ICLR), and their code, github.com/hendrycks/robustness
(``ImageNet-C/create_c/make_cifar_c.py``, ``ImageNet-C/imagenet_c/imagenet_c/corruptions.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from calibrun import UserError

RECIPES = ("cifar", "imagenet")


class Corruption:
    """One corruption: ``params[recipe][severity - 1]`` and ``apply``.

    ``random`` says whether the output depends on random draws (the fidelity test
    compares those with the reference in distribution, the others image by image).
    """

    name: ClassVar[str]
    random: ClassVar[bool]
    params: ClassVar[dict[str, tuple[Any, ...]]]
    registry: ClassVar[dict[str, Corruption]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Corruption.registry[cls.name] = cls()

    def apply(self, images: torch.Tensor, c: Any, rng: np.random.Generator) -> torch.Tensor:
        """``images`` (uint8 N×3×H×W) corrupted with the severity's parameters ``c``:
        float N×3×H×W in [0, 255], before truncation to uint8."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, severity: int, recipe: str, rng: np.random.Generator) -> torch.Tensor:
        """``images`` (uint8 N×3×H×W) at ``severity`` (1-5) of ``recipe``, as uint8."""
        out = self.apply(images, self.params[recipe][severity - 1], rng)
        # np.uint8(x) in the recipe truncates towards zero; so does a float-to-uint8 cast.
        return out.clamp(0, 255).to(torch.uint8)


def corruptions() -> dict[str, Corruption]:
    """Every corruption, by name, in the order of the paper's Figure 1 then the extras."""
    from calibrun.corrupt import blur, digital, noise, weather  # noqa: F401  (defining a class registers it)
    from calibrun.data.shift import BENCHMARK, EXTRA

    order = {name: i for i, name in enumerate(BENCHMARK + EXTRA)}
    return dict(sorted(Corruption.registry.items(), key=lambda item: order.get(item[0], len(order))))


def get(name: str) -> Corruption:
    """The corruption called ``name``, or a UserError listing them."""
    known = corruptions()
    if name not in known:
        raise UserError(f"corruptions: unknown {name!r}; choose from {', '.join(known)}.")
    return known[name]


def corrupt(images: torch.Tensor | np.ndarray, name: str, severity: int, recipe: str = "cifar",
            seed: int = 0) -> torch.Tensor:
    """``images`` (uint8 N×3×H×W, on any device) under corruption ``name`` at ``severity``
    with ``recipe``'s constants (``cifar`` for 32×32 images, ``imagenet`` for 224×224):
    uint8 N×3×H×W on the same device. The same seed gives the same images."""
    if recipe not in RECIPES:
        raise UserError(f"recipe={recipe!r}: choose from {', '.join(RECIPES)}.")
    if severity not in (1, 2, 3, 4, 5):
        raise UserError(f"severity={severity}: the recipe has severities 1-5.")
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8 or tensor.dim() != 4 or tensor.shape[1] != 3:
        raise UserError(f"images must be uint8 N×3×H×W (RGB); got {tensor.dtype} {tuple(tensor.shape)}.")
    return get(name)(tensor, severity, recipe, np.random.default_rng(seed))


def unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as float32 in [0, 1], the recipe's ``np.array(x) / 255.``."""
    return images.float() / 255
