"""Interrupted runs: SIGTERM saves a checkpoint, and resuming gives the same result."""

import json
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CIFAR_SAMPLE, FAST

from calibrun import UserError, plots, train
from calibrun.train import Interrupted

ARGS = [*FAST, "trainer.epochs=4", "trainer.deterministic=true", "trainer.batch_size=32", "calibrator=[temperature]"]


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(run_cli, tmp_path):
    assert run_cli([*ARGS, "run_name=straight"]).returncode == 0
    # Started without run_name: its folder is named by a timestamp.
    proc = subprocess.Popen([sys.executable, "-m", "calibrun", *ARGS], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    runs = tmp_path / "outputs" / "runs" / "synthetic" / "ce"
    deadline = time.time() + 300
    def interrupted_history() -> list[Path]:
        return [h for h in runs.glob("*/history.csv") if h.parent.name != "straight"]

    while not any(len(h.read_text().splitlines()) >= 2 for h in interrupted_history()):
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]  # 143, as if killed by the signal
    assert "Interrupted by SIGTERM" in err and "Interrupted" not in out and "Traceback" not in out + err
    (history,) = interrupted_history()
    run_dir = history.parent
    # The command to resume with fixes the run_name (the default one is a timestamp).
    (printed,) = [line.split("Resume with: ", 1)[1] for line in err.splitlines() if "Resume with: " in line]
    resume_argv = shlex.split(printed)
    assert resume_argv[0] == "calibrun" and f"run_name={run_dir.name}" in resume_argv
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "interrupted" and "resume" in status["error"]
    assert status["epoch"] >= 1  # the first epoch was in history.csv before the signal
    assert (run_dir / "checkpoints" / "last.pt").is_file() and not (run_dir / "DONE").exists()

    resumed = run_cli(resume_argv[1:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr
    straight = runs / "straight"
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


# --------------------------------------------------------------------------- in-process resumes


def run_interrupted(cfg, run_dir):
    """Run in this process and send it SIGTERM once the first epoch is in history.csv:
    the loop checkpoints mid-epoch and raises Interrupted."""
    history = run_dir / "history.csv"

    def watch():
        deadline = time.time() + 300
        while not history.exists() and time.time() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)

    # A no-op handler underneath calibrun's: a signal that came too late cannot kill pytest.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        threading.Thread(target=watch, daemon=True).start()
        with pytest.raises(Interrupted):
            train.run(cfg, run_dir)
    finally:
        signal.signal(signal.SIGTERM, previous)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert state["partial"] is not None or state["epoch"] >= 1


def logits_of(run_dir):
    with np.load(run_dir / "logits" / "test.npz") as f:
        return f["logits"]


def test_resume_follows_the_data_to_a_new_root_but_not_a_new_lr(compose_cfg, tmp_path, caplog, monkeypatch):
    """data.root does not change the experiment: a run resumes after its data moves to
    a copy. trainer.lr does: resuming with another is refused."""
    old_root, new_root = tmp_path / "old", tmp_path / "new"
    shutil.copytree(CIFAR_SAMPLE, old_root)
    args = ["data=cifar10_sample", f"data.cache_dir={tmp_path / 'cache'}", "data.train_subset=300",
            "data.val_size=100", "data.test_subset=100", "model.depth=8", "trainer=quick", "trainer.epochs=3",
            "trainer.batch_size=50", "trainer.progress=false", "calibrator=[temperature]"]
    run_dir = tmp_path / "run"
    run_interrupted(compose_cfg([*args, f"data.root={old_root}"]), run_dir)
    snapshot = (run_dir / "config.yaml").read_text()
    with pytest.raises(UserError, match=r"holds a started run of another config \(.*trainer.lr: 0.05 -> 0.01"):
        train.run(compose_cfg([*args, f"data.root={old_root}", "trainer.lr=0.01"]), run_dir)
    assert (run_dir / "config.yaml").read_text() == snapshot, "a refused resume changes nothing"
    shutil.move(old_root, new_root)
    # Other images under the same config: the data's content is checked, not its location.
    changed = tmp_path / "changed"
    shutil.copytree(new_root, changed)
    cat = sorted((changed / "train" / "cat").iterdir())[0]
    for airplane in (changed / "train" / "airplane").iterdir():
        shutil.copy(cat, airplane)
    with pytest.raises(UserError, match="Refusing to resume"):
        train.run(compose_cfg([*args, f"data.root={changed}", f"data.cache_dir={tmp_path / 'cache2'}"]), run_dir)
    caplog.set_level(logging.INFO, logger="calibrun")
    monkeypatch.chdir(tmp_path)  # the root given relative to here, and another decode cache
    train.run(compose_cfg([*args, "data.root=new", f"data.cache_dir={tmp_path / 'cache3'}"]), run_dir)
    assert "Resuming from" in caplog.text and (run_dir / "DONE").is_file()
    assert len(pd.read_csv(run_dir / "history.csv")) == 3


def test_rng_state_restores_every_stream_the_loop_draws_from():
    state = train.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    train.set_rng_state(state)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


@pytest.mark.gpu
def test_rng_state_holds_and_restores_the_cuda_generators():
    """On a GPU, mixup draws its partners from the CUDA generator."""
    torch.cuda.init()
    state = train.rng_state()
    assert "cuda" in state
    first = torch.randperm(1000, device="cuda")
    train.set_rng_state(state)
    assert torch.equal(torch.randperm(1000, device="cuda"), first)


# Every loss a user can pick: the YAML files of conf/loss.
LOSSES = sorted(p.stem for p in (Path(__file__).parent.parent / "conf" / "loss").glob("*.yaml"))
# Two short epochs of 4 steps each: the cut falls in epoch 2, after a loss with state
# (AdaFocal) has learnt from epoch 1's validation.
TINY = [*FAST, "data.train_size=64", "data.val_size=64", "data.test_size=64", "trainer.batch_size=16",
        "trainer.epochs=2", "trainer.deterministic=true", "calibrator=[temperature]", "metrics.intervals=false"]
CUT_AT_STEP = 6


def run_cut_at_step(cfg, run_dir, monkeypatch):
    """Run in this process and raise SIGTERM's flag after the CUT_AT_STEP-th optimizer
    step, so the loop checkpoints mid-epoch at a known batch and raises Interrupted."""
    steps = {"done": 0}
    real_step = train.optimizer_step

    def counting_step(tr, x, y):
        result = real_step(tr, x, y)
        steps["done"] += 1
        if steps["done"] == CUT_AT_STEP:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at once, in this thread: the flag is set
        return result

    monkeypatch.setattr(train, "optimizer_step", counting_step)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with pytest.raises(Interrupted):
            train.run(cfg, run_dir)
    finally:
        signal.signal(signal.SIGTERM, previous)
        monkeypatch.setattr(train, "optimizer_step", real_step)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and state["partial"]["step"] == CUT_AT_STEP - 4


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_resumed_mid_epoch_equals_an_uninterrupted_run(compose_cfg, tmp_path, monkeypatch, loss):
    # Figures are half of such a short run's time and play no part in what is compared.
    monkeypatch.setattr(plots, "_save", lambda fig, path: plots.plt.close(fig))
    args = [*TINY, f"loss={loss}"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train.run(compose_cfg(args), straight)
    run_cut_at_step(compose_cfg(args), cut, monkeypatch)
    train.run(compose_cfg(args), cut)
    np.testing.assert_array_equal(logits_of(cut), logits_of(straight))
    pd.testing.assert_frame_equal(pd.read_csv(cut / "history.csv")[["train_loss", "val_acc", "val_ece"]],
                                  pd.read_csv(straight / "history.csv")[["train_loss", "val_acc", "val_ece"]])
