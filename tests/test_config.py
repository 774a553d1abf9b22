"""The config tree: every option of every group composes, validates and builds working
components; bad values are refused naming the key; sweep folders leave out the keys that
do not change the experiment."""

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

from calibrun import UserError
from calibrun.compose import config_dir
from calibrun.config import NON_EXPERIMENT_KEYS, validate
from calibrun.data import ImageDataset
from calibrun.optim import lr_factor

CONF = Path(config_dir())


def options(group: str) -> list[str]:
    """The options of a config group: the YAML files in its folder."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_config_composes_and_validates(compose_cfg):
    cfg = validate(compose_cfg([]))
    assert cfg.data.name == "cifar10" and cfg.model.num_classes == 10 and cfg.metrics.n_bins == 15
    assert cfg.calibrator.temperature.max_iter == 100
    assert cfg.trainer.schedule.value == "multistep"


def test_num_classes_flows_from_data_to_model(compose_cfg):
    cfg = validate(compose_cfg(["data=cifar100", "model=resnet18"]))
    assert cfg.model.num_classes == 100 and cfg.model.stem == "cifar"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+typo=1"], "Unknown config key 'typo'"),
        (["+data.colour=red"], "Unknown config key 'data.colour'. Allowed keys under 'data': name, num_classes"),
        (["trainer.epochs=many"], "'trainer.epochs'"),
        (["model.depth=deep"], "'model.depth'"),
        (["data.download=maybe"], "'data.download'"),
        (["trainer.schedule=linear"], "trainer.schedule"),
        (["trainer.lr=-1"], "trainer.lr=-1.0: must be > 0"),
        (["trainer.device=tpu"], "auto, cpu, cuda"),
        (["trainer.compile_mode=fastest"], "trainer.compile_mode=fastest: must be null, default, reduce-overhead"),
        (["metrics.n_bins=0"], "metrics.n_bins"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(compose_cfg, overrides, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        validate(compose_cfg(overrides))


def test_lr_schedule_warmup_multistep_and_cosine(compose_cfg):
    def factor(step: int, steps_per_epoch: int, t: DictConfig) -> float:
        return lr_factor(step, steps_per_epoch, t.epochs, t.schedule.value, t.milestones, t.gamma, t.warmup_epochs)

    t = validate(compose_cfg(["trainer.epochs=10", "trainer.warmup_epochs=1", "trainer.milestones=[0.5,0.8]"])).trainer
    steps = 10
    assert factor(0, steps, t) == pytest.approx(0.1)
    assert factor(9, steps, t) == pytest.approx(1.0)
    assert factor(49, steps, t) == 1.0
    assert factor(50, steps, t) == pytest.approx(0.1)
    assert factor(80, steps, t) == pytest.approx(0.01)
    c = validate(compose_cfg(["trainer.epochs=10", "trainer.warmup_epochs=0", "trainer.schedule=cosine"])).trainer
    assert factor(0, steps, c) == pytest.approx(1.0)
    assert factor(50, steps, c) == pytest.approx(0.5)
    assert factor(99, steps, c) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=gap_cap", "loss.lam=-1"], "loss.lam must be >= 0"),
        (["loss=gap_cap", "loss.cap=2"], "loss.cap must be in"),
        (["loss=label_smoothing", "loss.alpha=1"], "loss.alpha"),
        (["model.depth=51"], "6n\\+2"),
    ],
)
def test_bad_component_arguments_stop_before_any_data_is_read(compose_cfg, overrides, message):
    from calibrun.train import build

    with pytest.raises(UserError, match=message):
        build(validate(compose_cfg(["data.root=/nonexistent", *overrides])))


def test_data_paths_stay_out_of_sweep_folder_names(compose_cfg):
    """Slashes in data.root would nest a sweep's job folders."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["data.root=/a/b", "data.format=folder", "seed=3"])
    excluded = cfg.hydra.job.config.override_dirname.exclude_keys
    assert {"data.root", "data.cache_dir", "run_name", "trainer.device"} <= set(excluded)


