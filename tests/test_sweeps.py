"""Hydra multiruns over the losses."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import FAST

from calibrun.compose import config_dir

LOSS_DIR = Path(config_dir()) / "loss"
# Every loss a user can pick: the YAML files of conf/loss.
LOSSES = sorted(p.stem for p in LOSS_DIR.glob("*.yaml"))
# A slice of the bundled CIFAR-10 sample and two calibrators: one epoch per loss still
# trains and calibrates.
SMALL = [*(a for a in FAST if not a.startswith("data=")), "data=cifar10_sample", "data.train_subset=200",
         "data.val_size=100", "data.test_subset=100", "calibrator=[temperature,isotonic]"]


def _check_sweep(tmp_path, proc, expected_jobs):
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent for p in (tmp_path / "outputs" / "multirun").glob("*/*/DONE"))
    assert len(jobs) == expected_jobs
    for job in jobs:
        assert json.loads((job / "status.json").read_text())["state"] == "done"
        metrics = pd.read_csv(job / "metrics.csv")
        assert {"none", "temperature", "isotonic"} <= set(metrics.calibrator) and metrics.notna().all().all()
    return jobs


def test_one_epoch_multirun_over_every_loss(run_cli, tmp_path):
    proc = run_cli(["-m", f"loss={','.join(LOSSES)}", *SMALL, "trainer.epochs=1", "run_name=losses"])
    jobs = _check_sweep(tmp_path, proc, len(LOSSES))
    loss_of = {job: next(p for p in job.name.split(",") if p.startswith("loss=")).removeprefix("loss=") for job in jobs}
    # Folders are named by Hydra's override_dirname, so each loss has its own.
    assert sorted(loss_of.values()) == LOSSES
    # Each job trained the loss its folder names, with that loss's YAML settings.
    for job, name in loss_of.items():
        used = yaml.safe_load((job / "config.yaml").read_text())["loss"]
        assert used == yaml.safe_load((LOSS_DIR / f"{name}.yaml").read_text())


def test_lam_sweep_lands_in_one_folder_per_value(run_cli, tmp_path):
    proc = run_cli(["-m", "loss=gap_cap", "loss.lam=0.1,1,10", *FAST, "trainer.epochs=1", "run_name=lam"])
    jobs = _check_sweep(tmp_path, proc, 3)
    assert all(j.parent == tmp_path / "outputs" / "multirun" / "lam" for j in jobs)
    assert [j.name.split(",")[:2] for j in jobs] == [["data=synthetic", f"loss.lam={lam}"] for lam in ("0.1", "1", "10")]
    lams = [yaml.safe_load((j / "config.yaml").read_text())["loss"]["lam"] for j in jobs]
    assert lams == [0.1, 1.0, 10.0]


@pytest.mark.slow
def test_full_multirun_over_every_loss_with_the_quick_trainer(run_cli, tmp_path):
    proc = run_cli(["-m", f"loss={','.join(LOSSES)}", "data=synthetic", "trainer=quick", "trainer.progress=false",
                    "run_name=all"])
    _check_sweep(tmp_path, proc, len(LOSSES))


def test_mdca_sweeps_over_its_base_loss(run_cli, tmp_path):
    """A nested setting (the base loss's _target_) sweeps like a flat one: one folder and
    one config per value."""
    bases = "calibrun.losses.CrossEntropy,calibrun.losses.LabelSmoothing"
    proc = run_cli(["-m", "loss=mdca", "loss.beta=0.5", f"loss.base._target_={bases}", *SMALL,
                    "trainer.epochs=1", "run_name=mdca"])
    jobs = _check_sweep(tmp_path, proc, 2)
    used = sorted(yaml.safe_load((job / "config.yaml").read_text())["loss"]["base"]["_target_"] for job in jobs)
    assert used == bases.split(",")
