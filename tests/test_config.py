import pytest

from calibrun import UserError
from calibrun.train import lr_factor, validate


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
        (["metrics.n_bins=0"], "metrics.n_bins"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(compose_cfg, overrides, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        validate(compose_cfg(overrides))


def test_lr_schedule_warmup_multistep_and_cosine(compose_cfg):
    t = validate(compose_cfg(["trainer.epochs=10", "trainer.warmup_epochs=1", "trainer.milestones=[0.5,0.8]"])).trainer
    steps = 10
    assert lr_factor(0, steps, t) == pytest.approx(0.1)
    assert lr_factor(9, steps, t) == pytest.approx(1.0)
    assert lr_factor(49, steps, t) == 1.0
    assert lr_factor(50, steps, t) == pytest.approx(0.1)
    assert lr_factor(80, steps, t) == pytest.approx(0.01)
    c = validate(compose_cfg(["trainer.epochs=10", "trainer.warmup_epochs=0", "trainer.schedule=cosine"])).trainer
    assert lr_factor(0, steps, c) == pytest.approx(1.0)
    assert lr_factor(50, steps, c) == pytest.approx(0.5)
    assert lr_factor(99, steps, c) == pytest.approx(0.5 * (1 + __import__("math").cos(__import__("math").pi * 0.99)))


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
    from hydra import compose, initialize_config_dir

    from calibrun.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["data.root=/a/b", "data.format=folder", "seed=3"])
    excluded = cfg.hydra.job.config.override_dirname.exclude_keys
    assert {"data.root", "data.cache_dir", "run_name", "trainer.device"} <= set(excluded)
