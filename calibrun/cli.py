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


def calibrate(argv: list[str] | None = None) -> None:
    """``calibrun-calibrate RUN_DIR [calibrator=[...]] [metrics.n_bins=M]``: refit the
    post-hoc calibrators of a finished run from its saved logits (no model, no data)
    and rewrite its tables and figures. Calibrators not named keep their rows."""
    import argparse

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from calibrun import report, train

    parser = argparse.ArgumentParser(prog="calibrun-calibrate", description=calibrate.__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. calibrator=[temperature,isotonic]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run_dir = args.run_dir
        needed = [run_dir / "DONE", run_dir / "config.yaml", run_dir / "logits" / "val.npz", run_dir / "logits" / "test.npz"]
        missing = [str(p) for p in needed if not p.is_file()]
        if missing:
            raise UserError(f"{run_dir} is not a finished calibrun run (missing: {', '.join(missing)}).")
        run_cfg = OmegaConf.load(run_dir / "config.yaml")
        overrides = [f"metrics.n_bins={run_cfg.metrics.n_bins}", *args.overrides]
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = train.validate(compose(config_name="config", overrides=overrides))
        calibrators = train.build_calibrators(cfg)
        table = report.calibrate_and_report(run_dir, calibrators, cfg.metrics.n_bins)
    except UserError as err:
        log.error("%s", err)
        sys.exit(1)
    except Exception as err:  # Hydra's override errors: bad group option or syntax.
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            log.error("%s", err)
            sys.exit(1)
        raise
    log.info("Refitted %s in %s\n%s", ", ".join(calibrators), run_dir, table.to_string(index=False))
