"""Where calibrun's Hydra config lives, and the resolvers it uses: what composes a config,
for the command line, the tests and a library user alike."""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import OmegaConf

from calibrun import samples

# Most file systems refuse a path component over 255 bytes; a sweep job's folder is named
# by its overrides, which a long command line takes past that.
LONGEST_FOLDER_NAME = 240


def folder_name(overrides: str) -> str:
    """A multirun job's folder name: its overrides (Hydra's override_dirname) as they are,
    or, past :data:`LONGEST_FOLDER_NAME` bytes, their start and a hash of all of them, so
    that the same job (a requeue, a resumed sweep) always finds the same folder."""
    encoded = overrides.encode()
    if len(encoded) <= LONGEST_FOLDER_NAME:
        return overrides
    digest = hashlib.sha256(encoded).hexdigest()[:12]
    head = encoded[: LONGEST_FOLDER_NAME - len(digest) - 1].decode(errors="ignore")
    return f"{head}-{digest}"


# ${calibrun.sample:cifar10} and ${calibrun.cache:cifar10} locate the image sets bundled
# with the package and their decode cache (conf/data/*_sample.yaml);
# ${calibrun.folder:...} names a sweep job's folder (conf/config.yaml, hydra.sweep.subdir).
OmegaConf.register_new_resolver("calibrun.sample", samples.sample_root, replace=True)
OmegaConf.register_new_resolver("calibrun.cache", samples.cache_root, replace=True)
OmegaConf.register_new_resolver("calibrun.folder", folder_name, replace=True)


def config_dir() -> str:
    """The Hydra config root: inside the installed package (wheels carry it there) or at
    the top of a source checkout (editable installs)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"calibrun's config folder is missing: looked in {here / 'conf'} and {here.parent / 'conf'}.")
