"""Faults a user meets: a folder holding another run, two processes in one folder, signals
at any point of a run, a signalled or failing sweep. Each ends in one clear message, the
right status and exit code, and no file of a finished run changed."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import FAST

from calibrun import UserError, duration, train
from calibrun.compose import config_dir
from calibrun.runfolder import RunLock

RUN = [*FAST, "calibrator=[temperature]"]


def _digests(run_dir: Path) -> dict[str, str]:
    """Every file of a run folder (but the lock files) with its content hash."""
    return {str(p.relative_to(run_dir)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and not p.name.startswith(".lock")}


def test_a_finished_folder_with_another_config_is_refused_and_left_as_it_was(run_cli, tmp_path):
    assert run_cli([*RUN, "run_name=x"]).returncode == 0
    run_dir = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "x"
    before = _digests(run_dir)
    assert ".hydra/config.yaml" in before and "calibrun.log" in before
    refused = run_cli([*RUN, "run_name=x", "trainer.epochs=3"])
    assert refused.returncode == 1
    assert "holds a finished run of another config" in refused.stderr
    assert "trainer.epochs: 2 -> 3" in refused.stderr and "Traceback" not in refused.stderr
    assert _digests(run_dir) == before
    same = run_cli([*RUN, "run_name=x"])
    assert same.returncode == 0 and "holds DONE with the same config" in same.stdout


def test_only_calibrator_changes_point_at_calibrun_calibrate(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    train.run(compose_cfg(RUN), run_dir)
    with pytest.raises(UserError, match="calibrator.temperature.max_iter: .* calibrun-calibrate"):
        train.run(compose_cfg([*RUN, "calibrator.temperature.max_iter=7"]), run_dir)


def test_a_folder_in_use_is_refused_naming_the_holder(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with RunLock(run_dir):
        with pytest.raises(UserError, match=rf"{run_dir} is in use by another calibrun process \(.*\"pid\": {os.getpid()}"):
            train.run(compose_cfg(RUN), run_dir)
    assert not (run_dir / "status.json").exists()


@pytest.mark.parametrize("phase", ["calibrate_and_report", "predict"])
def test_a_signal_outside_the_training_loop_records_interrupted(compose_cfg, tmp_path, monkeypatch, phase):
    """SIGTERM while predicting or calibrating stops the run at once as `interrupted`;
    the same command then finishes it from the checkpoint."""
    real = getattr(train, phase)

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    run_dir = tmp_path / "run"
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # under calibrun's: pytest survives a late one
    try:
        with monkeypatch.context() as patch:
            patch.setattr(train, phase, signalled)
            with pytest.raises(train.Interrupted, match="Interrupted by SIGTERM") as info:
                train.run(compose_cfg(RUN), run_dir)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert info.value.signum == signal.SIGTERM
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and not (run_dir / "DONE").exists()
    train.run(compose_cfg(RUN), run_dir)
    assert (run_dir / "DONE").is_file()


def test_temporary_files_of_interrupted_writes_are_removed_on_resume(compose_cfg, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "logits").mkdir(parents=True)
    stale = [run_dir / ".metrics.csv.4242.0123abcd.tmp", run_dir / "logits" / ".val.npz.7.deadbeef.tmp"]
    for path in stale:
        path.write_text("half")
    kept = run_dir / "notes.tmp"
    kept.write_text("mine")
    train.run(compose_cfg(RUN), run_dir)
    assert not any(p.exists() for p in stale) and kept.exists()


SLOW = [*RUN, "trainer.epochs=4", "trainer.deterministic=true", "trainer.batch_size=32"]


def _job(sweep: Path, seed: int) -> Path:
    """The folder of a sweep's job (its name lists every override: data=synthetic,...,seed=N)."""
    return sweep / next(p.name for p in sweep.iterdir() if f",seed={seed}," in p.name)


