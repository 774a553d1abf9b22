"""Small real image sets shipped inside the package, so that the demo and the tests run
offline on a fresh clone or a plain ``pip install``.

- ``cifar10/``: 500 training and 100 test images per class of CIFAR-10 (Krizhevsky 2009),
  32×32 JPEGs (quality 75) made from the official release, in the
  ``train/<class>/*``, ``test/<class>/*`` layout that ``data.format=folder`` reads.
- ``pacs/``: 40 PACS images (Li et al. 2017; 10 per domain) with their official split
  files, in the official ``kfold/<domain>/<class>/*`` layout.

``conf/data/cifar10_sample.yaml`` and ``pacs_sample.yaml`` point the ordinary loaders
at them through the ``${calibrun.sample:NAME}`` and ``${calibrun.cache:NAME}`` config
resolvers. They are for demos and tests; published numbers need the full datasets.
"""

from __future__ import annotations

import os
from pathlib import Path

from calibrun import UserError

SAMPLES_DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    """The bundled samples: every sub-folder of this package."""
    return sorted(p.name for p in SAMPLES_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def sample_root(name: str) -> str:
    """The folder of the bundled sample ``name`` (``cifar10``, ``pacs``)."""
    root = SAMPLES_DIR / name
    if not root.is_dir():
        raise UserError(f"calibrun has no bundled sample {name!r}; it ships {', '.join(names())}.")
    return str(root)


def cache_root(name: str) -> str:
    """Where the decoded images of sample ``name`` are cached: ``$CALIBRUN_CACHE/NAME``,
    else ``$XDG_CACHE_HOME/calibrun/NAME``, else ``~/.cache/calibrun/NAME``.

    Not beside the images: an installed package may sit in a read-only site-packages,
    and a cache written there would outlive ``pip uninstall``.
    """
    base = os.environ.get("CALIBRUN_CACHE")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        base = str(Path(xdg) / "calibrun")
    return str(Path(base) / name)
