"""calibrun-corrupt: the shared operations against SciPy, the determinism of the files,
the folder's layout and resume, its mistakes, and runs evaluated on what it writes."""

from __future__ import annotations

import builtins
import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAST, only_run_dir
from scipy import ndimage

from calibrun.commands.corrupt import main as corrupt_main
from calibrun.commands.evaluate import evaluate
from calibrun.corrupt import corrupt, corruptions
from calibrun.corrupt._ops import clipped_zoom, gaussian_blur, motion_blur
from calibrun.data import CorruptedCIFAR, CorruptedFolder

SAMPLE_ARGS = ["data=cifar10_sample", "subset=20", "batch_size=8"]


# ----------------------------------------------------------------------------- operations

@pytest.mark.parametrize("mode", ["nearest", "reflect", "mirror"])
@pytest.mark.parametrize("sigma", [0.4, 3.0, 12.0])  # 12: the kernel is longer than the 9-pixel side
def test_gaussian_blur_is_scipys_gaussian_filter(mode, sigma):
    x = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    ours = gaussian_blur(x, sigma, mode=mode, truncate=3.0).numpy()
    theirs = ndimage.gaussian_filter(x.numpy(), (0, 0, sigma, sigma), mode=mode, truncate=3.0)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


@pytest.mark.parametrize("factor", [1.0, 1.03, 1.75, 2.25])
def test_clipped_zoom_is_the_recipes_scipy_zoom(factor):
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    h = 32
    ch = int(np.ceil(h / factor))
    top = (h - ch) // 2
    for i in range(2):
        zoomed = ndimage.zoom(x[i, 0, top:top + ch, top:top + ch].numpy(), factor, order=1)
        trim = (zoomed.shape[0] - h) // 2
        np.testing.assert_allclose(clipped_zoom(x, factor)[i, 0].numpy(), zoomed[trim:trim + h, trim:trim + h],
                                   atol=1e-12)


def _glass_loop(x: torch.Tensor, shifts: torch.Tensor, delta: int) -> torch.Tensor:
    """The recipe's glass-blur loop as it is written, one pixel after another, image by image."""
    x = x.clone().numpy()
    n, h, w, _ = x.shape
    for b in range(n):
        for i, row in enumerate(range(h - delta, delta, -1)):
            for k, col in enumerate(range(w - delta, delta, -1)):
                dx, dy = shifts[i, k, b].tolist()
                x[b, row, col] = x[b, row + dy, col + dx]
    return torch.from_numpy(x)


@pytest.mark.parametrize("delta", [1, 2, 4])
def test_glass_blur_moves_pixels_as_the_recipes_sequential_loop(delta):
    """The pass computed at once (pointer doubling) is the loop's, chains of moved pixels included."""
    from calibrun.corrupt.blur import _moved_pixels

    rng = np.random.default_rng(delta)
    x = torch.from_numpy(rng.integers(0, 256, size=(2, 19, 23, 3), dtype=np.uint8))
    shifts = torch.from_numpy(rng.integers(-delta, delta, size=(19 - 2 * delta, 23 - 2 * delta, 2, 2)))
    expected = _glass_loop(x, shifts, delta)
    assert not torch.equal(expected, x)
    assert torch.equal(_moved_pixels(x, shifts, delta), expected)


def test_motion_blur_at_0_degrees_averages_pixels_to_the_right_by_hand():
    """Angle 0: tap i reads the pixel i columns to the right (the edge repeated), weighted
    by exp(-i²/2σ²), normalised over the 2·radius + 1 taps."""
    x = torch.arange(12, dtype=torch.float64).reshape(1, 1, 1, 12).expand(1, 3, 1, 12).contiguous()
    weights = np.exp(-np.arange(3) ** 2 / 2.0)
    weights /= weights.sum()
    expected = [sum(w * min(col + i, 11) for i, w in enumerate(weights)) for col in range(12)]
    np.testing.assert_allclose(motion_blur(x, 1, 1.0, np.array([0.0]))[0, 0, 0].numpy(), expected, atol=1e-12)


