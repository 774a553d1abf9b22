"""Hydra launchers: joblib for local parallel jobs, submitit for SLURM."""


import pytest
from conftest import FAST


def test_slurm_launcher_config_composes(run_cli):
    proc = run_cli(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SlurmLauncher" in proc.stdout and "signal_delay_s: 120" in proc.stdout and "partition: gpu" in proc.stdout
    plain = run_cli(["hydra/launcher=submitit_slurm", "--cfg", "hydra"])
    assert plain.returncode == 0 and "SlurmLauncher" in plain.stdout


@pytest.mark.slow
def test_joblib_launcher_runs_a_two_job_sweep(run_cli, tmp_path):
    proc = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1", *FAST,
                    "trainer.epochs=1", "calibrator=[temperature]", "run_name=par"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent.name for p in (tmp_path / "outputs" / "multirun" / "par").glob("*/DONE"))
    assert len(jobs) == 2 and all("seed=" in j for j in jobs)
    assert "hydra/launcher" not in "".join(jobs), "the launcher must not change job folders"
    assert "Joblib" in proc.stdout + proc.stderr or "joblib" in proc.stdout + proc.stderr
