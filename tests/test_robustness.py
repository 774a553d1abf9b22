"""Evaluation on shifted and out-of-distribution images (calibrun.robustness): the rows
agree with the model run directly, nothing is refitted, and finished work is skipped."""

from __future__ import annotations

from pathlib import Path

import shutil

import json

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from conftest import FAST

from calibrun import UserError
from calibrun.commands.evaluate import evaluate
from calibrun.compose import config_dir
from calibrun.config import build_component, validate
from calibrun.data import Split
from calibrun.detection import SCORES, detection_metrics
from calibrun.calibrators import Calibrator, Uncalibrated
from calibrun.calibration import build_calibrators, load_calibrators
from calibrun.logits import load_logits
from calibrun.metrics import METRIC_NAMES
from calibrun.metrics import scores as metrics_evaluate
from calibrun import conformal
from calibrun.calibration import Decisions, recalibrate
from calibrun.runfolder import run_config
from calibrun.robustness import evaluate_beyond_test, evaluate_ood, evaluate_shift, evaluation_config, trained_predictor
from calibrun.train import run

CALIBRATORS = "calibrator=[temperature,isotonic]"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, compose_cfg_module):
    """A finished FAST run on the synthetic data: (run folder, its validated config)."""
    run_dir = tmp_path_factory.mktemp("robustness") / "run"
    cfg = validate(compose_cfg_module([*FAST, CALIBRATORS, "run_name=r"]))
    run(cfg, run_dir)
    return run_dir, cfg


@pytest.fixture(scope="module")
def compose_cfg_module():
    from hydra import compose, initialize_config_dir

    def _compose(overrides):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)

    return _compose


class FakeCorruptions:
    """The synthetic test images under growing noise: 2 corruptions x 2 severities."""

    name, num_classes = "fake_c", 4

    def __init__(self, test: Split) -> None:
        self.test, self.calls = test, 0

    def block(self, corruption: str, severity: int) -> Split:
        g = torch.Generator().manual_seed(severity * 10 + len(corruption))
        noise = torch.randn(self.test.images.shape, generator=g) * 30 * severity
        images = (self.test.images.float() + noise).clamp(0, 255).to(torch.uint8)
        return Split(images, self.test.labels, self.test.index)

    def sets(self):
        for corruption in ("noise", "more_noise"):
            for severity in (1, 2):
                self.calls += 1
                yield corruption, severity, self.block(corruption, severity)


class FakeOOD:
    name = "uniform_noise"

    def split(self) -> Split:
        g = torch.Generator().manual_seed(0)
        return Split(torch.randint(0, 256, (200, 3, 16, 16), dtype=torch.uint8, generator=g),
                     torch.zeros(200, dtype=torch.long), torch.arange(200))


def refitted_calibrators(run_dir, cfg) -> dict[str, Calibrator]:
    """``none`` and the run's calibrators fitted again on its ``logits/val.npz``: what
    the shift/OOD evaluation used before it loaded ``calibrators.json``."""
    z, y = load_logits(run_dir / "logits" / "val.npz")
    return {name: c.fit(z, y) for name, c in {"none": Uncalibrated(), **build_calibrators(cfg.calibrator)}.items()}