def test_the_same_seed_gives_the_same_images_and_another_seed_other_ones():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    for name, corruption in corruptions().items():
        first, again = corrupt(images, name, 3, seed=7), corrupt(images, name, 3, seed=7)
        assert torch.equal(first, again), name
        assert torch.equal(first, corrupt(images, name, 3, seed=8)) != corruption.random, name


def test_corrupt_refuses_what_it_cannot_do():
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(Exception, match="unknown 'smog'; choose from gaussian_noise"):
        corrupt(images, "smog", 1)
    with pytest.raises(Exception, match="severity=6"):
        corrupt(images, "fog", 6)
    with pytest.raises(Exception, match="uint8 N×3×H×W"):
        corrupt(images.float(), "fog", 1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_makes_the_images_the_cpu_makes():
    """Draws come from NumPy on the CPU: the device changes only float rounding."""
    pytest.importorskip("cv2", reason="the [corrupt] extra (OpenCV) is not installed on this GPU machine")
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    for name in corruptions():
        cpu, gpu = corrupt(images, name, 5, seed=3), corrupt(images.cuda(), name, 5, seed=3).cpu()
        assert (cpu.int() - gpu.int()).abs().max() <= 1, name


# ----------------------------------------------------------------------------- the folder

def test_the_sample_in_the_layout_of_cifar_10_c(tmp_path, caplog):
    """All 19 corruptions at 5 severities, read back by the reader of the official release."""
    caplog.set_level(logging.INFO)
    out = tmp_path / "c"
    corrupt_main([*SAMPLE_ARGS, f"out={out}"])
    record = json.loads((out / "corrupt.json").read_text())
    assert record["done"] == list(corruptions()) and record["recipe"] == "cifar" and record["n"] == 20
    labels = np.load(out / "labels.npy")
    assert labels.shape == (100,) and (labels.reshape(5, 20) == labels[:20]).all()
    blocks = list(CorruptedCIFAR(root=str(out), corruptions=list(corruptions())).sets())
    assert len(blocks) == 19 * 5
    assert all(split.images.shape == (20, 3, 32, 32) and split.images.dtype == torch.uint8 for *_, split in blocks)
    assert "calibrun-evaluate RUN shift=cifar10c shift.root=" in caplog.text


def test_a_folder_resumes_and_gives_the_same_bytes(tmp_path):
    """A corruption deleted (as if the run had been killed while writing it) is made again,
    byte for byte; the others are kept; the batch's draws do not depend on the order."""
    out = tmp_path / "c"
    args = [*SAMPLE_ARGS, "corruptions=[fog,glass_blur]", f"out={out}"]
    corrupt_main(args)
    fog, glass = (out / "fog.npy").read_bytes(), (out / "glass_blur.npy").read_bytes()
    (out / "glass_blur.npy").unlink()
    stamp = (out / "fog.npy").stat().st_mtime_ns
    corrupt_main(args)
    assert (out / "glass_blur.npy").read_bytes() == glass and (out / "fog.npy").stat().st_mtime_ns == stamp
    alone = tmp_path / "alone"
    corrupt_main([*SAMPLE_ARGS, "corruptions=[fog]", f"out={alone}"])
    assert (alone / "fog.npy").read_bytes() == fog


@pytest.mark.parametrize("args, message", [
    (["seed=1"], "holds corruptions made with other settings (seed 0 there, 1 now)"),
    (["corruptions=[smog]"], "unknown 'smog'"),
    (["severities=[0,2]"], "severities=[0, 2]: give distinct severities from 1-5"),
    (["recipe=tiny"], "recipe=tiny: choose from auto, cifar, imagenet"),
    (["data=synthetic"], "recipe=auto: the constants were published for 32×32"),
    (["batch_size=0"], "batch_size=0 must be at least 1"),
    (["colour=red"], "calibrun-corrupt: Could not override 'colour'"),
])
def test_mistakes_are_one_line(tmp_path, caplog, capsys, args, message):
    out = tmp_path / "c"
    corrupt_main([*SAMPLE_ARGS, "corruptions=[contrast]", f"out={out}"])
    with pytest.raises(SystemExit) as exit_:
        corrupt_main([*SAMPLE_ARGS, "corruptions=[contrast]", f"out={out}", *args])
    assert exit_.value.code == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and message in errors[0], errors
    assert "Traceback" not in capsys.readouterr().err


def test_without_opencv_the_error_names_the_extra(tmp_path, monkeypatch, caplog):
    real_import = builtins.__import__

    def no_cv2(name, *args, **kwargs):
        if name == "cv2":
            raise ImportError("No module named 'cv2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cv2)
    with pytest.raises(SystemExit):
        corrupt_main([*SAMPLE_ARGS, f"out={tmp_path / 'c'}"])
    assert "pip install 'calibrun[corrupt]'" in caplog.text


def test_a_subset_of_severities_is_read_by_shift_corrupted(tmp_path):
    out = tmp_path / "c"
    corrupt_main([*SAMPLE_ARGS, "corruptions=[contrast]", "severities=[5,2]", f"out={out}"])
    folder = CorruptedFolder(root=str(out))
    assert folder.num_classes == 10 and folder.image_shape == (32, 32)
    blocks = {(c, s): split for c, s, split in folder.sets()}
    assert set(blocks) == {("contrast", 2), ("contrast", 5)}
    stored = np.load(out / "contrast.npy")
    assert np.array_equal(blocks["contrast", 5].images.permute(0, 2, 3, 1).numpy(), stored[20:])
    # The images are the test split's, in the order index.npy gives.
    assert torch.equal(blocks["contrast", 2].index, torch.from_numpy(np.load(out / "index.npy")))
    with pytest.raises(Exception, match=r"shift.severities: \[1\] not among \[2, 5\]"):
        list(CorruptedFolder(root=str(out), severities=[1]).sets())


# ----------------------------------------------------------------------------- evaluated

def test_a_run_is_evaluated_on_a_folder_calibrun_corrupt_made(run_cli, tmp_path):
    """Any dataset (here the synthetic 16×16 one, with the CIFAR constants): shift=corrupted."""
    assert run_cli([*FAST, "calibrator=[temperature]"]).returncode == 0
    run_dir = only_run_dir(tmp_path)
    out = tmp_path / "synthetic-c"
    corrupt_main(["data=synthetic", "recipe=cifar", "corruptions=[contrast,gaussian_noise]", f"out={out}"])
    evaluate([str(run_dir), "shift=corrupted", f"shift.root={out}"])
    table = pd.read_csv(run_dir / "shift" / "metrics.csv")
    assert set(zip(table["corruption"], table["severity"])) == {(c, s) for c in ("contrast", "gaussian_noise")
                                                                for s in range(1, 6)}
    assert (table["n"] == 256).all()
    assert np.isfinite(table[["accuracy", "ece", "nll"]].to_numpy()).all()
    assert (run_dir / "shift" / "figures" / "severity_boxes.png").is_file()


def test_pacs_c_with_the_imagenet_constants_is_evaluated(run_cli, tmp_path):
    """The PACS sample's held-out domain at its cached size, the 224-pixel constants."""
    data = ["data=pacs_sample", "data.image_size=32"]
    assert run_cli([*data, "model=resnet18", "model.stem=imagenet", "model.pretrained=false", "trainer=quick",
                    "trainer.epochs=1", "trainer.batch_size=8", "trainer.progress=false",
                    "metrics.resamples=100", "calibrator=[temperature]"]).returncode == 0
    run_dir = only_run_dir(tmp_path)
    out = tmp_path / "pacs-c"
    corrupt_main([*data, "recipe=imagenet", "corruptions=[frost,zoom_blur,spatter]", f"out={out}"])
    record = json.loads((out / "corrupt.json").read_text())
    assert record["recipe"] == "imagenet" and record["num_classes"] == 7 and record["image_shape"] == [33, 33]
    evaluate([str(run_dir), "shift=corrupted", f"shift.root={out}"])
    table = pd.read_csv(run_dir / "shift" / "metrics.csv")
    assert len(table) == 3 * 5 * 2 and (table["n"] == 10).all()
    assert math.isclose(table["accuracy"].between(0, 1).mean(), 1.0)
