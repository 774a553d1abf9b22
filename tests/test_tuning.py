"""Tuning with Optuna (hydra/sweeper=tune, hydra-optuna-sweeper): the task returns the
validation objective, a failed trial is reported without ending the study."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import FAST

from calibrun import UserError
from calibrun.compose import config_dir
from calibrun.metrics import METRIC_NAMES
from calibrun.sweep import check_objective

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")


def _val_objective(run: Path, metric: str = "nll", calibrator: str = "temperature") -> float:
    table = pd.read_csv(run / "metrics.csv")
    return float(table.loc[(table.split == "val") & (table.calibrator == calibrator), metric].iloc[0])


def test_two_trials_minimise_the_validation_objective(run_cli, tmp_path):
    proc = run_cli(["-m", *FAST, "hydra/sweeper=tune", "hydra.sweeper.n_trials=2", "objective.metric=nll",
                    "loss=gap", "loss.lam=interval(0.1,10)", "calibrator=[temperature]", "run_name=tune"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "outputs" / "multirun" / "tune"
    runs = sorted(p.parent for p in sweep.glob("*/DONE"))
    assert len(runs) == 2
    values = {run.name: _val_objective(run) for run in runs}
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(values.values()), abs=1e-12)
    # The best trial's λ names its folder; the test split played no part in choosing it.
    assert f"loss.lam={best['best_params']['loss.lam']}" in min(values, key=values.get)


def test_a_failed_trial_is_reported_and_the_study_goes_on(run_cli, tmp_path):
    # The seeded sampler proposes both values; 2 training images of 4 classes fail the run itself.
    proc = run_cli(["-m", *FAST, "hydra/sweeper=tune", "hydra.sweeper.n_trials=2",
                    "objective.metric=ece", "objective.calibrator=none", "data.train_size=choice(2,300)",
                    "run_name=failing"])
    sweep = tmp_path / "outputs" / "multirun" / "failing"
    assert proc.returncode == 1 and "1 job(s) of the sweep did not finish" in proc.stderr, proc.stderr[-3000:]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    (run,) = [p.parent for p in sweep.glob("*/DONE")]
    assert best["best_params"]["data.train_size"] == 300
    assert best["best_value"] == pytest.approx(_val_objective(run, "ece", "none"), abs=1e-12)


@pytest.mark.parametrize(("override", "message"), [
    ("objective.metric=val_nll", "objective.metric=val_nll is not a metric; choose from accuracy, ece"),
    ("objective.calibrator=vector", "objective.calibrator=vector is not among the run's calibrators (none, "
                                    "temperature)"),
])
def test_an_objective_that_is_not_a_column_is_refused_naming_the_key(override, message):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["objective.metric=nll", override, "calibrator=[temperature]"])
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_objective(cfg)


def test_a_bad_objective_on_the_command_line_is_one_line_before_any_folder(run_cli, tmp_path):
    proc = run_cli([*FAST, "objective.metric=val_nll"])
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "calibrun: objective.metric=val_nll is not a metric; choose from " + ", ".join(METRIC_NAMES) + "."]
    assert not (tmp_path / "outputs").exists()
