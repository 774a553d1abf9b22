"""What only a CUDA GPU can check (``make test-gpu``; every test here is marked ``gpu`` and
deselected by ``make test``): bf16 training with channels_last and torch.compile,
interrupt and resume on CUDA, mixup's CUDA random stream, PACS augmentation on the
device, and the calibrators on logits of a GPU run."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST
from test_resume import logits_of, run_interrupted

from calibrun import train
from calibrun.config import build_component, validate
from calibrun.data.augment import jigen_augment
from calibrun.duration import DurationEstimate
from calibrun.metrics import accuracy

pytestmark = pytest.mark.gpu

# The CUDA path as a user gets it: bf16 autocast and channels_last are the trainer's defaults.
CUDA = [*FAST, "trainer.device=cuda", "trainer.amp=true", "trainer.channels_last=true", "trainer.batch_size=32",
        "calibrator=[temperature]"]


def test_deterministic_resume_on_cuda_is_bitwise_identical(compose_cfg, tmp_path):
    """trainer.deterministic=true: cuDNN's deterministic kernels, a fixed cuBLAS workspace
    and plain-mean pooling make an interrupted and resumed run equal, bit for bit, to a
    run that was never interrupted."""
    args = [*CUDA, "trainer.deterministic=true", "trainer.epochs=3"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train.run(compose_cfg(args), straight)
    run_interrupted(compose_cfg(args), cut)
    train.run(compose_cfg(args), cut)
    np.testing.assert_array_equal(logits_of(cut), logits_of(straight))
    pd.testing.assert_frame_equal(pd.read_csv(cut / "metrics.csv"), pd.read_csv(straight / "metrics.csv"))


def test_default_resume_on_cuda_stays_within_tolerance(compose_cfg, tmp_path):
    """Without trainer.deterministic, cudnn.benchmark may pick other kernels after the
    restart: the resumed run is the same experiment, within 0.05 test accuracy and a
    mean absolute logit difference below 10% of the logits' spread."""
    args = [*CUDA, "trainer.epochs=3"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train.run(compose_cfg(args), straight)
    run_interrupted(compose_cfg(args), cut)
    train.run(compose_cfg(args), cut)
    a, b = logits_of(straight), logits_of(cut)
    assert np.abs(a - b).mean() < 0.1 * a.std()
    with np.load(straight / "logits" / "test.npz") as f:
        labels = f["labels"]
    probs = [torch.softmax(torch.from_numpy(z).double(), 1).numpy() for z in (a, b)]
    assert abs(accuracy(probs[0], labels) - accuracy(probs[1], labels)) <= 0.05


def test_mixup_resume_on_cuda_draws_the_same_partners(compose_cfg, tmp_path):
    """Mixup's partners and weights come from the CUDA generator, which the checkpoint
    carries: a deterministic resumed run equals the uninterrupted one."""
    args = [*CUDA, "trainer.deterministic=true", "trainer.epochs=3", "loss=mixup"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train.run(compose_cfg(args), straight)
    run_interrupted(compose_cfg(args), cut)
    train.run(compose_cfg(args), cut)
    np.testing.assert_array_equal(logits_of(cut), logits_of(straight))


def test_compiled_channels_last_model_matches_eager(compose_cfg, tmp_path):
    """torch.compile on a channels_last model gives the eager model's float32 outputs, and
    a whole run with trainer.compile=true finishes with finite tables."""
    cfg = validate(compose_cfg([*CUDA, "trainer.compile=true", "trainer.epochs=1"]))
    model = build_component(cfg.model, "model").cuda().to(memory_format=torch.channels_last).eval()
    x = torch.randn(64, 3, 16, 16, device="cuda").to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)
    train.run(cfg, tmp_path / "run")
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert np.isfinite(metrics.select_dtypes("number").to_numpy()).all()


def test_pacs_augmentation_on_the_device_matches_the_cpu():
    """With every random choice pinned (full crop, flip, no jitter, no grayscale), JiGen's
    augmentation computes the same pixels on CUDA as on the CPU; with the same seed it
    draws the same batch twice on CUDA (what a resumed run relies on)."""
    images = torch.randint(0, 256, (8, 3, 227, 227), dtype=torch.uint8)
    pinned = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0, jitter=(0.0, 0.0, 0.0, 0.0), grayscale_p=0.0)
    cpu = jigen_augment(images, 222, torch.Generator().manual_seed(0), **pinned)
    gpu = jigen_augment(images.cuda(), 222, torch.Generator("cuda").manual_seed(0), **pinned)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-3)
    draws = [jigen_augment(images.cuda(), 222, torch.Generator("cuda").manual_seed(5)) for _ in range(2)]
    assert torch.equal(*draws) and draws[0].is_cuda


def test_pacs_sample_trains_on_the_gpu(run_cli, tmp_path):
    proc = run_cli(["data=pacs_sample", "model=resnet18", "model.stem=imagenet", "trainer=quick",
                    "trainer.epochs=2", "trainer.batch_size=16", "trainer.device=cuda", "trainer.progress=false",
                    "run_name=gpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "runs" / "pacs_sample" / "ce" / "gpu"
    assert (run_dir / "DONE").is_file() and (run_dir / "figures" / "training_curves.png").is_file()


def test_every_calibrator_fits_the_logits_of_a_gpu_run(run_cli, tmp_path):
    """All six calibrators on float32 logits a bf16 GPU run saved: finite rows, and each
    NLL-fitted one no worse than the uncalibrated model on the split it was fitted on."""
    proc = run_cli([*CUDA[:-1], "trainer.epochs=3", "run_name=cal"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = pd.read_csv(tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "cal" / "metrics.csv")
    assert set(metrics.calibrator) == {"none", "temperature", "vector", "matrix", "platt", "histogram", "isotonic"}
    assert np.isfinite(metrics.select_dtypes("number").to_numpy()).all()
    val = metrics[metrics.split == "val"].set_index("calibrator")
    for name in ("temperature", "vector", "matrix"):
        assert val.loc[name, "nll"] <= val.loc["none", "nll"] + 1e-9


def sync_warnings_in_an_epoch(compose_cfg, run_dir, train_size: int) -> int:
    """How many host synchronisations CUDA reports in one training epoch (after a warm-up
    epoch), with the progress bar off."""
    cfg = validate(compose_cfg([*CUDA, f"data.train_size={train_size}", "trainer.epochs=2"]))
    tr, _, _ = train.prepare(cfg, run_dir)
    progress = train.Progress()
    # As in train.fit: the estimate's timing (two synchronisations) ends with the first epoch.
    estimate = DurationEstimate(2 * len(tr.train_loader), len(tr.train_loader), torch.cuda.synchronize)
    with train.SignalFlag(defer=True) as flag:
        train.train_epoch(tr, 0, progress, flag, None, estimate)
        estimate.epoch_done(0.0, epochs_left=1)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train.train_epoch(tr, 1, progress, flag, None, estimate)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_no_host_synchronisation_per_batch(compose_cfg, tmp_path):
    """Twice the batches, the same number of synchronisations: the loop waits for the GPU
    once per epoch (its loss and accuracy sums), never once per batch."""
    few = sync_warnings_in_an_epoch(compose_cfg, tmp_path / "few", 256)
    many = sync_warnings_in_an_epoch(compose_cfg, tmp_path / "many", 512)
    assert many == few, (few, many)
