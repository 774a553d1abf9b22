"""Hydra launchers: joblib for local parallel jobs, submitit for SLURM, Ray for a Ray cluster."""


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


@pytest.mark.parametrize("job, gpus, device", [(0, 1, "cuda"), (5, 1, "cuda"), (0, 4, "cuda:0"), (6, 4, "cuda:2"),
                                               (3, 2, "cuda:1")])
def test_parallel_sweep_jobs_take_the_gpus_in_turn(job, gpus, device):
    from calibrun.commands.calibrun import spread_device

    assert spread_device(job, gpus) == device


def test_a_sweep_on_a_multi_gpu_machine_puts_its_jobs_on_different_gpus(run_cli, tmp_path, monkeypatch):
    """trainer.device=auto in a multirun: job k of a sweep on 2 GPUs asks for cuda:k % 2
    (CUDA is faked here: the resolved device is all that is checked, then the run stops)."""
    import torch

    from calibrun import train

    asked = []

    def record(cfg, run_dir, snapshot=None):
        asked.append(cfg.trainer.device)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(train, "run", record)
    assert run_cli(["-m", *FAST, "seed=0,1,2", "run_name=gpus"]).returncode == 0
    assert asked == ["cuda:0", "cuda:1", "cuda:0"]
    asked.clear()
    assert run_cli(["-m", *FAST, "trainer.device=cpu", "seed=0,1", "run_name=cpu"]).returncode == 0
    assert asked == ["cpu", "cpu"]


def test_ray_launcher_runs_a_two_job_sweep_on_a_local_ray_instance(run_cli, tmp_path):
    """hydra/launcher=ray starts a Ray instance on this machine for the sweep (ray.init with
    no address), runs both jobs on it, and the test shuts it down; both run folders finish
    and the launcher does not change their names."""
    pytest.importorskip("hydra_plugins.hydra_ray_launcher")
    import shutil
    import tempfile

    import ray

    # A short folder: Ray's socket paths inside it must stay under the OS limit of 107 bytes.
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        proc = run_cli(["-m", "hydra/launcher=ray", "+hydra.launcher.ray.init.num_cpus=2",
                        f"+hydra.launcher.ray.init._temp_dir={temp}", "+hydra.launcher.ray.init.include_dashboard=false",
                        "seed=0,1", *FAST, "trainer.epochs=1", "calibrator=[temperature]", "run_name=onray"],
                       env={"RAY_USAGE_STATS_ENABLED": "0"})  # no usage report: tests stay offline
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "outputs" / "multirun" / "onray"
    jobs = sorted(p.parent for p in sweep.glob("*/DONE"))
    assert [j.name.split("seed=")[1][0] for j in jobs] == ["0", "1"]
    assert all((j / "metrics.csv").is_file() and (j / "logits" / "test.npz").is_file() for j in jobs)
    assert "hydra/launcher" not in "".join(j.name for j in jobs), "the launcher must not change job folders"
