"""End-to-end runs of the ``calibrun`` command."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import CIFAR_SAMPLE, FAST, REPO, only_run_dir

from calibrun.metrics import METRIC_NAMES, scores

# Each metric, every metric's bootstrap interval (calibrun.bootstrap), then the selective
# risk at conf/config.yaml's metrics.coverages and its interval (conformal sets are off by default).
RISKS = ["risk_at_80", "risk_at_90", "risk_at_95"]
METRIC_COLUMNS = ["split", "calibrator", *METRIC_NAMES, "n", "collapsed",
                  *[f"{name}_{end}" for name in METRIC_NAMES for end in ("lo", "hi")],
                  *RISKS, *[f"{name}_{end}" for name in RISKS for end in ("lo", "hi")]]
CALIBRATORS = ["none", "temperature", "vector", "matrix", "platt", "histogram", "isotonic"]
RUN_FILES = [
    ".hydra/config.yaml", "config.yaml", "calibrun.log", "env.json", "status.json", "checkpoints/last.pt",
    "history.csv", "logits/val.npz", "logits/test.npz", "metrics.csv", "metrics.md", "bins.csv",
    "risk_coverage.csv", *(f"figures/reliability_{name}.png" for name in CALIBRATORS), "figures/confidence_hist.png",
    "figures/risk_coverage.png", "DONE",
]


def check_run_folder(run_dir, n_test):
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), f"missing {name}"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns) == METRIC_COLUMNS
    assert {(s, c) for s, c in zip(metrics.split, metrics.calibrator)} == {
        (s, c) for s in ("val", "test") for c in CALIBRATORS}
    bins = pd.read_csv(run_dir / "bins.csv")
    assert list(bins.columns) == ["calibrator", "bin", "lo", "hi", "count", "conf", "acc", "acc_lo", "acc_hi"]
    assert bins.groupby("calibrator")["count"].sum().eq(n_test).all()
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history.columns) == ["epoch", "lr", "train_loss", "train_acc", "val_acc", "val_ece", "seconds", "images_per_s"]
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"
    env = json.loads((run_dir / "env.json").read_text())
    assert {"torch", "git_commit", "device", "seed", "slurm_job_id"} <= env.keys()
    log_lines = (run_dir / "calibrun.log").read_text().splitlines()
    assert len(log_lines) > 3 and len(set(log_lines)) == len(log_lines), "log lines must appear once"
    # The saved logits reproduce the reported uncalibrated test row.
    with np.load(run_dir / "logits" / "test.npz") as f:
        z, y = f["logits"], f["labels"]
        assert z.dtype == np.float32 and len(f["index"]) == n_test
    probs = np.exp(z - z.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    row = metrics[(metrics.split == "test") & (metrics.calibrator == "none")].iloc[0]
    assert row.ece == pytest.approx(scores(probs, y)["ece"], abs=1e-6)
    return metrics, history


def test_cifar_sample_run_writes_the_run_folder(run_cli, tmp_path):
    proc = run_cli([
        "data=cifar10_sample", "data.train_subset=400", "data.val_size=200", "data.test_subset=200",
        "model=resnet110", "model.depth=8", "trainer=quick", "trainer.epochs=2", "trainer.batch_size=64", "trainer.progress=false",
        "metrics.resamples=100",
    ])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    assert run_dir.parent.name == "ce" and run_dir.parent.parent.name == "cifar10_sample"
    metrics, history = check_run_folder(run_dir, n_test=200)
    assert len(history) == 2


def test_synthetic_run_learns_and_temperature_keeps_accuracy(run_cli, tmp_path):
    proc = run_cli([*FAST, "trainer.epochs=4", "run_name=smoke"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "smoke"
    metrics, _ = check_run_folder(run_dir, n_test=256)
    test = metrics[metrics.split == "test"].set_index("calibrator")
    assert test.loc["none", "accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert test.loc["temperature", "accuracy"] == test.loc["none", "accuracy"]
    # A second identical command finds DONE and trains nothing.
    mtime = (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns
    again = run_cli([*FAST, "trainer.epochs=4", "run_name=smoke"])
    assert again.returncode == 0 and (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime


def test_missing_cifar_exits_1_with_instructions_and_no_traceback(run_cli, tmp_path):
    proc = run_cli(["data=cifar10", "data.download=false", "data.root=nodata", "trainer.progress=false"])
    assert proc.returncode == 1
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    assert str(tmp_path / "nodata") in output and "cifar-10-python.tar.gz" in output
    assert "data.download=true" in output and "data.format=folder" in output
    status = json.loads((only_run_dir(tmp_path) / "status.json").read_text())
    assert status["state"] == "failed" and "not found" in status["error"]


def test_unknown_bundled_sample_exits_1_naming_it(run_cli):
    proc = run_cli(["data=cifar10_sample", "data.root=${calibrun.sample:nope}", "trainer.progress=false"])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in output
    assert "data.root" in output and "no bundled sample 'nope'; it ships cifar10, pacs" in output


@pytest.mark.parametrize("args, message", [
    (["trainer.epochs=many"], "Invalid value for 'trainer.epochs'"),
    (["trainer.lr=-1"], "Invalid value trainer.lr=-1.0: must be > 0"),
    (["+typo=1"], "Unknown config key 'typo'"),
    (["-m", "trainer.lr=0.1,-1"], "Invalid value trainer.lr=-1.0: must be > 0"),
])
def test_bad_config_is_one_line_before_any_folder(run_cli_process, tmp_path, args, message):
    """In a process of its own, as a user meets it: exit status 1, one ``calibrun:`` line
    on stderr, no traceback, and no run folder or log left behind (a swept bad value too)."""
    proc = run_cli_process([*args, "data=synthetic"])
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("calibrun: ") and message in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_calibruns_own_keys_are_checked_without_loading_torch(tmp_path):
    """A mistake in the trainer's or the top level's keys is answered before torch (1.5 s
    of a quiet machine's import, several seconds of a loaded one) or any component loads."""
    script = ("import sys\nfrom calibrun.commands.calibrun import main\nsys.argv = ['calibrun', 'trainer.lr=-1']\n"
              "try:\n    main()\nexcept SystemExit as exit:\n    print(exit.code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["1", "False"], proc.stdout + proc.stderr[-2000:]
    assert proc.stderr.startswith("calibrun: Invalid value trainer.lr=-1.0")


def test_shell_completion_installs_and_answers(tmp_path):
    """``eval "$(calibrun -sc install=bash)"`` (what --hydra-help advertises) and the query
    the installed completion makes: Hydra's own flags are not read as overrides."""
    command = [sys.executable, "-m", "calibrun"]
    install = subprocess.run([*command, "-sc", "install=bash"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0 and "hydra_bash_completion" in install.stdout, install.stderr[-2000:]
    env = {**os.environ, "COMP_LINE": "calibrun los", "COMP_POINT": "12"}
    query = subprocess.run([*command, "-sc", "query=bash"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300, env=env)
    assert query.returncode == 0 and "loss=" in query.stdout.split(), query.stdout + query.stderr[-2000:]


def test_version_is_calibruns(run_cli):
    from calibrun import __version__

    proc = run_cli(["--version"])
    assert proc.returncode == 0 and proc.stdout.startswith(f"calibrun {__version__} (Python "), proc.stdout


def test_help_is_calibruns_and_names_every_command_and_group(run_cli):
    """``calibrun --help`` opens with calibrun's summary (not "powered by Hydra"), shows
    the demo, names every console script pyproject.toml installs and lists every group."""
    import tomllib

    proc = run_cli(["--help"])
    assert proc.returncode == 0 and proc.stdout.startswith("calibrun: train an image classifier"), proc.stdout
    assert "calibrun experiment=demo" in proc.stdout
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert [name for name in scripts if f"\n  {name} " not in proc.stdout] == []
    groups = [d.name for d in (REPO / "conf").iterdir() if d.is_dir() and d.name != "hydra"]
    assert [g for g in groups if f"\n{g}: " not in proc.stdout] == []


def test_installed_package_finds_its_config_and_samples_from_any_directory(tmp_path):
    """A non-editable install (a wheel built from this checkout) composes its config
    from an unrelated working directory and carries the bundled sample images."""
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    assert (target / "calibrun" / "conf" / "config.yaml").is_file()
    installed = target / "calibrun" / "samples"
    for name, n_files in (("cifar10", 6000), ("pacs", 52)):
        shipped = [p for p in (CIFAR_SAMPLE.parent / name).rglob("*") if p.is_file()]
        assert len(shipped) == n_files
        assert all((installed / p.relative_to(CIFAR_SAMPLE.parent)).is_file() for p in shipped)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import calibrun, sys; print(calibrun.__file__); "
            "sys.argv[1:] = ['data=cifar10_sample', '--cfg', 'job', '--resolve']; "
            "from calibrun.commands.calibrun import main; main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0].startswith(str(target))
    assert f"root: {installed / 'cifar10'}" in proc.stdout
    assert f"cache_dir: {tmp_path / '.cache' / 'calibrun' / 'cifar10_sample'}" in proc.stdout


@pytest.mark.slow
def test_a_compiled_run_saves_weights_an_eager_model_loads(compose_cfg, tmp_path):
    """trainer.compile=true on the CPU (inductor): the run finishes, its checkpoint holds
    the plain model's keys (no torch.compile prefix), and the eager model with those
    weights gives the saved test logits."""
    import torch

    from calibrun import train
    from calibrun.config import validate

    cfg = validate(compose_cfg([*FAST, "trainer.epochs=1", "trainer.compile=true", "calibrator=[temperature]"]))
    train.run(cfg, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert not any(key.startswith("_orig_mod") for key in state)
    eager, _, _ = train.prepare(validate(compose_cfg([*FAST, "trainer.epochs=1"])), tmp_path / "eager")
    eager.model.load_state_dict(state)
    logits, _ = train.predict(eager.model, eager.eval_loaders["test"])
    with np.load(tmp_path / "run" / "logits" / "test.npz") as saved:
        np.testing.assert_allclose(saved["logits"], logits.numpy(), rtol=1e-4, atol=1e-4)