def _direct_probs(run_dir, cfg, images: torch.Tensor, calibrator: str, fitted: dict | None = None) -> np.ndarray:
    """The model run on ``images`` in one batch, then the calibrator of ``fitted`` (default:
    fitted again on val)."""
    data = build_component(cfg.data, "data")
    model = build_component(cfg.model, "model")
    model.load_state_dict(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"])
    with torch.no_grad():
        logits = model.eval()(data.eval_transform(images)).numpy()
    return (fitted or refitted_calibrators(run_dir, cfg))[calibrator].predict_proba(logits)


def _calibrator_classes(base: type = Calibrator) -> list[type]:
    return [cls for sub in base.__subclasses__() for cls in (sub, *_calibrator_classes(sub))]


def test_the_evaluation_loads_the_fitted_calibrators_and_fits_none(trained, tmp_path, monkeypatch):
    """calibrun-evaluate applies calibrators.json: no calibrator is fitted, and its rows
    equal those of calibrators fitted again on val (the earlier behaviour) to 1e-12."""
    run_dir, cfg = trained
    refitted = refitted_calibrators(run_dir, cfg)
    before = evaluate_ood(shutil.copytree(run_dir, tmp_path / "refit"), FakeOOD(), trained_predictor(run_dir, cfg),
                          refitted, cfg.metrics.n_bins)
    for cls in _calibrator_classes():
        monkeypatch.setattr(cls, "fit", lambda *args, **kwargs: pytest.fail("a calibrator was fitted"))
    used = {}
    monkeypatch.setattr("calibrun.robustness.evaluate_ood", lambda *args: used.update(args[3]))
    with_ood = OmegaConf.merge(cfg, {"ood": OmegaConf.load(Path(config_dir()) / "ood" / "svhn.yaml")})
    evaluate_beyond_test(run_dir, with_ood, trained_predictor(run_dir, cfg))
    assert set(used) == set(refitted)
    after = evaluate_ood(shutil.copytree(run_dir, tmp_path / "loaded"), FakeOOD(), trained_predictor(run_dir, cfg),
                         used, cfg.metrics.n_bins)
    pd.testing.assert_frame_equal(after, before, check_exact=False, atol=1e-12, rtol=0)


def test_a_shift_row_equals_the_metrics_of_the_model_run_directly(trained):
    run_dir, cfg = trained
    shift = FakeCorruptions(build_component(cfg.data, "data").splits()["test"])
    table = evaluate_shift(run_dir, shift, trained_predictor(run_dir, cfg),
                           load_calibrators(run_dir), cfg.metrics.n_bins)
    # The selective risks at conf/config.yaml's metrics.coverages; no conformal sets by default.
    assert list(table.columns) == ["corruption", "severity", "calibrator", *METRIC_NAMES, "n",
                                   "risk_at_80", "risk_at_90", "risk_at_95"]
    assert len(table) == 2 * 2 * 3  # corruptions x severities x {none, temperature, isotonic}
    on_disk = pd.read_csv(run_dir / "shift" / "metrics.csv")
    for calibrator in ("none", "temperature"):
        row = on_disk[(on_disk.corruption == "more_noise") & (on_disk.severity == 2) & (on_disk.calibrator == calibrator)]
        block = shift.block("more_noise", 2)
        expected = metrics_evaluate(_direct_probs(run_dir, cfg, block.images, calibrator), block.labels.numpy())
        for metric, value in expected.items():
            assert row[metric].iloc[0] == pytest.approx(value, abs=1e-6), metric
    figures = run_dir / "shift" / "figures"
    assert (figures / "severity_boxes.png").is_file()
    assert {p.name for p in figures.glob("reliability_*.png")} == {
        f"reliability_severity{s}_{c}.png" for s in (1, 2) for c in ("none", "temperature", "isotonic")}


def test_shift_sets_use_the_clean_quantile_and_severity_gets_its_figures(trained, tmp_path):
    """With metrics.conformal=true the shifted rows hold each method's set coverage and
    size at the quantile of conformal.json, made on clean validation images and never
    recomputed; shift/metrics.md and a risk–coverage figure per severity are written."""
    run_dir, cfg = trained
    run_dir = shutil.copytree(run_dir, tmp_path / "sets")
    recalibrate(run_dir, ["metrics.conformal=true", "metrics.conformal_share=0.4"], Path(config_dir()))
    record = json.loads((run_dir / "conformal.json").read_text())
    cfg = run_config(run_dir)
    shift = FakeCorruptions(build_component(cfg.data, "data").splits()["test"])
    evaluate_shift(run_dir, shift, trained_predictor(run_dir, cfg), load_calibrators(run_dir), cfg.metrics.n_bins,
                   Decisions.of_run(run_dir, cfg))
    table = pd.read_csv(run_dir / "shift" / "metrics.csv")
    row = table[(table.corruption == "noise") & (table.severity == 2) & (table.calibrator == "temperature")].iloc[0]
    block = shift.block("noise", 2)
    probs = _direct_probs(run_dir, cfg, block.images, "temperature", load_calibrators(run_dir))
    settings = conformal.Settings(**{k: record[k] for k in ("alpha", "share", "seed", "raps_lambda", "raps_k_reg")})
    for method in ("lac", "aps", "raps"):
        u = np.random.default_rng([settings.seed, 1]).random(len(probs))
        sets = conformal.label_scores(probs, method, u, settings.raps_lambda, settings.raps_k_reg) \
            <= record["quantiles"]["temperature"][method]
        assert row[f"set_coverage_{method}"] == pytest.approx(conformal.coverage(sets, block.labels.numpy()), abs=1e-9)
        assert row[f"set_size_{method}"] == pytest.approx(conformal.mean_set_size(sets), abs=1e-9)
    summary = (run_dir / "shift" / "metrics.md").read_text()
    rows = [line for line in summary.splitlines() if line.startswith("|")][2:]
    # The clean split as severity 0, then both severities, each with none and the two calibrators.
    assert [line.split("|")[1].strip() for line in rows] == ["0"] * 3 + ["1"] * 3 + ["2"] * 3
    assert "set_coverage_aps" in summary
    assert {p.name for p in (run_dir / "shift" / "figures").glob("risk_coverage_*.png")} == {
        "risk_coverage_severity1.png", "risk_coverage_severity2.png"}


@pytest.mark.parametrize("collapsed", [True, False])
def test_the_shift_summary_of_a_collapsed_run_says_so(collapsed, tmp_path):
    """shift/metrics.md carries the run's own collapse flag (metrics.csv, read back as
    written), so that its numbers under shift are not taken for a result."""
    from calibrun.robustness import severity_summary

    written = pd.DataFrame({"split": ["test", "test"], "calibrator": ["none", "temperature"], "accuracy": [0.11, 0.11],
                            "ece": [0.5, 0.1], "nll": [3.0, 2.3], "aurc": [0.9, 0.9], "augrc": [0.5, 0.5],
                            "collapsed": collapsed})
    written.to_csv(tmp_path / "metrics.csv", index=False)
    clean = pd.read_csv(tmp_path / "metrics.csv")
    table = written.drop(columns=["split", "collapsed"]).assign(corruption="fog", severity=1)
    summary = severity_summary(table, Decisions(), clean, (0.325, 0.25))
    assert ("**Collapsed run: test accuracy 0.1100 is below 0.3250" in summary) == collapsed
    rows = [line for line in summary.splitlines() if line.startswith("|")][2:]
    assert [line.split("|")[1].strip() for line in rows] == ["0", "0", "1", "1"]


def test_shift_never_refits_and_skips_what_is_written(trained):
    run_dir, cfg = trained
    test = build_component(cfg.data, "data").splits()["test"]
    calibrators = load_calibrators(run_dir)
    temperature = calibrators["temperature"].temperature
    predictor = trained_predictor(run_dir, cfg)
    first = evaluate_shift(run_dir, FakeCorruptions(test), predictor, calibrators, cfg.metrics.n_bins)
    assert calibrators["temperature"].temperature == temperature, "the calibrators are never refitted"
    calls = []
    predictor.logits = lambda split: calls.append(split) or (_ for _ in ()).throw(AssertionError("recomputed"))
    again = evaluate_shift(run_dir, FakeCorruptions(test), predictor, calibrators, cfg.metrics.n_bins)
    assert not calls
    pd.testing.assert_frame_equal(again.reset_index(drop=True), first.reset_index(drop=True), check_dtype=False)
    # Other bins: every row is computed again, with the new bins.
    predictor = trained_predictor(run_dir, cfg)
    redone = evaluate_shift(run_dir, FakeCorruptions(test), predictor, calibrators, 5)
    bins = pd.read_csv(run_dir / "shift" / "bins.csv")
    assert len(redone) == len(first) and set(bins["bin"]) == set(range(1, 6))


def test_pooled_bins_give_the_ece_of_the_pooled_images():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3) * 0.5, size=400)
    labels = rng.integers(0, 3, 400)
    from calibrun.metrics import bin_stats, ece, mce, pool_bins

    halves = pd.concat([bin_stats(probs[:150], labels[:150], 10), bin_stats(probs[150:], labels[150:], 10)])
    pooled, pooled_ece, pooled_mce = pool_bins(halves)
    assert pooled_ece == pytest.approx(ece(probs, labels, 10), abs=1e-12)
    assert pooled_mce == pytest.approx(mce(probs, labels, 10), abs=1e-12)
    assert pooled["count"].sum() == 400