def test_sweep_folder_names_leave_out_exactly_the_non_experiment_keys():
    """The keys that neither refuse a resume nor split a report must not name sweep folders
    either, or a requeued job would miss its folder."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True)
    excluded = cfg.hydra.job.config.override_dirname.exclude_keys
    assert set(excluded) == set(NON_EXPERIMENT_KEYS) | {"hydra/launcher", "hydra/sweeper"}


def test_a_long_sweep_folder_name_is_shortened_the_same_way_every_time():
    """Past 255 bytes a folder cannot be made; the name keeps its start and gains a hash of
    the whole, so a requeued job finds its folder and two jobs never share one."""
    from calibrun.compose import LONGEST_FOLDER_NAME, folder_name

    short = "loss=mdca,loss.beta=0.5"
    assert folder_name(short) == short
    long_a, long_b = ",".join(f"key{i}=λ{i}" for i in range(60)), ",".join(f"key{i}=λ{i}" for i in range(61))
    for name in (folder_name(long_a), folder_name(long_b)):
        assert len(name.encode()) <= LONGEST_FOLDER_NAME and name.startswith("key0=λ0,key1=λ1")
    assert folder_name(long_a) == folder_name(long_a) != folder_name(long_b)


# --- every option of every group --------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any socket connection fails the test: building a component must not download."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def compose_offline(compose_cfg, overrides: list[str]) -> DictConfig:
    """Compose and validate ``overrides`` for a CPU test: pretrained weights off (they
    would be downloaded) and images larger than 32 pixels (PACS's 222) cut to 32."""
    cfg = compose_cfg(overrides)
    small = []
    if cfg.model.get("pretrained"):
        small.append("model.pretrained=false")
    if cfg.data.get("image_size", 0) > 32:
        small.append("data.image_size=32")
    return validate(compose_cfg([*overrides, *small]))


def build_components(cfg: DictConfig) -> dict:
    """Every component of ``cfg``, built as the training loop builds it."""
    parts = {key: instantiate(cfg[key]) for key in ("data", "model", "loss", "optimizer", "scheduler")}
    parts["calibrator"] = {name: instantiate(node) for name, node in cfg.calibrator.items()}
    return parts


def check_data_and_model(cfg: DictConfig, parts: dict) -> None:
    """The dataset meets the dataset interface, and the model maps a batch of its images
    to num_classes logits."""
    data = parts["data"]  # its constructor reads nothing; splits() would
    assert isinstance(data, ImageDataset) and data.num_classes == cfg.data.num_classes
    # CIFAR configs have no image_size: CIFAR images are 32×32.
    size = cfg.data.get("image_size", 32)
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    batch = data.eval_transform(images)
    assert batch.dtype == torch.float32 and batch.shape == (2, 3, size, size)
    assert data.train_transform(images, torch.Generator().manual_seed(0)).shape == batch.shape
    with torch.no_grad():
        assert parts["model"].eval()(batch).shape == (2, cfg.data.num_classes)


def check_loss(cfg: DictConfig, parts: dict) -> None:
    """The loss goes through the loop's hooks and gives a finite scalar with a gradient."""
    loss_fn, k = parts["loss"], cfg.data.num_classes
    labels = torch.arange(6) % k
    logits = torch.randn(6, k, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss_fn.set_epoch(0)
    inputs, targets = loss_fn.mix(torch.rand(6, 3, 8, 8), labels)
    assert inputs.shape == (6, 3, 8, 8)
    loss = loss_fn(logits, targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def check_optimization(cfg: DictConfig, parts: dict) -> None:
    """The optimizer partial takes the model's parameters at trainer.lr; the scheduler
    partial takes the optimizer and steps_per_epoch and keeps the lr finite all run."""
    optimizer = parts["optimizer"](parts["model"].parameters())
    parts["scheduler"](optimizer, steps_per_epoch=2)
    assert optimizer.param_groups[0]["lr"] > 0
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(cfg.trainer.lr)
    # The whole run's schedule, stepped on one parameter to stay cheap.
    small = parts["optimizer"]([torch.nn.Parameter(torch.zeros(1))])
    scheduler = parts["scheduler"](small, steps_per_epoch=2)
    for _ in range(2 * cfg.trainer.epochs):
        small.step()
        scheduler.step()
        assert math.isfinite(small.param_groups[0]["lr"]) and small.param_groups[0]["lr"] >= 0


def check_calibrators(cfg: DictConfig, parts: dict) -> None:
    """Each calibrator fits on validation-like logits and returns probability rows."""
    k = cfg.data.num_classes
    labels = np.arange(3 * k) % k
    logits = np.random.default_rng(0).normal(size=(3 * k, k)) + 2 * np.eye(k)[labels]
    for name, calibrator in parts["calibrator"].items():
        probs = calibrator.fit(logits, labels).predict_proba(logits)
        assert probs.shape == (3 * k, k), name
        assert np.all(probs >= 0) and np.allclose(probs.sum(axis=1), 1), name


# What an option of each group can break; an experiment preset can change everything.
CHECKS = {
    "data": [check_data_and_model],
    "model": [check_data_and_model],
    "loss": [check_loss],
    "calibrator": [check_calibrators],
    "optimizer": [check_optimization],
    "scheduler": [check_optimization],
    "trainer": [check_optimization],
    "experiment": [check_data_and_model, check_loss, check_optimization, check_calibrators],
}


@pytest.mark.parametrize(("group", "name"), [(group, name) for group in CHECKS for name in options(group)])
def test_every_config_option_builds_working_components(compose_cfg, no_network, group, name):
    """Every YAML under conf/ (the Makefile's experiment presets included) composes with
    the rest of the config, validates, and builds parts that work."""
    cfg = compose_offline(compose_cfg, [f"{group}={name}"])
    parts = build_components(cfg)
    for check in CHECKS[group]:
        check(cfg, parts)


@pytest.mark.parametrize("name", options("calibrator"))
def test_each_calibrator_option_selects_the_calibrator_of_its_name(compose_cfg, name):
    """calibrator=[a,b] picks calibrators by file name, and their rows are named by key."""
    assert list(validate(compose_cfg([f"calibrator={name}"])).calibrator) == [name]
