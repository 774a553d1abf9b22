"""Interrupted runs: SIGTERM saves a checkpoint, and resuming gives the same result."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from conftest import FAST

ARGS = [*FAST, "trainer.epochs=4", "trainer.deterministic=true", "trainer.batch_size=32", "calibrator=[temperature]"]


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(run_cli, tmp_path):
    assert run_cli([*ARGS, "run_name=straight"]).returncode == 0
    run_dir = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "calibrun", *ARGS, "run_name=cut"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    history = run_dir / "history.csv"
    deadline = time.time() + 300
    while not (history.exists() and len(history.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    assert "Interrupted by SIGTERM" in out + err and "Traceback" not in out + err
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and "resume" in status["error"]
    assert (run_dir / "checkpoints" / "last.pt").is_file() and not (run_dir / "DONE").exists()

    resumed = run_cli([*ARGS, "run_name=cut"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr
    straight = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "straight"
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "metrics.csv"), pd.read_csv(straight / "metrics.csv"))
    cut_hist, straight_hist = pd.read_csv(history), pd.read_csv(straight / "history.csv")
    cols = ["epoch", "lr", "train_loss", "train_acc", "val_acc", "val_ece"]
    pd.testing.assert_frame_equal(cut_hist[cols], straight_hist[cols])


def test_best_val_selection_evaluates_the_best_epoch(run_cli, tmp_path):
    proc = run_cli([*FAST, "trainer.epochs=3", "trainer.select=best_val", "calibrator=[temperature]", "run_name=b"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "b"
    history = pd.read_csv(run_dir / "history.csv")
    best_epoch = int(history.loc[history.val_acc.idxmax(), "epoch"])
    assert f"Evaluating the weights of epoch {best_epoch}" in proc.stdout + proc.stderr
    val = pd.read_csv(run_dir / "metrics.csv").query("split == 'val' and calibrator == 'none'").iloc[0]
    assert val.accuracy == pytest.approx(history.val_acc.max())