def test_ood_rows_equal_the_detection_metrics_of_the_calibrated_scores(trained):
    run_dir, cfg = trained
    calibrators = load_calibrators(run_dir)
    table = evaluate_ood(run_dir, FakeOOD(), trained_predictor(run_dir, cfg), calibrators, cfg.metrics.n_bins)
    assert list(table.columns) == ["dataset", "score", "calibrator", "auroc", "aupr_in", "aupr_out", "fpr95", "n"]
    assert set(table["score"]) == set(SCORES) and set(table["calibrator"]) == {"none", "temperature", "isotonic"}
    z_in, _ = load_logits(run_dir / "logits" / "test.npz")
    p_out = _direct_probs(run_dir, cfg, FakeOOD().split().images, "temperature")
    p_in = calibrators["temperature"].predict_proba(z_in)
    row = table[(table.score == "entropy") & (table.calibrator == "temperature")].iloc[0]
    expected = detection_metrics(SCORES["entropy"](p_in), SCORES["entropy"](p_out))
    for metric, value in expected.items():
        assert row[metric] == pytest.approx(value, abs=1e-6)
    assert row["n"] == 200
    assert (run_dir / "ood" / "figures" / "confidence_uniform_noise_none.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.root=/x"], "cannot apply 'data.root=/x'"),
        ([], "needs shift=NAME and/or ood=NAME"),
        (["shift=nope"], "shift"),
        (["ood=svnh"], "ood=svnh: no such option. Did you mean 'svhn'?"),
        (["ood=svhn", "ood.rot=/x"], "Unknown config key 'ood.rot'. Did you mean 'root'?"),
    ],
)
def test_evaluate_cli_errors_are_one_line(trained, caplog, args, message):
    run_dir, _ = trained
    with pytest.raises(SystemExit) as exit_info:
        evaluate([str(run_dir), *args])
    assert exit_info.value.code == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert message in error and "\n" not in error


