"""Where calibrun's Hydra config lives, and the resolvers it uses: what composes a config,
for the command line, the tests and a library user alike."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from calibrun import samples

# ${calibrun.sample:cifar10} and ${calibrun.cache:cifar10} locate the image sets bundled
# with the package and their decode cache (conf/data/*_sample.yaml).
OmegaConf.register_new_resolver("calibrun.sample", samples.sample_root, replace=True)
OmegaConf.register_new_resolver("calibrun.cache", samples.cache_root, replace=True)


def config_dir() -> str:
    """The Hydra config root: inside the installed package (wheels carry it there) or at
    the top of a source checkout (editable installs)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"calibrun's config folder is missing: looked in {here / 'conf'} and {here.parent / 'conf'}.")
