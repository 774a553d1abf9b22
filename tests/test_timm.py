"""``model=timm``: any timm model, built offline from the data config (issue 15)."""

from __future__ import annotations

import sys

import pandas as pd
import pytest
import timm
import torch
import yaml
from omegaconf import OmegaConf

from calibrun import UserError
from calibrun.config import build_component, validate
from calibrun.data.pacs import PACS
from calibrun.models import Renormalize, timm_model

# timm's own test models: a few hundred thousand parameters, built without weights.
TINY_VIT, TINY_CNN = "test_vit", "test_resnet"


def build(compose_cfg, overrides):
    cfg = validate(compose_cfg(["model=timm", *overrides]))
    return cfg, build_component(cfg.model, "model")


@pytest.mark.parametrize("name", [TINY_VIT, TINY_CNN])
def test_the_data_config_sets_classes_and_input_size(compose_cfg, name):
    """A ViT is built for the data's image size (16 px for data=synthetic, 32 for CIFAR,
    which states none); a CNN, which takes no img_size, for any size."""
    cfg, model = build(compose_cfg, ["data=synthetic", f"model.name={name}"])
    assert cfg.model.image_size == 16 and cfg.model.num_classes == 4
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 4)
    cfg, model = build(compose_cfg, ["data=cifar10", f"model.name={name}"])
    assert cfg.model.image_size == 32
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    if name == TINY_VIT:
        assert model.patch_embed.img_size == (32, 32)


def test_options_reach_timm_create_model(compose_cfg):
    _, model = build(compose_cfg, ["data=synthetic", f"model.name={TINY_VIT}", "+model.options.depth=1"])
    assert len(model.blocks) == 1


def test_an_unknown_name_is_an_error_with_suggestions(compose_cfg):
    cfg = validate(compose_cfg(["model=timm", "data=synthetic", "model.name=vit_smal_patch16_224"]))
    with pytest.raises(UserError, match="'vit_smal_patch16_224' is not a timm model. Did you mean vit_small_patch16_224"):
        build_component(cfg.model, "model")


def test_without_timm_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ValueError, match=r"pip install 'calibrun\[timm\]'"):
        timm_model(TINY_VIT, num_classes=3)


def test_pretrained_weights_offline_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="model.pretrained=false"):
        timm_model(TINY_VIT, num_classes=3, image_size=32, pretrained=True)


def test_renormalize_maps_one_standardisation_onto_another():
    pixels = torch.rand(2, 3, 4, 4)
    mean_in, std_in, mean_out, std_out = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25], [0.5] * 3, [0.5] * 3
    column = lambda v: torch.tensor(v).view(1, 3, 1, 1)  # noqa: E731
    x_in = (pixels - column(mean_in)) / column(std_in)
    expected = (pixels - column(mean_out)) / column(std_out)
    assert torch.allclose(Renormalize(mean_in, std_in, mean_out, std_out)(x_in), expected, atol=1e-6)


def test_pretrained_weights_get_inputs_standardised_as_they_were_trained(monkeypatch):
    """With pretrained weights and the data's statistics, a Renormalize layer leads to the
    statistics of the weights (timm's pretrained_cfg); the download itself is faked."""
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained, **kw: create(name, pretrained=False, **kw))
    model = timm_model(TINY_VIT, num_classes=3, image_size=32, pretrained=True,
                       input_mean=list(PACS.mean), input_std=list(PACS.std))
    first, vit = model
    assert isinstance(first, Renormalize) and vit.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    # Without pretrained weights there is nothing to match.
    assert not isinstance(timm_model(TINY_VIT, 3, 32, False, list(PACS.mean), list(PACS.std)), torch.nn.Sequential)


def test_the_pacs_vit_preset_states_pacs_statistics(compose_cfg):
    cfg = compose_cfg(["experiment=pacs_vit"])
    assert tuple(cfg.model.input_mean) == PACS.mean and tuple(cfg.model.input_std) == PACS.std
    assert cfg.data.image_size == 224 and cfg.model.pretrained and timm.is_model(cfg.model.name)


def test_a_tiny_timm_model_trains_one_epoch_on_the_pacs_sample(run_cli, tmp_path):
    """Done-when 4 of issue 15: model=timm end to end on the bundled PACS images."""
    proc = run_cli(["data=pacs_sample", "model=timm", f"model.name={TINY_VIT}", "data.image_size=32",
                    "trainer=quick", "trainer.epochs=1", "trainer.batch_size=8", "trainer.progress=false",
                    "calibrator=[temperature]", "run_name=vit"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "runs" / "pacs_sample" / "ce" / "vit"
    assert (run_dir / "DONE").is_file()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["name"] == TINY_VIT and config["model"]["num_classes"] == 7
    weights = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert "patch_embed.proj.weight" in weights and weights["head.weight"].shape[0] == 7
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert set(metrics.calibrator) == {"none", "temperature"} and metrics["n"].gt(0).all()
    assert OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices.model == "timm"