def test_evaluate_refuses_an_unfinished_folder_and_names_one_that_does_not_exist(tmp_path):
    with pytest.raises(UserError, match="not a finished calibrun run"):
        evaluation_config(tmp_path, ["ood=svhn"], Path(config_dir()))
    with pytest.raises(UserError, match="typo does not exist"):
        evaluation_config(tmp_path / "typo", ["ood=svhn"], Path(config_dir()))


def test_shift_and_ood_at_the_end_of_training_then_calibrun_evaluate_adds_more(run_cli, tmp_path, monkeypatch):
    """On the bundled CIFAR-10 sample with test-made CIFAR-10-C and SVHN files."""
    from shift_files import write_cifar_c, write_svhn_mat

    from calibrun.robustness import Predictor

    release = write_cifar_c(tmp_path / "CIFAR-10-C", n=30)
    write_svhn_mat(tmp_path / "svhn" / "test_32x32.mat", n=60)
    args = ["data=cifar10_sample", "model.depth=8", "trainer=quick", "trainer.epochs=1", "trainer.progress=false",
            "data.train_subset=300", "data.test_subset=100", CALIBRATORS, "run_name=shifted",
            "shift=cifar10c", f"shift.root={release}", "shift.corruptions=[fog]", "shift.severities=[1,5]",
            "ood=svhn", f"ood.root={tmp_path / 'svhn'}"]
    assert run_cli(args).returncode == 0
    run_dir = next((tmp_path / "outputs" / "runs").rglob("DONE")).parent
    first = pd.read_csv(run_dir / "shift" / "metrics.csv")
    assert set(zip(first.corruption, first.severity)) == {("fog", 1), ("fog", 5)} and set(first.n) == {30}
    assert set(pd.read_csv(run_dir / "ood" / "metrics.csv")["dataset"]) == {"svhn"}
    # More corruptions later, from the finished run: only the new blocks are predicted.
    predicted = []
    logits = Predictor.logits
    monkeypatch.setattr(Predictor, "logits", lambda self, split: predicted.append(len(split)) or logits(self, split))
    evaluate([str(run_dir), "shift=cifar10c", f"shift.root={release}", "shift.corruptions=[fog,contrast]",
              "shift.severities=[1,5]"])
    assert predicted == [30, 30]  # contrast at severities 1 and 5; fog and the run's ood=svhn are skipped
    shift = pd.read_csv(run_dir / "shift" / "metrics.csv")
    assert len(shift) == 2 * 2 * 3
    pd.testing.assert_frame_equal(shift.iloc[: len(first)], first)


def test_a_shift_of_other_classes_is_refused(trained, tmp_path, caplog):
    from shift_files import write_cifar_c

    run_dir, _ = trained  # 4 synthetic classes
    release = write_cifar_c(tmp_path / "c", corruptions=("fog",), n=20)
    with pytest.raises(SystemExit):
        evaluate([str(run_dir), "shift=cifar10c", f"shift.root={release}", "shift.corruptions=[fog]"])
    assert "shift=cifar10c has 10 classes but the model was trained on 4" in caplog.text
