"""Every dataset config under conf/data builds an object that meets the interface the
training loop relies on: ``num_classes``, ``splits()`` and the two transforms."""

from pathlib import Path

import pytest
import torch
from conftest import REPO
from hydra.utils import instantiate
from omegaconf import OmegaConf

from calibrun.data import ImageDataset, Split

DATA_CONFIGS = sorted(p.stem for p in (REPO / "conf" / "data").glob("*.yaml"))


def readable_offline(name: str) -> bool:
    """A config serves its splits offline when it downloads nothing and its root (if it
    has one) is there: the bundled samples and synthetic data, not the full datasets
    on a fresh clone, whose construction alone is checked."""
    from hydra import compose, initialize_config_dir

    from calibrun.compose import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        data = compose(config_name="config", overrides=[f"data={name}"]).data
    data = OmegaConf.to_container(data, resolve=True)
    return not data.get("download", False) and Path(data.get("root", ".")).is_dir()


OFFLINE_CONFIGS = [name for name in DATA_CONFIGS if readable_offline(name)]


def test_the_dataset_configs_are_found():
    # Guards the glob and the offline rule: a wrong folder or rule would leave the
    # parametrised tests below with nothing to run.
    assert {"cifar10", "pacs", "cifar10_sample", "pacs_sample", "synthetic"} <= set(DATA_CONFIGS)
    assert {"cifar10_sample", "pacs_sample", "synthetic"} <= set(OFFLINE_CONFIGS)


@pytest.mark.parametrize("name", DATA_CONFIGS)
def test_config_builds_an_image_dataset(compose_cfg, name):
    cfg = compose_cfg([f"data={name}"])
    data = instantiate(cfg.data)
    assert isinstance(data, ImageDataset)
    assert data.num_classes == cfg.data.num_classes and data.num_classes >= 2


@pytest.mark.parametrize("name", OFFLINE_CONFIGS)
def test_offline_config_serves_splits_the_loader_can_batch(compose_cfg, name):
    data = instantiate(compose_cfg([f"data={name}"]).data)
    splits = data.splits()
    assert set(splits) == {"train", "val", "test"}
    for split in splits.values():
        assert isinstance(split, Split) and len(split) > 0 and len(split.index) == len(split)
        assert split.images.dtype == torch.uint8 and split.images.ndim == 4 and split.images.shape[1] == 3
        assert split.labels.dtype == torch.int64
        assert 0 <= split.labels.min() and split.labels.max() < data.num_classes
    batch = splits["train"].images[:8]
    trained = data.train_transform(batch, torch.Generator().manual_seed(0))
    evaluated = data.eval_transform(splits["test"].images[:8])
    assert trained.dtype == evaluated.dtype == torch.float32
    # The model sees one input size in training and in evaluation.
    assert trained.shape == evaluated.shape and trained.shape[:2] == (8, 3)
    # The same generator state gives the same augmentation, which resuming a run relies on.
    assert torch.equal(trained, data.train_transform(batch, torch.Generator().manual_seed(0)))
