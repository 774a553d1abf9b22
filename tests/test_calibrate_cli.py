"""``calibrun-calibrate``: refitting calibrators of a finished run from its saved logits."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import FAST
from omegaconf import OmegaConf

from calibrun import UserError, conformal
from calibrun.commands.calibrate import calibrate as calibrate_command
from calibrun.commands.report import report as report_command
from calibrun.calibrators import HistogramBinning, MatrixScaling, PlattScaling, TemperatureScaling
from calibrun.config import validate
from calibrun.compose import config_dir
from calibrun.calibration import (build_calibrators, calibrate_and_report, console_table, grouped_by_split,
                                  metric_settings, recalibrate, refit_config)
from calibrun.metrics import scores


def calibrate(args):
    """``calibrun-calibrate ARGS`` in this process (a failure raises SystemExit)."""
    calibrate_command(args)


def calibrate_process(args, cwd):
    """``calibrun-calibrate ARGS`` in a new process, for its exit status and stderr."""
    return subprocess.run([sys.executable, "-c", "from calibrun.commands.calibrate import calibrate; calibrate()", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def split_rows(run_dir) -> pd.DataFrame:
    metrics = pd.read_csv(run_dir / "metrics.csv")
    return metrics[metrics.split == "test"].set_index("calibrator")


def expected_test_scores(run_dir, calibrator, n_bins) -> dict:
    """The test row of ``calibrator`` computed here from the saved logits, not by the CLI."""
    with np.load(run_dir / "logits" / "val.npz") as val, np.load(run_dir / "logits" / "test.npz") as test:
        probs = calibrator.fit(val["logits"], val["labels"]).predict_proba(test["logits"])
        return scores(probs, test["labels"], n_bins)


def log_entries(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "calibrations.jsonl").read_text().splitlines()]


def finished_run(run_dir, compose_cfg, overrides):
    """A finished run folder without training: config.yaml, logits, tables, DONE."""
    # A tenth of the default resamples: the intervals' own tests are in test_bootstrap.py.
    cfg = validate(compose_cfg([*overrides, "metrics.resamples=100"]))
    rng = np.random.default_rng(0)
    (run_dir / "logits").mkdir(parents=True)
    for split, n in (("val", 400), ("test", 300)):
        z = 3.0 * rng.standard_normal((n, 4))
        # Labels follow softmax(z / 2): the logits are overconfident, as a trained net's are.
        p = np.exp(z / 2) / np.exp(z / 2).sum(1, keepdims=True)
        y = np.array([rng.choice(4, p=row) for row in p])
        np.savez(run_dir / "logits" / f"{split}.npz", logits=z.astype(np.float32), labels=y, index=np.arange(n))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    calibrate_and_report(run_dir, build_calibrators(cfg.calibrator), **metric_settings(cfg))
    (run_dir / "DONE").write_text("")
    return run_dir


def test_refit_a_subset_keeps_the_other_rows_and_the_checkpoint(run_cli, tmp_path):
    assert run_cli([*FAST, "calibrator=[temperature,isotonic]", "run_name=r"]).returncode == 0
    run_dir = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "r"
    ckpt = run_dir / "checkpoints" / "last.pt"
    before_ckpt = ckpt.stat().st_mtime_ns
    before = pd.read_csv(run_dir / "metrics.csv")
    (run_dir / "figures" / "reliability_temperature.png").unlink()

    calibrate([str(run_dir), "calibrator=[temperature,histogram]"])
    after = pd.read_csv(run_dir / "metrics.csv")
    assert set(after.calibrator) == {"none", "temperature", "isotonic", "histogram"}
    # Untouched calibrator: identical rows. Refitted deterministic ones: identical values.
    pd.testing.assert_frame_equal(
        before[before.calibrator != "histogram"].sort_values(["split", "calibrator"]).reset_index(drop=True),
        after[after.calibrator != "histogram"].sort_values(["split", "calibrator"]).reset_index(drop=True),
    )
    bins = pd.read_csv(run_dir / "bins.csv")
    assert set(bins.calibrator) == {"none", "temperature", "isotonic", "histogram"}
    assert (run_dir / "figures" / "reliability_temperature.png").is_file()
    assert (run_dir / "figures" / "reliability_histogram.png").is_file()
    assert "histogram" in (run_dir / "metrics.md").read_text()
    assert ckpt.stat().st_mtime_ns == before_ckpt
    # config.yaml names every calibrator in the table; the new one with conf/'s settings.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert list(config["calibrator"]) == ["temperature", "isotonic", "histogram"]
    assert config["calibrator"]["histogram"]["n_bins"] == 15
    (entry,) = log_entries(run_dir)
    assert entry["overrides"] == ["calibrator=[temperature,histogram]"]
    assert entry["refitted"] == ["temperature", "histogram"] and entry["n_bins"] == 15


def test_refit_without_overrides_uses_the_runs_own_settings_and_is_recorded(run_cli, tmp_path):
    proc = run_cli([*FAST, "calibrator=[temperature,histogram]", "calibrator.histogram.n_bins=5", "run_name=r"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "r"
    config_before = yaml.safe_load((run_dir / "config.yaml").read_text())

    calibrate([str(run_dir)])
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == config_before
    ece = split_rows(run_dir).loc["histogram", "ece"]
    assert ece == pytest.approx(expected_test_scores(run_dir, HistogramBinning(n_bins=5), 15)["ece"], abs=1e-12)
    # The default 15 calibration bins would have given another number.
    assert abs(ece - expected_test_scores(run_dir, HistogramBinning(n_bins=15), 15)["ece"]) > 1e-6
    (entry,) = log_entries(run_dir)
    assert entry["overrides"] == [] and entry["refitted"] == ["temperature", "histogram"]
    assert entry["calibrator"]["histogram"]["n_bins"] == 5


def test_new_metric_bins_refit_every_calibrator_in_the_table(compose_cfg, tmp_path):
    run_dir = finished_run(tmp_path / "run", compose_cfg,
                           ["calibrator=[temperature,histogram,platt]", "calibrator.platt.C=0.5"])
    assert (pd.read_csv(run_dir / "bins.csv").groupby("calibrator").size() == 15).all()

    calibrate([str(run_dir), "calibrator=[matrix]", "calibrator.matrix.off_diagonal_l2=0",
           "metrics.n_bins=10"])
    bins = pd.read_csv(run_dir / "bins.csv")
    assert bins.groupby("calibrator").size().to_dict() == dict.fromkeys(
        ["none", "temperature", "histogram", "platt", "matrix"], 10)
    rows = split_rows(run_dir)
    expected = {"temperature": TemperatureScaling(), "histogram": HistogramBinning(), "platt": PlattScaling(C=0.5),
                "matrix": MatrixScaling(off_diagonal_l2=0.0)}
    for name, calibrator in expected.items():
        scores = expected_test_scores(run_dir, calibrator, 10)
        assert rows.loc[name, "ece"] == pytest.approx(scores["ece"], abs=1e-9), name
        assert rows.loc[name, "mce"] == pytest.approx(scores["mce"], abs=1e-9), name
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["metrics"]["n_bins"] == 10
    assert config["calibrator"]["matrix"]["off_diagonal_l2"] == 0 and config["calibrator"]["platt"]["C"] == 0.5
    (entry,) = log_entries(run_dir)
    assert sorted(entry["refitted"]) == ["histogram", "matrix", "platt", "temperature"] and entry["n_bins"] == 10


def test_settings_come_from_the_run_then_conf_then_the_command_line(compose_cfg, tmp_path):
    run_cfg = validate(compose_cfg(["calibrator=[temperature,histogram]", "calibrator.temperature.max_iter=7",
                                    "calibrator.histogram.n_bins=5"]))
    cfg = refit_config(run_cfg, ["calibrator=[temperature,platt]", "calibrator.platt.C=2"], ["histogram"],
                       Path(config_dir()))
    assert list(cfg.calibrator) == ["temperature", "platt"]  # same bins: histogram keeps its rows
    assert cfg.calibrator.temperature.max_iter == 7  # the run's own, not conf's 100
    assert cfg.calibrator.platt.C == 2.0  # conf/calibrator/platt.yaml's 1.0, overridden


@pytest.mark.parametrize(("overrides", "named"), [
    (["trainer.epochs=3"], "trainer.epochs=3"),
    (["calibrator.histogram.n_bins=0"], "calibrator.histogram"),
    (["calibrator=[temperature,nosuch]"], "'nosuch'"),
    (["calibrator.platt.C=2"], "'platt'"),
    (["metrics.n_bins=many"], "metrics.n_bins"),
    (["metrics.resamples=1"], "metrics.resamples must be an integer of at least 2"),
    (["metrics.nosuch=1"], "metrics.nosuch"),
    (["calibrator=[temperature"], "calibrator=[temperature"),
])
def test_bad_overrides_are_refused_naming_the_key_and_change_nothing(compose_cfg, tmp_path, overrides, named):
    run_dir = finished_run(tmp_path / "run", compose_cfg, ["calibrator=[temperature,histogram]"])
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "metrics.csv", "bins.csv")}
    with pytest.raises(UserError, match=named.replace("[", r"\[")):
        recalibrate(run_dir, overrides, Path(config_dir()))
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert not (run_dir / "calibrations.jsonl").exists()


def test_a_bad_value_is_one_line_on_stderr_and_exit_1(compose_cfg, tmp_path):
    run_dir = finished_run(tmp_path / "run", compose_cfg, ["calibrator=[temperature]"])
    proc = calibrate_process([str(run_dir), "calibrator.temperature.max_iter=0"], tmp_path)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1 and "calibrator.temperature" in proc.stderr, proc.stderr
    assert "max_iter" in proc.stderr


def test_conformal_sets_hold_out_part_of_val_and_a_subset_refit_keeps_the_rest(compose_cfg, tmp_path):
    """metrics.conformal=true fits the calibrators on the validation images the seeded split
    does not hold out, writes each calibrator's quantile on the held-out ones and its sets'
    coverage and size on test; refitting one calibrator keeps the others' quantiles, rows
    and risk–coverage curves."""
    run_dir = finished_run(tmp_path / "run", compose_cfg, ["calibrator=[temperature,histogram]",
                                                          "metrics.conformal=true", "metrics.conformal_seed=2"])
    record = json.loads((run_dir / "conformal.json").read_text())
    settings = conformal.Settings(share=0.5, seed=2)
    fit, held = conformal.split_validation(400, settings)
    assert (record["n_calibrators_fit"], record["n_held_out"]) == (200, 200)
    with np.load(run_dir / "logits" / "val.npz") as val, np.load(run_dir / "logits" / "test.npz") as test:
        temperature = TemperatureScaling().fit(val["logits"][fit], val["labels"][fit])
        q = conformal.quantiles(temperature.predict_proba(val["logits"][held]), val["labels"][held], settings)
        expected = conformal.set_columns(temperature.predict_proba(test["logits"]), test["labels"], q, settings)
    assert json.loads((run_dir / "calibrators.json").read_text())["temperature"]["T"] == pytest.approx(
        temperature.temperature, rel=1e-6)
    assert record["quantiles"]["temperature"] == pytest.approx(q, rel=1e-6)
    row = split_rows(run_dir).loc["temperature"]
    assert {c: row[c] for c in expected} == pytest.approx(expected, abs=1e-9)
    assert 0.8 < row["set_coverage_aps"] <= 1.0
    curves_before = pd.read_csv(run_dir / "risk_coverage.csv")
    recalibrate(run_dir, ["calibrator=[histogram]", "calibrator.histogram.n_bins=5"], Path(config_dir()))
    after = json.loads((run_dir / "conformal.json").read_text())
    assert after["quantiles"]["temperature"] == record["quantiles"]["temperature"]
    assert after["quantiles"]["histogram"] != record["quantiles"]["histogram"]
    curves = pd.read_csv(run_dir / "risk_coverage.csv")
    assert set(curves["calibrator"]) == {"none", "temperature", "histogram"}
    pd.testing.assert_frame_equal(curves[curves.calibrator == "temperature"].reset_index(drop=True),
                                  curves_before[curves_before.calibrator == "temperature"].reset_index(drop=True))
    assert split_rows(run_dir).loc["temperature", "set_size_lac"] == row["set_size_lac"]
    assert "## Selective prediction and conformal sets" in (run_dir / "metrics.md").read_text()
    # Turning the sets off refits every calibrator on the whole split and removes conformal.json.
    recalibrate(run_dir, ["metrics.conformal=false"], Path(config_dir()))
    assert not (run_dir / "conformal.json").exists()
    assert "set_size_lac" not in pd.read_csv(run_dir / "metrics.csv").columns


@pytest.mark.parametrize(("override", "named"), [
    ("metrics.coverages=[]", "metrics.coverages is empty"),
    ("metrics.coverages=[0.9,1.5]", "metrics.coverages must lie in (0, 1]"),
    ("metrics.conformal_alpha=1", "metrics.conformal_alpha must be in (0, 1)"),
    ("metrics.conformal_share=0", "metrics.conformal_share must be in (0, 1)"),
    ("metrics.conformal_methods=[lac,thr]", "metrics.conformal_methods must name one or more of lac, aps, raps"),
])
def test_bad_selective_and_conformal_settings_are_refused_naming_the_key(compose_cfg, override, named):
    """What calibrun-calibrate validates before it fits anything (test_a_bad_value_is_one_line_on_stderr_and_exit_1
    shows such a UserError reaches the console as one line and exit 1)."""
    with pytest.raises(UserError) as refused:
        refit_config(compose_cfg([]), ["metrics.conformal=true", override], [], Path(config_dir()))
    assert named in str(refused.value) and "\n" not in str(refused.value)


def test_unfinished_folder_is_refused(tmp_path):
    (tmp_path / "half" / "logits").mkdir(parents=True)
    proc = calibrate_process([str(tmp_path / "half")], tmp_path)
    assert proc.returncode == 1
    assert "is not a finished calibrun run" in proc.stderr and "DONE" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- logits made elsewhere


def test_external_logits_give_the_same_tables_as_the_run_that_made_them(run_cli, tmp_path, capfd):
    """Done-when 2 of issue 15: a run's own logits through --val/--test/--out give its
    metrics.csv, bins and fitted parameters; calibrun-report then reads both folders."""
    assert run_cli([*FAST, "run_name=r"]).returncode == 0
    run_dir = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "r"
    out = tmp_path / "mine" / "seed0"

    calibrate(["--val", str(run_dir / "logits" / "val.npz"), "--test", str(run_dir / "logits" / "test.npz"),
               "--out", str(out), "--name", "my_net", "--seed", "0", "metrics.resamples=100"])
    # The same intervals too: the same images, resamples and seed (FAST's metrics.resamples).
    pd.testing.assert_frame_equal(pd.read_csv(out / "metrics.csv"), pd.read_csv(run_dir / "metrics.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(out / "bins.csv"), pd.read_csv(run_dir / "bins.csv"))
    assert json.loads((out / "calibrators.json").read_text()) == json.loads((run_dir / "calibrators.json").read_text())
    names = {p.name for p in (run_dir / "figures").glob("reliability_*.png")}
    assert names and names == {p.name for p in (out / "figures").glob("reliability_*.png")}
    header = (out / "metrics.md").read_text()
    assert "my_net, logits made outside calibrun" in header and str(run_dir / "logits" / "val.npz") in header

    capfd.readouterr()
    report_command([str(run_dir), str(out), "--out", str(tmp_path / "rep"), "--calibrators", "none,temperature"])
    table = pd.read_csv(tmp_path / "rep" / "report.csv")
    assert set(table["model"]) == {"resnet110", "my_net"}
    mine = table[table["model"] == "my_net"].set_index("calibrator")
    ours = split_rows(run_dir)
    assert mine.loc["temperature", "ece_mean"] == pytest.approx(ours.loc["temperature", "ece"], abs=1e-12)
    assert "my_net" in (tmp_path / "rep" / "report.md").read_text()


def test_external_pt_logits_equal_npz_and_the_folder_refits_like_a_run(tmp_path):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    for split, n in (("val", 300), ("test", 200)):
        z = rng.standard_normal((n, 5)) * 3
        y = rng.integers(0, 5, n)
        np.savez(tmp_path / f"{split}.npz", logits=z.astype(np.float32), labels=y)
        torch.save({"logits": torch.from_numpy(z.astype(np.float32)), "labels": torch.from_numpy(y)},
                   tmp_path / f"{split}.pt")
    for kind in ("npz", "pt"):
        calibrate(["--val", str(tmp_path / f"val.{kind}"), "--test", str(tmp_path / f"test.{kind}"),
                   "--out", str(tmp_path / kind), "calibrator=[temperature,histogram]", "metrics.n_bins=10",
                   "metrics.resamples=100"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "pt" / "metrics.csv"),
                                  pd.read_csv(tmp_path / "npz" / "metrics.csv"))
    assert (pd.read_csv(tmp_path / "pt" / "bins.csv").groupby("calibrator").size() == 10).all()
    # The folder is a finished run to calibrun-calibrate: refit one calibrator with new settings.
    calibrate([str(tmp_path / "pt"), "calibrator=[histogram]", "calibrator.histogram.n_bins=5"])
    ece = split_rows(tmp_path / "pt").loc["histogram", "ece"]
    assert ece == pytest.approx(expected_test_scores(tmp_path / "pt", HistogramBinning(n_bins=5), 10)["ece"],
                                abs=1e-12)


def write_logits(path, logits, labels):
    np.savez(path, logits=logits, labels=labels)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("probabilities", "probabilities"),
    ("classes", "classes"),
    ("labels", "'labels' must be 50 integers in 0..2 (one per row of 'logits'); they run from 3 to 5"),
    ("float_labels", "they are float64"),
    ("missing", "No such file"),
    ("pt_keys", "lacks 'labels'"),
    ("npz_keys", "it holds 'logits', 'targets' and lacks 'labels' (np.savez(path, logits=z, labels=y))"),
    ("npy", "holds one array (.npy); save logits and labels together"),
    ("not_empty", "is not empty"),
    ("again", "already holds the results of these logits"),
    ("half", "--val, --test and --out go together"),
    ("both", "not both"),
    ("no_run", "does not exist. Give a run folder"),
])
def test_external_logits_mistakes_are_one_line_errors(tmp_path, capsys, caplog, case, message):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    z, y = rng.standard_normal((50, 3)), rng.integers(0, 3, 50)
    val, test, out = write_logits(tmp_path / "v.npz", z, y), write_logits(tmp_path / "t.npz", z, y), tmp_path / "o"
    args = None
    if case == "probabilities":
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        val = write_logits(tmp_path / "p.npz", p, y)
    elif case == "classes":
        test = write_logits(tmp_path / "t4.npz", rng.standard_normal((50, 4)), y)
    elif case == "labels":
        val = write_logits(tmp_path / "bad.npz", z, y + 3)
    elif case == "float_labels":
        val = write_logits(tmp_path / "f.npz", z, y.astype(float))
    elif case == "missing":
        val = str(tmp_path / "nowhere.npz")
    elif case == "npz_keys":
        np.savez(tmp_path / "k.npz", logits=z, targets=y)
        val = str(tmp_path / "k.npz")
    elif case == "npy":
        np.save(tmp_path / "z.npy", z)
        val = str(tmp_path / "z.npy")
    elif case == "pt_keys":
        torch.save({"logits": torch.zeros(3, 3)}, tmp_path / "v.pt")
        val = str(tmp_path / "v.pt")
    elif case == "not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "again":
        calibrate(["--val", val, "--test", test, "--out", str(out), "calibrator=[temperature]"])
    elif case == "half":
        args = ["--val", val, "--out", str(out)]
    elif case == "both":
        args = [str(tmp_path), "--val", val, "--test", test, "--out", str(out)]
    elif case == "no_run":
        args = [str(tmp_path / "outputs" / "typo")]
    capsys.readouterr()
    caplog.clear()
    # In this process (a new one per case costs seconds of imports); the test below checks
    # that a refused command's error reaches stderr alone, as one line, in a new process.
    with pytest.raises(SystemExit) as exit_:
        calibrate_command(args or ["--val", val, "--test", test, "--out", str(out), "calibrator=[temperature]"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    said = "\n".join(errors) + capsys.readouterr().err
    assert exit_.value.code in (1, 2) and message in said, said[-2000:]
    assert all("\n" not in e for e in errors), errors
    if case not in ("again", "not_empty"):
        assert not (out / "DONE").exists()


def test_results_go_to_stdout_and_errors_alone_to_stderr(tmp_path):
    """``calibrun-report ... > table.md`` captures the table; stderr holds errors only."""
    rng = np.random.default_rng(1)
    z, y = 2 * rng.standard_normal((200, 3)), rng.integers(0, 3, 200)
    val, test = write_logits(tmp_path / "v.npz", z, y), write_logits(tmp_path / "t.npz", z[::-1].copy(), y)
    made = calibrate_process(["--val", val, "--test", test, "--out", str(tmp_path / "run"), "calibrator=[temperature]"],
                             cwd=tmp_path)
    assert made.returncode == 0 and made.stderr == "" and "temperature" in made.stdout
    report = subprocess.run([sys.executable, "-c", "from calibrun.commands.report import report; report()", str(tmp_path / "run")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0 and report.stderr == "" and "| calibrator" in report.stdout
    again = calibrate_process(["--val", val, "--test", test, "--out", str(tmp_path / "run")], cwd=tmp_path)
    assert again.returncode == 1 and again.stdout == "" and "already holds" in again.stderr


def test_tables_show_the_test_rows_first_in_four_decimals():
    """metrics.md and the console group the rows by split, test first, and never switch
    to scientific notation (a calibrated OE of 1.5e-08)."""
    table = pd.DataFrame({"split": ["val", "test", "val", "test"], "calibrator": ["none", "none", "platt", "platt"],
                          "accuracy": [0.5, 0.52, 0.5, 0.52], "oe": [0.01, 0.02, 1.466331e-08, 0.003]})
    shown = console_table(table).splitlines()
    assert [line.split()[:2] for line in shown[1:]] == [["test", "none"], ["test", "platt"], ["val", "none"],
                                                        ["val", "platt"]]
    assert "e-08" not in "\n".join(shown) and shown[4].split()[-1] == "0.0000"
    assert grouped_by_split(table)["split"].tolist() == ["test", "test", "val", "val"]