def test_sigterm_stops_a_sweep_and_the_first_job_resumes_to_the_uninterrupted_result(run_cli, tmp_path):
    assert run_cli([*SLOW, "seed=0", "run_name=straight"]).returncode == 0
    sweep = tmp_path / "outputs" / "multirun" / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "calibrun", "-m", *SLOW, "seed=0,1", "run_name=cut"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 300
    while not (list(sweep.glob("*,seed=0,*/history.csv")) and len(next(sweep.glob("*,seed=0,*/history.csv")).read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before it could be interrupted"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Interrupted by SIGTERM" in err and "Traceback" not in out + err
    assert not list(sweep.glob("*,seed=1,*")), "the second job never starts"
    first = _job(sweep, 0)
    assert json.loads((first / "status.json").read_text())["state"] == "interrupted"

    resumed = run_cli(["-m", *SLOW, "seed=0,1", "run_name=cut"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "straight"
    pd.testing.assert_frame_equal(pd.read_csv(first / "metrics.csv"), pd.read_csv(straight / "metrics.csv"))
    assert (_job(sweep, 1) / "DONE").is_file()


@pytest.mark.parametrize("launcher", [[], ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]], ids=["basic", "joblib"])
def test_a_sweep_with_a_failing_job_ends_with_a_summary_not_a_traceback(run_cli_process, tmp_path, launcher):
    """model.depth=9 is not 6n+2: that job fails, the other finishes, the sweep lists it and exits 1."""
    proc = run_cli_process(["-m", *RUN, "trainer.epochs=1", "model.depth=8,9", *launcher])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    # Started without run_name (a timestamp): the resume command fixes the sweep's.
    (sweep,) = (tmp_path / "outputs" / "multirun").iterdir()
    assert ("1 job(s) of the sweep did not finish. Resume them (the finished ones are skipped) with: "
            "calibrun -m ") in proc.stderr and f" run_name={sweep.name}\n" in proc.stderr, proc.stderr[-3000:]
    summary = [line for line in proc.stderr.splitlines() if "model.depth=9" in line and " job " in line]
    assert summary and "6n+2" in summary[0], proc.stderr[-3000:]
    assert list(sweep.glob("*model.depth=8*/DONE"))


def test_a_folder_that_cannot_be_written_gives_one_line(run_cli, tmp_path, monkeypatch):
    """Tests run as root, where chmod does not stop writes: the write itself is made to fail."""
    import calibrun.train

    def read_only(run_dir, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(run_dir / "status.json"))

    monkeypatch.setattr(calibrun.train, "write_status", read_only)
    proc = run_cli([*RUN, "run_name=ro"])
    assert proc.returncode == 1
    assert "Cannot write" in proc.stderr and "status.json: Permission denied" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_submitit_job_signalled_is_requeued_and_resumes_to_the_same_result(run_cli, tmp_path):
    """Through the real engine: hydra/launcher=submitit_local, submitit's SIGUSR2 to the job
    process mid-training; calibrun checkpoints, submitit requeues, the job resumes."""
    assert run_cli([*SLOW, "seed=0", "run_name=straight"]).returncode == 0
    sweep = tmp_path / "outputs" / "multirun" / "slurm"
    proc = subprocess.Popen([sys.executable, "-m", "calibrun", "-m", *SLOW, "seed=0", "run_name=slurm",
                             "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 300
    while not (list(sweep.glob("*/history.csv")) and list(sweep.glob("*/.lock.owner"))
               and len(next(sweep.glob("*/history.csv")).read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the job ended before it could be signalled"
        time.sleep(0.02)
    job = next(sweep.glob("*/history.csv")).parent
    os.kill(json.loads((job / ".lock.owner").read_text())["pid"], signal.SIGUSR2)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    logs = "\n".join(p.read_text(errors="replace") for p in sweep.rglob("*.err")) + "\n".join(
        p.read_text(errors="replace") for p in sweep.rglob("*.out"))
    assert "Requeued job" in logs and "Resuming from" in (job / "calibrun.log").read_text()
    straight = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "straight"
    pd.testing.assert_frame_equal(pd.read_csv(job / "metrics.csv"), pd.read_csv(straight / "metrics.csv"))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["history.csv", "logits/val.npz"], ids=["mid-training", "evaluation"])
def test_kill_9_then_the_same_command_gives_the_uninterrupted_result(run_cli, tmp_path, point):
    """SIGKILL leaves no chance to checkpoint: the rerun resumes from the last checkpoint
    (the lock dies with the process) and ends bitwise equal to a run never killed."""
    assert run_cli([*SLOW, "run_name=straight"]).returncode == 0
    run_dir = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "calibrun", *SLOW, "run_name=killed"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / point).exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    proc.kill()
    proc.wait(timeout=60)
    again = run_cli([*SLOW, "run_name=killed"])
    assert again.returncode == 0, again.stderr[-2000:]
    straight = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "straight"
    for table in ("metrics.csv", "bins.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(run_dir / table), pd.read_csv(straight / table))
    with np.load(run_dir / "logits" / "test.npz") as cut, np.load(straight / "logits" / "test.npz") as ref:
        np.testing.assert_array_equal(cut["logits"], ref["logits"])


LOSSES_WITH_LAM = sorted(p.stem for p in (Path(config_dir()) / "loss").glob("*.yaml")
                         if "lam" in yaml.safe_load(p.read_text()))


@pytest.mark.parametrize(
    ("override", "expected"),
    [("data.colour=red", ["Unknown config key 'data.colour'", "Allowed keys under 'data':", "train_size", "val_size"]),
     ("trainer.epoch=3", ["Unknown config key 'trainer.epoch'", "Did you mean 'epochs'?", "batch_size"]),
     ("calibrator=[temprature]", ["calibrator=temprature: no such option", "Did you mean 'temperature'?",
                                  ", ".join(sorted(p.stem for p in (Path(config_dir()) / "calibrator").glob("*.yaml")))]),
     ("data=cifar11", ["Did you mean 'cifar10'?", "pacs_sample"]),
     # λ with the default loss=ce: the message names the losses that have one (read from conf/loss).
     ("loss.lam=0.1", ["Unknown config key 'loss.lam'", f"loss.lam belongs to loss={', '.join(LOSSES_WITH_LAM)}",
                       f"e.g. loss={LOSSES_WITH_LAM[0]} loss.lam=..."])],
)
def test_unknown_keys_and_options_list_the_allowed_ones(run_cli, override, expected):
    proc = run_cli([*RUN, override])
    assert proc.returncode == 1
    assert all(text in proc.stderr for text in expected), proc.stderr
    assert "Traceback" not in proc.stderr and "+data.colour" not in proc.stderr


def test_group_and_hydra_overrides_that_exist_pass_the_check():
    from calibrun.compose import config_dir
    from calibrun.overrides import check_overrides

    conf = Path(config_dir())
    assert check_overrides(["-m", "experiment=table1_gap", "loss.lam=0.1,1", "seed=0,1",
                            "hydra/launcher=joblib", "shift=cifar10c", "shift.root=/x"], conf) is None


def test_without_a_progress_bar_the_log_shows_progress_and_each_calibrator(compose_cfg, tmp_path, monkeypatch, caplog):
    """A job whose stdout is a file is never silent for long: a line per HEARTBEAT_S seconds."""
    import logging

    monkeypatch.setattr(train, "HEARTBEAT_S", 0.0)
    with caplog.at_level(logging.INFO):
        train.run(compose_cfg(RUN), tmp_path / "run")
    assert "epoch 1: batch 1/8, loss" in caplog.text and "img/s" in caplog.text
    assert "Fitted temperature on 256 validation logits" in caplog.text


def test_the_progress_bar_names_the_time_left_for_the_whole_run():
    # Two epochs done in 30 s and 32 s on average 31 s; 10 left: 310 s.
    assert duration.run_eta([{"seconds": 30.0}, {"seconds": 32.0}], 10) == " (run ETA 5:10)"
    assert duration.run_eta([], 3) == ""


def test_the_expected_duration_comes_from_the_batches_after_the_warm_up(monkeypatch, caplog):
    # A clock that advances 1 s per batch after a slow first one (warm-up). The two
    # warm-up batches are left out; 10 s of timed batches: 1 s per batch. 100 batches
    # in all, 12 done: 88 s for the 8.8 epochs of 10 batches left.
    now = [0.0]
    monkeypatch.setattr(duration.time, "perf_counter", lambda: now[0])
    synced = []
    estimate = duration.DurationEstimate(100, 10, synchronize=lambda: synced.append(now[0]))
    with caplog.at_level(logging.INFO):
        for batch in range(15):
            now[0] += 50.0 if batch == 0 else 1.0
            estimate.batch_done()
        estimate.epoch_done(30.0, epochs_left=9)  # already reported: not again
    assert caplog.messages == ["Expected training time: about 88 s more, for 8.8 epoch(s) "
                               "(1 s per batch over 10 batches; validation adds to it)."]
    assert synced == [51.0, 61.0]  # the clock is read once the device's queue is done


def test_epochs_shorter_than_the_timing_window_estimate_from_the_second_epoch(caplog):
    # The first epoch holds the warm-up: the second one's time is the estimate's basis.
    estimate = duration.DurationEstimate(40, 10, synchronize=lambda: None)
    with caplog.at_level(logging.INFO):
        for epochs_left, seconds in ((3, 9000.0), (2, 3000.0), (1, 3000.0)):
            for _ in range(3):
                estimate.batch_done()
            estimate.epoch_done(seconds, epochs_left)
    assert caplog.messages == ["Expected training time: about 1.7 h more, for 2 epoch(s) (the last epoch took 50 min)."]


def test_a_run_logs_its_expected_duration(compose_cfg, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(duration, "TIMED_SECONDS", 0.0)
    with caplog.at_level(logging.INFO):
        train.run(compose_cfg(RUN), tmp_path / "run")
    assert "Expected training time: about " in caplog.text and "s per batch over 1 batches" in caplog.text
