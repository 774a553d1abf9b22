"""The captions the Makefile's reproduction targets give their tables say what ran: a
smoke run with another trainer or without pretrained weights is not captioned as the
paper's protocol."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def caption(name: str, *variables: str) -> str:
    """The value of Makefile variable ``name`` with the given ``VAR=value`` settings."""
    show = f'show: ; @echo "$({name})"'
    proc = subprocess.run(["make", "-s", "-f", "Makefile", f"--eval={show}", "show", *variables], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return proc.stdout.strip()


@pytest.mark.parametrize("name", ["pacs_caption", "pacs_vit_caption"])
def test_the_pacs_captions_state_the_protocol_when_it_ran(name):
    text = caption(name)
    assert "pretrained" in text and "scratch" not in text
    assert "trainer=jigen (lr 0.004 as in the NTS paper), the weights of the best validation epoch" in text


@pytest.mark.parametrize("name", ["pacs_caption", "pacs_vit_caption"])
def test_the_pacs_captions_of_a_smoke_run_say_what_changed(name):
    text = caption(name, "TRAINER=quick", "DATA=pacs_sample",
                   "ARGS=model.name=test_vit model.pretrained=false data.image_size=32")
    assert "trained from scratch" in text and "pretrained ResNet-18" not in text and "21k" not in text
    assert "trainer=quick in place of the protocol's trainer=jigen" in text
    assert "best validation epoch" not in text and "on data=pacs_sample" in text


def test_a_launcher_in_args_leaves_the_weights_as_they_were():
    text = caption("pacs_caption", "ARGS=hydra/launcher=joblib hydra.launcher.n_jobs=4")
    assert text.startswith("ImageNet-pretrained ResNet-18, trainer=jigen")


def test_the_vit_caption_names_the_model_and_size_that_ran():
    text = caption("pacs_vit_caption", "ARGS=model.name=test_vit data.image_size=32")
    assert "timm's test_vit (experiment=pacs_vit: ImageNet-21k pretrained, 32 px)" in text
    assert "timm's ViT-S/16 (experiment=pacs_vit: ImageNet-21k pretrained, 224 px)" in caption("pacs_vit_caption")
