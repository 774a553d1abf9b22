"""Damaged files and impossible data: each a one-line UserError naming the file or key,
or, for the decode cache, a warning and a rebuilt cache."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import CIFAR_SAMPLE, FAST

from calibrun import UserError, train
from calibrun.config import validate
from calibrun.data import CIFAR
from calibrun.logits import load_logits

RUN = [*FAST, "calibrator=[temperature]"]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, compose_cfg_module):
    """A finished FAST run whose DONE is removed, so that running it again resumes."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    train.run(validate(compose_cfg_module(RUN)), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def compose_cfg_module():
    from hydra import compose, initialize_config_dir

    from calibrun.compose import config_dir

    def _compose(overrides):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)

    return _compose


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(b"\x80\x04random bytes, not a checkpoint"), "is unreadable"),
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "is unreadable"),
        (lambda p: torch.save({"model": {}, "epoch": 1}, p), "lacks optimizer, scheduler, rng, fingerprint"),
        (lambda p: torch.save([1, 2, 3], p), "lacks model"),
    ],
    ids=["random", "truncated", "missing-keys", "wrong-object"],
)
def test_a_damaged_checkpoint_is_named(interrupted, tmp_path, compose_cfg_module, damage, message):
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted, run_dir)
    (run_dir / "DONE").unlink()
    damage(run_dir / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match=rf"Checkpoint .*last.pt {message}.*delete it"):
        train.run(validate(compose_cfg_module(RUN)), run_dir)


@pytest.mark.parametrize(
    "damage",
    [lambda p: p.write_bytes(b"garbage"), lambda p: p.write_bytes(p.read_bytes()[:100]),
     lambda p: torch.save({"not": "images"}, p), lambda p: torch.save([torch.zeros(3)], p)],
    ids=["random", "truncated", "dict", "wrong-tensors"],
)
def test_a_damaged_decode_cache_is_rebuilt(tmp_path, caplog, damage):
    def cifar():
        return CIFAR(root=str(CIFAR_SAMPLE), format="folder", val_size=500, cache_dir=str(tmp_path / "cache"))

    first = cifar().splits()
    (cache,) = (tmp_path / "cache").glob("*.pt")
    damage(cache)
    with caplog.at_level(logging.WARNING):
        again = cifar().splits()
    assert "rebuilding it" in caplog.text and str(cache) in caplog.text
    assert torch.equal(again["train"].images, first["train"].images)
    caplog.clear()
    cifar().splits()
    assert "rebuilding" not in caplog.text, "the rebuilt cache is read the next time"


def _write(path, **arrays):
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b"not a zip"), "Cannot read logits from"),
        (lambda p: _write(p, logits=np.zeros((4, 3), np.float32)), "Cannot read logits from"),
        (lambda p: _write(p, logits=np.zeros(4), labels=np.zeros(4, int)), "'logits' must be a finite float N×K"),
        (lambda p: _write(p, logits=np.full((2, 3), np.nan), labels=np.zeros(2, int)), "'logits' must be a finite"),
        (lambda p: _write(p, logits=np.zeros((4, 3)), labels=np.zeros(3, int)), "'labels' must be 4 integers"),
        (lambda p: _write(p, logits=np.zeros((4, 3)), labels=np.full(4, 7)), r"'labels' must be 4 integers in 0..2"),
    ],
    ids=["not-zip", "no-labels", "1d", "nan", "short-labels", "label-range"],
)
def test_a_damaged_logits_file_is_named(tmp_path, make, message):
    path = tmp_path / "val.npz"
    make(path)
    with pytest.raises(UserError, match=message) as info:
        load_logits(path)
    assert str(path) in str(info.value)


def test_a_truncated_logits_file_is_named(tmp_path):
    path = tmp_path / "val.npz"
    _write(path, logits=np.random.default_rng(0).normal(size=(50, 3)), labels=np.arange(50) % 3)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match=rf"Cannot read logits from {path}"):
        load_logits(path)


def test_an_empty_class_folder_is_refused_by_name(tmp_path, compose_cfg_module):
    root = shutil.copytree(CIFAR_SAMPLE, tmp_path / "cifar")
    for image in (root / "train" / "frog").iterdir():
        image.unlink()
    cfg = validate(compose_cfg_module(["data=cifar10_sample", f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}",
                                       "model.depth=8", "trainer=quick", "trainer.epochs=1", "trainer.progress=false"]))
    with pytest.raises(UserError, match="No training image of class frog"):
        train.run(cfg, tmp_path / "run")


@pytest.mark.parametrize(("key", "value"), [("train_size", 0), ("val_size", 0), ("test_size", 0), ("image_size", 0)])
def test_impossible_sizes_name_the_key(compose_cfg_module, tmp_path, key, value):
    cfg = validate(compose_cfg_module([*RUN, f"data.{key}={value}"]))
    with pytest.raises(UserError, match=rf"data.{key} must be at least"):
        train.run(cfg, tmp_path / "run")


def test_an_empty_pacs_split_file_is_refused_by_name(tmp_path):
    from conftest import PACS_SAMPLE

    from calibrun.data import PACS

    root = shutil.copytree(PACS_SAMPLE, tmp_path / "PACS")
    (root / "cartoon_train_kfold.txt").write_text("")
    with pytest.raises(UserError, match=r"cartoon_train_kfold.txt lists no images"):
        PACS(root=str(root), target="sketch", image_size=32, cache_dir=str(tmp_path / "c")).splits()
