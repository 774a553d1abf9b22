"""A user's own loss, model, calibrator and dataset, in their own package outside
calibrun, selected from the command line with ``--config-dir`` or ``hydra.searchpath``
(docs/guide/own-components.md)."""

import importlib
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from calibrun.metrics import scores

PACKAGE = '''
import torch
from torch import nn

import calibrun
from calibrun.data import CropFlipDataset, Split

CALLS = []


class BrierLoss(nn.Module):
    """A plain nn.Module loss: no calibrun base class, no hooks."""

    def forward(self, logits, targets):
        CALLS.append(len(targets))
        probs = logits.softmax(dim=1)
        onehot = nn.functional.one_hot(targets, probs.shape[1]).to(probs.dtype)
        return ((probs - onehot) ** 2).sum(dim=1).mean()


def mlp(num_classes: int, image_size: int, hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


class Checkerboards(CropFlipDataset):
    """Two classes: a fine and a coarse checkerboard, in noise."""

    def __init__(self, num_classes: int = 2, image_size: int = 16, per_split: int = 128):
        if num_classes != 2:
            raise ValueError("data.num_classes must be 2: fine and coarse boards")
        self.num_classes, self.image_size, self.per_split = num_classes, image_size, per_split

    def splits(self):
        g = torch.Generator().manual_seed(0)
        rows = torch.arange(self.image_size)
        boards = [((rows[:, None] // cell + rows[None, :] // cell) % 2).float() for cell in (1, 4)]
        out = {}
        for offset, name in enumerate(("train", "val", "test")):
            labels = torch.arange(self.per_split) % 2
            pixels = torch.stack([boards[k] for k in labels.tolist()])[:, None].expand(-1, 3, -1, -1)
            noisy = (pixels + 0.8 * torch.randn(pixels.shape, generator=g)).clamp(0, 1)
            images = (noisy * 255).to(torch.uint8)
            out[name] = Split(images, labels, torch.arange(self.per_split) + offset * self.per_split)
        return out


class FixedTemperature(calibrun.Calibrator):
    """Divides the logits by a temperature it is given, fitting nothing."""

    def __init__(self, T: float = 2.0):
        self.T = T

    def params(self):
        return {"T": self.T}

    def _calibrated(self, z):
        return z / self.T
'''

# A short run on the synthetic data, with the model and loss left to each test.
QUICK = ["data=synthetic", "trainer=quick", "trainer.epochs=1", "trainer.batch_size=64", "trainer.progress=false",
         "metrics.resamples=100"]

CONFIGS = {
    "loss/my_brier.yaml": "_target_: my_components.BrierLoss\n",
    "model/mlp.yaml": "_target_: my_components.mlp\nnum_classes: ${data.num_classes}\n"
                      "image_size: ${data.image_size}\nhidden: 32\n",
    # A calibrator YAML holds its name, so that calibrator=[a,b] can choose several.
    "data/boards.yaml": "_target_: my_components.Checkerboards\nnum_classes: 2\nimage_size: 16\nper_split: 128\n",
    "calibrator/fixed.yaml": "fixed:\n  _target_: my_components.FixedTemperature\n  T: 2.0\n",
}


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    """``my_components.py`` and a ``my_conf/`` folder, in a folder of their own."""
    project = tmp_path / "project"
    (project / "my_components.py").parent.mkdir(parents=True)
    (project / "my_components.py").write_text(textwrap.dedent(PACKAGE))
    for name, text in CONFIGS.items():
        (project / "my_conf" / name).parent.mkdir(parents=True, exist_ok=True)
        (project / "my_conf" / name).write_text(text)
    monkeypatch.syspath_prepend(str(project))
    monkeypatch.delitem(sys.modules, "my_components", raising=False)
    yield project
    sys.modules.pop("my_components", None)


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_a_loss_model_and_calibrator_from_the_users_package_train_one_epoch(run_cli, tmp_path, user_project, how):
    conf = user_project / "my_conf"
    select = ["--config-dir", str(conf)] if how == "--config-dir" else [f"hydra.searchpath=[file://{conf}]"]
    proc = run_cli([*select, *QUICK, "loss=my_brier", "model=mlp", "model.hidden=16",
                    "calibrator=[temperature,fixed]", "run_name=mine"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "runs" / "synthetic" / "my_brier" / "mine"

    components = importlib.import_module("my_components")
    # Every training step went through the user's loss (512 training images, batch 64).
    assert sum(components.CALLS) >= 512 - 64
    weights = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert weights["1.weight"].shape == (16, 3 * 16 * 16) and weights["3.weight"].shape == (4, 16)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["loss"]["_target_"] == "my_components.BrierLoss"

    # The user's calibrator is fitted, reported and saved like calibrun's own.
    with np.load(run_dir / "logits" / "test.npz") as test:
        z, y = test["logits"].astype(np.float64), test["labels"]
    probs = np.exp(z / 2) / np.exp(z / 2).sum(1, keepdims=True)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    row = metrics[(metrics.split == "test") & (metrics.calibrator == "fixed")].iloc[0]
    assert row["ece"] == pytest.approx(scores(probs, y, 15)["ece"], abs=1e-9)
    assert (run_dir / "figures" / "reliability_fixed.png").is_file()
    assert yaml.safe_load((run_dir / "calibrators.json").read_text())["fixed"] == {"T": 2.0}


def test_the_users_options_and_keys_get_the_same_suggestions_as_calibruns(run_cli, user_project):
    conf = str(user_project / "my_conf")
    proc = run_cli(["--config-dir", conf, *QUICK, "loss=my_brierr"])
    assert proc.returncode == 1 and "loss=my_brierr: no such option. Did you mean 'my_brier'?" in proc.stderr
    proc = run_cli([f"hydra.searchpath=[file://{conf}]", *QUICK, "model=mlp", "model.hiden=8"])
    assert proc.returncode == 1 and "Did you mean 'hidden'?" in proc.stderr


def test_a_component_that_cannot_be_imported_is_a_one_line_error(run_cli, user_project, monkeypatch):
    monkeypatch.delitem(sys.modules, "my_components", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(user_project)])
    proc = run_cli(["--config-dir", str(user_project / "my_conf"), *QUICK, "loss=my_brier"])
    assert proc.returncode == 1
    assert "loss._target_='my_components.BrierLoss' cannot be imported: No module named 'my_components'" in proc.stderr
    assert "PYTHONPATH" in proc.stderr and "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "ERROR" in line]) == 1


def test_a_dataset_from_the_users_package_trains_with_calibruns_model(run_cli, tmp_path, user_project):
    """data=boards (the user's ImageDataset) with calibrun's ResNet: the run folder is
    named after it and its three splits are what was trained and evaluated on."""
    proc = run_cli(["--config-dir", str(user_project / "my_conf"), "data=boards",
                    "model=resnet110", "model.depth=8", *QUICK[1:], "calibrator=[temperature]", "run_name=b"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "runs" / "boards" / "ce" / "b"
    with np.load(run_dir / "logits" / "test.npz") as test:
        assert test["logits"].shape == (128, 2) and test["index"].min() == 256
    assert pd.read_csv(run_dir / "metrics.csv").query("split == 'test'")["n"].eq(128).all()
