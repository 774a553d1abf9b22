"""Console scripts. ``calibrun`` is a Hydra app: ``calibrun key=value ...`` for one run,
``calibrun -m key=a,b ...`` for a sweep."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from calibrun import UserError


def config_dir() -> str:
    """The Hydra config root: inside the installed package (wheels carry it there) or at
    the top of a source checkout (editable installs)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise RuntimeError(f"calibrun's config folder is missing: looked in {here / 'conf'} and {here.parent / 'conf'}.")


log = logging.getLogger("calibrun")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _calibrun(cfg: DictConfig) -> dict | None:
    from calibrun import train

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if "root" in cfg.get("data", {}):
        # Relative data roots mean "relative to where the user typed the command",
        # whatever hydra.job.chdir says.
        with open_dict(cfg):
            cfg.data.root = hydra.utils.to_absolute_path(str(cfg.data.root))
    try:
        return train.run(cfg, run_dir)
    except UserError as err:
        log.error("%s", err)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise
        sys.exit(1)


def main() -> None:
    """Entry point of the ``calibrun`` console script."""
    _calibrun()
