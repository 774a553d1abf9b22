"""calibrun-report over a λ × seed sweep, repeated sweeps, and failed jobs."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import FAST

from calibrun import UserError, report
from calibrun.config import NON_EXPERIMENT_KEYS
from calibrun.metrics import METRIC_NAMES
from calibrun.report import aggregate, collect, lam_curves, write_report

SWEEP = ["-m", "loss=gap_cap", "loss.lam=0,1,10", "seed=0,1", *FAST, "trainer.epochs=1",
         "calibrator=[temperature]", "run_name=sweep"]


def report_cli(args, cwd):
    return subprocess.run([sys.executable, "-c", "from calibrun.commands.report import report; report()", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_lam_seed_sweep_report_matches_pandas_and_repeats_train_nothing(run_cli, tmp_path):
    proc = run_cli(SWEEP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "outputs" / "multirun" / "sweep"
    runs = sorted(p.parent for p in sweep.glob("*/DONE"))
    assert len(runs) == 6

    out = tmp_path / "report"
    result = report_cli([str(sweep), "--out", str(out), "--calibrators", "none"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(out / "report.csv")
    assert len(table) == 3 and (table["n"] == 2).all()
    assert (out / "ece_vs_lam.png").is_file() and (out / "reliability_grid.png").is_file()
    assert "± " in (out / "report.md").read_text()

    # The same numbers computed directly from the six metrics.csv files.
    frames = []
    for run in runs:
        lam = float(run.name.split("loss.lam=")[1].split(",")[0])
        m = pd.read_csv(run / "metrics.csv")
        frames.append(m[(m.split == "test") & (m.calibrator == "none")].assign(lam=lam))
    direct = pd.concat(frames).groupby("lam")[["ece", "accuracy", "mce"]].agg(["mean", "std"])
    for _, row in table.iterrows():
        lam = float(row["loss.lam"])
        for metric in ("ece", "accuracy", "mce"):
            assert row[f"{metric}_mean"] == pytest.approx(direct.loc[lam, (metric, "mean")], abs=1e-12)
            assert row[f"{metric}_std"] == pytest.approx(direct.loc[lam, (metric, "std")], abs=1e-12, nan_ok=True)

    stamps = {run: (run / "checkpoints" / "last.pt").stat().st_mtime_ns for run in runs}
    again = run_cli(SWEEP)
    assert again.returncode == 0
    assert (again.stdout + again.stderr).count("holds DONE") == 6
    assert all((run / "checkpoints" / "last.pt").stat().st_mtime_ns == t for run, t in stamps.items())


def test_failed_job_lets_the_sweep_finish_exits_nonzero_and_is_reported(run_cli, tmp_path):
    # lr=1e30 blows the weights up: the loss of that job is not finite.
    proc = run_cli(["-m", "trainer.lr=0.05,1e30,0.01", *FAST, "trainer.epochs=1", "calibrator=[temperature]",
                    "run_name=bad"])
    assert proc.returncode != 0
    assert "Non-finite training loss" in proc.stdout + proc.stderr
    sweep = tmp_path / "outputs" / "multirun" / "bad"
    assert len(list(sweep.glob("*/DONE"))) == 2
    summary = write_report([sweep], tmp_path / "r")
    text = (tmp_path / "r" / "report.md").read_text()
    assert "Runs not finished (1)" in text and "trainer.lr=1e+30" in text and "Non-finite" in text
    assert set(summary["n"]) == {1}
    assert "failed" in set(pd.read_csv(tmp_path / "r" / "report.csv")["state"].dropna())


def test_report_of_nothing_is_a_clear_error(tmp_path):
    result = report_cli([str(tmp_path)], tmp_path)
    assert result.returncode == 1 and "No run folders" in result.stderr


def test_pooled_bins_keep_every_sample(tmp_path):
    from calibrun.report import reliability_panels

    rows = []
    for seed, n in ((0, 10), (1, 30)):
        run = tmp_path / f"r{seed}"
        run.mkdir()
        pd.DataFrame({"calibrator": "none", "bin": [1, 2], "lo": [0, .5], "hi": [.5, 1], "count": [n, n],
                      "conf": [.4, .9], "acc": [.2 + seed * .4, 1.0]}).to_csv(run / "bins.csv", index=False)
        rows.append({"run": str(run), "calibrator": "none", "ece": 0.1, "mce": 0.2, "loss": "ce"})
    (title, pooled, ece, mce), = reliability_panels(pd.DataFrame(rows), ["loss"], "none")
    assert pooled["count"].tolist() == [40, 40]
    assert pooled["acc"].iloc[0] == pytest.approx((10 * .2 + 30 * .6) / 40)
    assert np.isclose(ece, 0.1) and title == "loss=ce"


def _set(config: dict, dotted: str, value: object) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        config = config.setdefault(key, {})
    config[leaf] = value


def fake_run(folder, config: dict, ece: float, params: dict | None = None) -> None:
    """A finished run folder as calibrun-report reads it: .hydra/, config.yaml, DONE, metrics.csv;
    with ``params`` (calibrator -> fitted parameters) also calibrators.json and a test row per
    calibrator there, whose ECE is ``ece`` plus 0.01 per position."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "DONE").write_text("")
    names = ["none", *(params or {})]
    rows = [{"split": split, "calibrator": name, **dict.fromkeys(METRIC_NAMES, 0.5), "ece": ece + 0.01 * i, "n": 10}
            for split in ("val", "test") for i, name in enumerate(names)]
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    pd.DataFrame([{"calibrator": name, "bin": 1, "lo": 0.0, "hi": 1.0, "count": 10, "conf": 0.5, "acc": 0.5}
                  for name in names]).to_csv(folder / "bins.csv", index=False)
    if params is not None:
        (folder / "calibrators.json").write_text(json.dumps({"none": {}, **params}))


def test_runs_differing_only_in_non_experiment_keys_seed_and_calibrators_form_one_group(tmp_path):
    for i, ece in enumerate((0.1, 0.2, 0.3)):
        config = {"seed": i, "loss": {"_target_": "calibrun.losses.GapCap", "lam": 1.0}, "trainer": {"epochs": 2},
                  "calibrator": {"histogram": {"_target_": "calibrun.calibrators.HistogramBinning", "n_bins": 5 + i}}}
        # A key below another one (shift.root below shift) is covered by its parent.
        for key in (k for k in NON_EXPERIMENT_KEYS if not any(k.startswith(f"{p}.") for p in NON_EXPERIMENT_KEYS)):
            _set(config, key, f"value-{i}")
        config["shift"] = {"root": f"/data-{i}", "severities": [1, 2, 3][: i + 1]}
        fake_run(tmp_path / f"lam1_seed{i}", config, ece)
    config["loss"]["lam"] = 10.0
    fake_run(tmp_path / "lam10", config, 0.5)

    metrics, runs, keys = collect([tmp_path])
    assert keys == ["loss.lam"]
    summary = aggregate(metrics, keys).set_index("loss.lam")
    assert summary.loc[1.0, "n"] == 3 and summary.loc[10.0, "n"] == 1
    assert summary.loc[1.0, "ece_mean"] == pytest.approx(0.2)
    assert summary.loc[1.0, "ece_std"] == pytest.approx(0.1)  # sample std of .1, .2, .3
    assert summary.loc[10.0, "ece_mean"] == pytest.approx(0.5)


def test_lam_curves_sort_numerically_and_keep_single_seed_points():
    summary = pd.DataFrame({
        "loss": ["gap_cap"] * 3 + ["nts"],
        "loss.lam": ["10", "0.5", "2", "0.5"],  # sorted as text: 0.5, 10, 2
        "calibrator": "none",
        "ece_mean": [0.3, 0.1, 0.2, 0.4],
        "ece_std": [0.03, np.nan, 0.02, np.nan],
    })
    gap_cap, nts = lam_curves(summary, ["loss", "loss.lam"], "ece")
    assert gap_cap.label == "loss=gap_cap, none" and nts.label == "loss=nts, none"
    np.testing.assert_allclose(gap_cap.x, [0.5, 2.0, 10.0])
    np.testing.assert_allclose(gap_cap.y, [0.1, 0.2, 0.3])
    np.testing.assert_allclose(gap_cap.yerr, [0.0, 0.02, 0.03])
    np.testing.assert_allclose(nts.x, [0.5])


@pytest.mark.parametrize(("option", "kwargs"), [("--table-metrics", {"table_metrics": ["ece", "ecee"]}),
                                                ("--metric", {"metric": "ecee"})])
def test_unknown_metric_names_the_option(tmp_path, option, kwargs):
    with pytest.raises(UserError, match=f"'ecee' in {option}"):
        write_report([tmp_path], tmp_path / "out", **kwargs)


def test_caption_is_written_under_the_title(tmp_path):
    from calibrun.commands.report import report

    fake_run(tmp_path / "runs" / "r0", {"seed": 0, "loss": {"lam": 10.0}}, 0.1)
    caption = "Paper's network (gapcap_net), λ = 10: the mean-CE reading."
    common = [str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    report([*common, "--name", "with", "--caption", caption])
    report([*common, "--name", "without"])
    assert (tmp_path / "out" / "with.md").read_text().splitlines()[:4] == ["# with", "", caption, ""]
    without = (tmp_path / "out" / "without.md").read_text()
    assert caption not in without and without.splitlines()[2].startswith("1 run under")


def _params_runs(root):
    """Two seeds of alpha=0 (T = 1.5 and 2.5) and one of alpha=0.05 (T = 1.0); vector scaling's
    parameters are lists and must not become columns."""
    vector = {"w": [1.0, 2.0], "b": [0.0, 0.1]}
    for seed, T in ((0, 1.5), (1, 2.5)):
        fake_run(root / f"ce{seed}", {"seed": seed, "loss": {"alpha": 0.0}}, 0.10 + 0.02 * seed,
                 {"temperature": {"T": T}, "vector": vector})
    fake_run(root / "ls0", {"seed": 0, "loss": {"alpha": 0.05}}, 0.30, {"temperature": {"T": 1.0}, "vector": vector})


def test_scalar_fitted_parameters_become_columns_aggregated_over_seeds(tmp_path):
    _params_runs(tmp_path / "runs")
    metrics, _, keys = collect([tmp_path / "runs"])
    assert keys == ["loss.alpha"] and "temperature.T" in metrics and not any(c.startswith("vector.") for c in metrics)
    summary = aggregate(metrics, keys).set_index(["loss.alpha", "calibrator"])
    # T over the two alpha=0 seeds: mean (1.5 + 2.5)/2 = 2.0; sample std sqrt(((-.5)² + .5²)/1) = sqrt(.5).
    assert summary.loc[(0.0, "temperature"), "temperature.T_mean"] == pytest.approx(2.0, abs=1e-12)
    assert summary.loc[(0.0, "temperature"), "temperature.T_std"] == pytest.approx(0.5 ** 0.5, abs=1e-12)
    assert summary.loc[(0.05, "temperature"), "temperature.T_mean"] == pytest.approx(1.0, abs=1e-12)
    # ECE of temperature's rows: 0.11 and 0.13 -> 0.12.
    assert summary.loc[(0.0, "temperature"), "ece_mean"] == pytest.approx(0.12, abs=1e-12)
    assert summary.loc[[(0.0, "none"), (0.0, "vector")], "temperature.T_mean"].isna().all()


def test_fitted_parameters_in_the_table_with_the_papers_and_empty_cells_elsewhere(tmp_path):
    _params_runs(tmp_path / "runs")
    paper = tmp_path / "paper.csv"
    paper.write_text("loss.alpha,calibrator,ece,temperature.T\n0.0,none,0.150,\n0.0,temperature,0.021,1.9\n")
    write_report([tmp_path / "runs"], tmp_path / "out", name="t", calibrators=["none", "temperature"],
                 paper=str(paper), table_metrics=["ece", "temperature.T"])
    text = (tmp_path / "out" / "t.md").read_text()
    assert "nan" not in text.lower()
    table = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    header, rows = table[0], {(r[0], r[1]): dict(zip(table[0], r)) for r in table[2:]}
    assert header == ["loss.alpha", "calibrator", "n", "ece", "paper ece", "temperature.T", "paper temperature.T"]
    # Two seeds: mean ± std [mean ∓ t(0.975, 1) · std / √2], t = 12.7062, half-width 6.3531.
    assert rows[("0.0", "temperature")]["temperature.T"] == "2.0000 ± 0.7071 [-4.3531, 8.3531]"
    assert rows[("0.0", "temperature")]["paper temperature.T"] == "1.9000"
    assert rows[("0.0", "none")]["temperature.T"] == "" and rows[("0.0", "none")]["paper temperature.T"] == ""
    assert rows[("0.05", "temperature")]["temperature.T"] == "1.0000"
    assert rows[("0.05", "none")]["paper ece"] == ""
    csv = pd.read_csv(tmp_path / "out" / "t.csv")
    assert {"temperature.T_mean", "temperature.T_std", "paper_temperature.T"} <= set(csv.columns)


@pytest.mark.parametrize(("calibrators", "name"), [(None, "temperature.X"), (["none"], "temperature.T")])
def test_unknown_fitted_parameter_lists_the_choices(tmp_path, calibrators, name):
    _params_runs(tmp_path / "runs")
    choices = "temperature.T" if calibrators is None else "brier"
    with pytest.raises(UserError, match=rf"'{name}' in --table-metrics; choose from accuracy, .*{choices}"):
        write_report([tmp_path / "runs"], tmp_path / "out", calibrators=calibrators, table_metrics=["ece", name])


def _shift_rows(base: float, seed: int) -> pd.DataFrame:
    """ECE = base + 0.1·severity + 0.02 on corruption b + 0.01·seed; accuracy 0.9 − 0.1·severity."""
    return pd.DataFrame([
        {"corruption": c, "severity": s, "calibrator": cal, **dict.fromkeys(METRIC_NAMES, 0.5),
         "ece": base + 0.1 * s + (0.02 if c == "b" else 0) + 0.01 * seed, "accuracy": 0.9 - 0.1 * s, "n": 100}
        for c in ("a", "b") for s in (1, 2) for cal in ("none", "histogram", "temperature")])


def test_shift_and_ood_reports_average_the_corruptions_then_the_seeds(tmp_path):
    for gamma, base in ((1.0, 0.0), (3.0, 0.3)):
        for seed in (0, 1):
            folder = tmp_path / "runs" / f"g{gamma}_s{seed}"
            fake_run(folder, {"seed": seed, "loss": {"gamma": gamma}}, 0.1)
            (folder / "shift").mkdir()
            _shift_rows(base, seed).to_csv(folder / "shift" / "metrics.csv", index=False)
            (folder / "ood").mkdir()
            pd.DataFrame([{"dataset": "svhn", "score": "msp", "calibrator": "none", "auroc": 0.8 + 0.1 * seed,
                           "aupr_in": 0.7, "aupr_out": 0.6, "fpr95": 0.5, "n": 50}]).to_csv(
                folder / "ood" / "metrics.csv", index=False)
    write_report([tmp_path / "runs"], tmp_path / "out")
    summary = pd.read_csv(tmp_path / "out" / "report_shift.csv").set_index(["loss.gamma", "calibrator", "severity"])
    # Mean over corruptions a, b: base + 0.1·s + 0.01 + 0.01·seed; over seeds 0 and 1: ± sample std 0.00707.
    row = summary.loc[(3.0, "temperature", 2)]
    assert row["n"] == 2
    assert row["ece_mean"] == pytest.approx(0.3 + 0.2 + 0.01 + 0.005)
    assert row["ece_std"] == pytest.approx(np.std([0.0, 0.01], ddof=1))
    text = (tmp_path / "out" / "report_shift.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| loss.gamma"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["loss.gamma, calibrator", "n", "severity 1",
                                                                  "severity 2", "avg"]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| 1, none")]
    # the ece table; two seeds: t(0.975, 1) · 0.0071 / √2 = 0.0635 either side of the mean
    assert cells[0] == ["1, none", "2", "0.1150 ± 0.0071 [0.0515, 0.1785]", "0.2150 ± 0.0071 [0.1515, 0.2785]", "0.1650"]
    ece_table = text.split("### ece")[1].split("###")[0]
    rows = [line.strip("|").split("|")[0].strip() for line in ece_table.splitlines() if line.startswith("| 1, ")]
    assert rows == ["1, none", "1, histogram", "1, temperature"]  # the runs' order, none first: not sorted
    assert "4 runs; each cell" in text
    assert (tmp_path / "out" / "report_shift_ece.png").is_file()
    ood = pd.read_csv(tmp_path / "out" / "report_ood.csv")
    assert ood["n"].tolist() == [2, 2] and ood["auroc_mean"].tolist() == pytest.approx([0.85, 0.85])
    assert "0.8500 ± 0.0707" in (tmp_path / "out" / "report_ood.md").read_text()


@pytest.mark.parametrize(
    ("file", "content"),
    [("status.json", "{not json"), ("status.json", "[1, 2]"), ("config.yaml", "a: [unclosed"),
     ("config.yaml", "- a list"), (".hydra/hydra.yaml", "{{{"), ("metrics.csv", "split,calibrator\nval,none\n"),
     ("metrics.csv", "\x00\x01garbage\x02"), ("calibrators.json", "nope")],
    ids=["status-json", "status-list", "config-yaml", "config-list", "hydra-yaml", "metrics-columns",
         "metrics-bytes", "calibrators-json"],
)
def test_a_broken_run_is_listed_and_the_others_reported(tmp_path, file, content):
    for i in range(2):
        fake_run(tmp_path / "runs" / f"r{i}", {"seed": i, "loss": {"lam": 1.0}}, 0.1 + 0.1 * i)
    (tmp_path / "runs" / "r1" / file).write_text(content)
    summary = write_report([tmp_path / "runs"], tmp_path / "out")
    assert summary["n"].tolist() == [1] and summary["ece_mean"].tolist() == pytest.approx([0.1])
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Runs not finished (1)" in text and "broken" in text and file.split("/")[-1] in text


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--calibrators", "none,nope"], "--calibrators: no run has nope; the runs have none, temperature"),
     (["--grid-calibrator", "nope"], "--grid-calibrator nope: no run has it"),
     (["--pivot", "data.target"], "--pivot data.target: not a config key that differs between the runs; those are: loss.lam"),
     (["--table-metrics", "foo"], "'foo' in --table-metrics")],
)
def test_report_options_naming_nothing_are_refused(tmp_path, caplog, option, message):
    from calibrun.commands.report import report

    for i, lam in enumerate((1.0, 10.0)):
        fake_run(tmp_path / "runs" / f"r{i}", {"seed": 0, "loss": {"lam": lam}}, 0.1, params={"temperature": {"T": 1.5}})
    with pytest.raises(SystemExit) as exit_info:
        report([str(tmp_path / "runs"), "--out", str(tmp_path / "out"), *option])
    assert exit_info.value.code == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert message in error


def test_an_unwritable_out_folder_is_one_line(tmp_path, caplog, monkeypatch):
    from calibrun import report as report_lib
    from calibrun.commands.report import report

    fake_run(tmp_path / "runs" / "r0", {"seed": 0}, 0.1)

    def refuse(path, text):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(report_lib, "atomic_write_text", refuse)
    with pytest.raises(SystemExit) as exit_info:
        report([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert error.startswith("Cannot write") and "report.md: Permission denied" in error


def test_metrics_header_and_shared_settings_of_a_depth_sweep(run_cli, tmp_path):
    args = ["-m", *FAST, "model.depth=8,14", "trainer.epochs=1", "data.train_size=128", "calibrator=[temperature]",
            "run_name=depth"]
    assert run_cli(args).returncode == 0
    sweep = tmp_path / "outputs" / "multirun" / "depth"
    header = next(sweep.glob("*model.depth=14*/metrics.md")).read_text().splitlines()[:7]
    assert header[2:6] == ["- Data: synthetic", "- Model: resnet110 (depth=14, shortcut=A, width=16, "
                           "zero_init_residual=True)", "- Loss: ce",
                           "- Training: 1 epochs, batch 64, lr 0.05 cosine, seed 0"]
    write_report([sweep], tmp_path / "out")
    shared = next(line for line in (tmp_path / "out" / "report.md").read_text().splitlines()
                  if line.startswith("Same for all runs"))
    assert shared == "Same for all runs: data=synthetic, model=resnet110, loss=ce, trainer.epochs=1, trainer.batch_size=64"


def test_no_lambda_figure_when_lambda_does_not_vary_within_a_group(tmp_path):
    """Table 1: ce has no λ and gap, gap_cap one each; nothing to draw against λ."""
    for loss, lam in (("ce", None), ("gap", 10.0), ("gap_cap", 10.0)):
        fake_run(tmp_path / "runs" / loss, {"seed": 0, "loss": {"name": loss, **({"lam": lam} if lam else {})}}, 0.1)
    write_report([tmp_path / "runs"], tmp_path / "out")
    assert not (tmp_path / "out" / "ece_vs_lam.png").exists()
    for lam in (1.0, 3.0):
        fake_run(tmp_path / "runs" / f"gap{lam}", {"seed": 0, "loss": {"name": "gap", "lam": lam}}, 0.1)
    write_report([tmp_path / "runs"], tmp_path / "out")
    assert (tmp_path / "out" / "ece_vs_lam.png").is_file()


def test_keys_that_only_some_runs_have_do_not_split_the_groups_by_themselves():
    from calibrun.report import varying_keys

    trained = {"model": "resnet110", "model.depth": 8, "model.stage_widths": None, "data": "synthetic",
               "trainer.epochs": 2, "loss": "ce"}
    elsewhere = {"model": "my_net"}
    # stage_widths is null wherever it is set: a column of dashes would tell nothing.
    keys = ["model", "model.depth", "model.stage_widths", "data", "trainer.epochs", "loss"]
    assert varying_keys([trained, elsewhere], keys) == ["model", "model.depth"]
    # Table 1: λ belongs to gap and gap_cap, whose choice differs from ce's: it is shown.
    rows = [{"loss": "ce"}, {"loss": "gap", "loss.lam": 10.0}, {"loss": "gap_cap", "loss.lam": 10.0}]
    assert varying_keys(rows, ["loss", "loss.lam"]) == ["loss", "loss.lam"]
    # A ViT beside ResNet-18: the ViT's name is shown, the class count both share is not.
    nets = [{"model": "resnet18", "model.num_classes": 7, "model.stem": "imagenet"},
            {"model": "timm", "model.num_classes": 7, "model.name": "vit_small_patch16_224"}]
    assert varying_keys(nets, ["model", "model.num_classes", "model.stem", "model.name"]) == [
        "model", "model.stem", "model.name"]
    # An explicit null is a value: a sweep over data.train_subset=null,500 splits.
    subsets = [{"data.train_subset": None}, {"data.train_subset": 500}]
    assert varying_keys(subsets, ["data.train_subset"]) == ["data.train_subset"]
    assert varying_keys([trained, dict(trained)], keys) == []


def test_a_setting_is_named_shared_only_when_every_run_has_it(tmp_path):
    """A trained run beside logits made elsewhere: the report must not say that both used
    the trained run's data."""
    from calibrun.report import report_body

    runs = pd.DataFrame([{"run": "a", "state": "done", "data": "synthetic", "model": "resnet110"},
                         {"run": "b", "state": "done", "data": None, "model": "my_net"}])
    assert not any(line.startswith("Same for all runs") for line in report_body(runs, ["model"], pd.DataFrame(),
                                                                                 [], None, None))
    runs.loc[1, "data"] = "synthetic"
    assert "Same for all runs: data=synthetic" in report_body(runs, ["model"], pd.DataFrame(), [], None, None)


def test_a_collapsed_run_is_flagged_in_its_metrics_and_in_the_report(run_cli, tmp_path):
    """λ = 1000 on the bundled CIFAR-10 sample drowns the cross-entropy: the model stays at
    chance, and both its metrics.md and calibrun-report say it is not a result; a model that
    learnt (CE on the synthetic set) is not flagged."""
    quick = ["model=resnet110", "model.depth=8", "trainer=quick", "trainer.epochs=1", "trainer.batch_size=64",
             "trainer.progress=false", "calibrator=[temperature]", "run_name=flag", "metrics.resamples=100"]
    broken = run_cli(["-m", "data=cifar10_sample", "data.train_subset=1000", "data.test_subset=500",
                      "loss=gap_cap", "loss.lam=1000", *quick])
    assert broken.returncode == 0, broken.stderr[-2000:]
    learnt = run_cli(["-m", "data=synthetic", "loss=ce", *quick, "trainer.epochs=2"])
    assert learnt.returncode == 0, learnt.stderr[-2000:]
    runs = {p.parent.name: p.parent for p in (tmp_path / "outputs" / "multirun" / "flag").glob("*/DONE")}
    collapsed, fine = (next(run for name, run in runs.items() if key in name) for key in ("cifar10_sample", "synthetic"))

    table = pd.read_csv(collapsed / "metrics.csv")
    none_test = table[(table.split == "test") & (table.calibrator == "none")].iloc[0]
    assert none_test["accuracy"] < 0.325 and bool(none_test["collapsed"])  # 0.1 + 0.25 × 0.9 for ten classes
    assert "**Collapsed run: test accuracy" in (collapsed / "metrics.md").read_text()
    assert "below 0.3250" in (collapsed / "metrics.md").read_text()
    assert not pd.read_csv(fine / "metrics.csv")["collapsed"].any()
    assert "Collapsed" not in (fine / "metrics.md").read_text()

    out = tmp_path / "report"
    result = report_cli([str(tmp_path / "outputs" / "multirun" / "flag"), "--out", str(out), "--calibrators", "none"],
                        tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    report = (out / "report.md").read_text()
    assert "## Collapsed runs" in report and "| 1 of 1 " in report
    summary = pd.read_csv(out / "report.csv")
    assert sorted(summary["collapsed"]) == [0, 1]


def test_groups_sharing_a_paper_row_name_get_the_settings_that_tell_them_apart():
    from calibrun.report import distinct_labels, load_paper
    keys = ["loss", "loss.lam", "loss.warmup_epochs"]
    values = [("ce", np.nan, np.nan), ("gap_cap", 10.0, 0), ("gap_cap", 10.0, 4), ("gap", 10.0, 0)]
    assert distinct_labels(keys, values, load_paper("table1")) == [
        "CE", "capped CE + gap: loss.warmup_epochs=0", "capped CE + gap: loss.warmup_epochs=4", "CE + gap"]


def test_names_leave_out_keys_that_only_some_groups_have_with_one_value():
    """Logits made elsewhere beside a trained ResNet: the ResNet's width and depth tell
    nothing apart; where leaving them out would merge two names, they stay."""
    nan = float("nan")
    mixed = [("resnet110", 16.0, 8.0), ("external", nan, nan)]
    assert report.telling_keys(["model", "model.width", "model.depth"], mixed) == ["model"]
    assert report.distinct_labels(["model", "model.width", "model.depth"], mixed, None) == [
        "model=resnet110", "model=external"]
    only_presence = [("gap", nan), ("gap", 1.0)]
    assert report.telling_keys(["loss", "loss.lam"], only_presence) == ["loss", "loss.lam"]


def _external_group(tmp_path, name, seed, logits, labels, val):
    from calibrun.calibration import calibrate_external
    from calibrun.compose import config_dir
    from calibrun.logits import save_logits

    test = tmp_path / f"{name}{seed}_test.npz"
    save_logits(test, logits, labels)
    calibrate_external(val, test, tmp_path / "runs" / f"{name}{seed}", ["calibrator=[temperature]", "metrics.resamples=100"],
                       __import__("pathlib").Path(config_dir()), name=name, seed=seed)


def test_baseline_marks_the_group_better_on_every_image_and_not_its_copy(tmp_path):
    """Group B's logits give the true class more weight on every test image than A's:
    its paired NLL and Brier differences to A are negative, significant after Holm and
    marked; group C (A's own logits) differs by exactly 0 and is not marked."""
    from conftest import REPO

    fixture = REPO / "tests" / "fixtures" / "demo_logits"
    with np.load(fixture / "test.npz") as data:
        logits, labels = data["logits"], data["labels"]
    boost = np.eye(logits.shape[1], dtype=np.float32)[labels]
    for seed in (0, 1):
        _external_group(tmp_path, "A", seed, logits, labels, fixture / "val.npz")
        _external_group(tmp_path, "B", seed, logits + boost, labels, fixture / "val.npz")
        _external_group(tmp_path, "C", seed, logits, labels, fixture / "val.npz")
    out = tmp_path / "report"
    result = report_cli([str(tmp_path / "runs"), "--out", str(out), "--calibrators", "none", "--baseline", "model=A"],
                        tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(out / "report_differences.csv").set_index(["model", "metric"])
    assert set(table.index.get_level_values("model")) == {"B", "C"} and (table["seeds"] == 2).all()
    for metric in ("nll", "brier"):
        row = table.loc[("B", metric)]
        assert row["difference"] < 0 and row["hi"] < 0 and row["significant"] and row["better"]
    assert (table.loc["C", "difference"] == 0).all() and not table.loc["C", "significant"].any()
    assert table["p_holm"].ge(table["p"]).all()
    text = (out / "report.md").read_text()
    section = text[text.index("## Paired differences to model=A"):]
    b_line = next(line for line in section.splitlines() if line.startswith("| B "))
    c_line = next(line for line in section.splitlines() if line.startswith("| C "))
    assert b_line.count("*") >= 2 and "*" not in c_line
    # Two seeds per group: the main table gives the t-interval beside mean ± std.
    assert "[95% t-interval of the mean]" in text and " ± " in text


def test_holm_adjusts_by_rank_and_keeps_the_order():
    """Holm (1979) on p = (0.01, 0.04, 0.03, 0.2): ranks 1..4 scaled by 4, 3, 2, 1 give
    0.04, 0.09, 0.08, 0.2; made non-decreasing in rank: 0.04, 0.09, 0.09, 0.2."""
    from calibrun.comparison import holm

    assert holm(np.array([0.01, 0.04, 0.03, 0.2])) == pytest.approx([0.04, 0.09, 0.09, 0.2])


def test_baseline_naming_no_group_is_refused(tmp_path):
    from conftest import REPO

    fixture = REPO / "tests" / "fixtures" / "demo_logits"
    with np.load(fixture / "test.npz") as data:
        logits, labels = data["logits"], data["labels"]
    _external_group(tmp_path, "A", 0, logits, labels, fixture / "val.npz")
    _external_group(tmp_path, "B", 0, logits, labels, fixture / "val.npz")
    result = report_cli([str(tmp_path / "runs"), "--out", str(tmp_path / "r"), "--baseline", "loss=ce"], tmp_path)
    assert result.returncode == 1 and "--baseline: loss does not tell the runs apart; the keys that do: model" in result.stderr
    result = report_cli([str(tmp_path / "runs"), "--out", str(tmp_path / "r"), "--baseline", "model=Z"], tmp_path)
    assert result.returncode == 1 and "no finished run is in that group; the groups: model=A; model=B" in result.stderr


def test_a_run_evaluated_before_the_new_metrics_still_reports_with_empty_cells(tmp_path):
    from conftest import REPO

    fixture = REPO / "tests" / "fixtures" / "demo_logits"
    with np.load(fixture / "test.npz") as data:
        logits, labels = data["logits"], data["labels"]
    _external_group(tmp_path, "A", 0, logits, labels, fixture / "val.npz")
    metrics_csv = tmp_path / "runs" / "A0" / "metrics.csv"
    old = pd.read_csv(metrics_csv)
    old.drop(columns=[c for c in old if c.startswith(("smooth_ece", "debiased_l2_ce")) or c.endswith(("_lo", "_hi"))]).to_csv(
        metrics_csv, index=False)
    summary = write_report([tmp_path / "runs"], tmp_path / "r", table_metrics=["ece", "smooth_ece"])
    assert summary["ece_mean"].notna().all() and summary["smooth_ece_mean"].isna().all()


def test_keys_choose_the_tables_columns_but_must_still_tell_the_rows_apart(tmp_path):
    """Three runs that differ in loss.lam and loss.margin: --keys loss.lam shows one key
    column (the CSV keeps both); a key set that would merge two rows is refused."""
    for name, lam, margin in (("a", 1.0, 5.0), ("b", 2.0, 5.0), ("c", 2.0, 10.0)):
        fake_run(tmp_path / "runs" / name, {"seed": 0, "loss": {"lam": lam, "margin": margin}}, 0.1)
    write_report([tmp_path / "runs"], tmp_path / "out", name="narrow", table_keys=["loss.lam", "loss.margin"])
    header = next(line for line in (tmp_path / "out" / "narrow.md").read_text().splitlines() if line.startswith("|"))
    assert "loss.lam" in header and "loss.margin" in header
    write_report([tmp_path / "runs"], tmp_path / "out", name="full")
    with pytest.raises(UserError, match=r"--keys loss.lam: rows that differ in loss.margin would look the same"):
        write_report([tmp_path / "runs"], tmp_path / "out", name="merged", table_keys=["loss.lam"])
    with pytest.raises(UserError, match=r"--keys: loss.gamma is not a config key that differs"):
        write_report([tmp_path / "runs"], tmp_path / "out", name="unknown", table_keys=["loss.gamma"])
    assert {"loss.lam", "loss.margin"} <= set(pd.read_csv(tmp_path / "out" / "narrow.csv").columns)


def test_keys_leave_out_a_column_the_rows_do_not_need(tmp_path):
    for name, experiment, lam in (("a", "one", 1.0), ("b", "two", 2.0)):
        fake_run(tmp_path / "runs" / name, {"seed": 0, "loss": {"lam": lam}}, 0.1)
        hydra = {"hydra": {"runtime": {"choices": {"experiment": experiment}}}}
        (tmp_path / "runs" / name / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    write_report([tmp_path / "runs"], tmp_path / "out", name="r", table_keys=["experiment"])
    header = next(line for line in (tmp_path / "out" / "r.md").read_text().splitlines() if line.startswith("|"))
    assert "experiment" in header and "loss.lam" not in header


def test_selective_risks_and_conformal_columns_are_averaged_over_seeds(tmp_path):
    for seed, (risk, covered) in enumerate(((0.2, 0.9), (0.4, 0.8))):
        folder = tmp_path / "runs" / f"seed{seed}"
        fake_run(folder, {"seed": seed, "loss": {"_target_": "calibrun.losses.CrossEntropy"}}, 0.1)
        metrics = pd.read_csv(folder / "metrics.csv").assign(risk_at_90=risk, set_coverage_aps=covered)
        metrics.to_csv(folder / "metrics.csv", index=False)
    write_report([tmp_path / "runs"], tmp_path / "out", name="t", table_metrics=["risk_at_90", "set_coverage_aps"])
    text = (tmp_path / "out" / "t.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| none"))
    # Two seeds: 0.3 ± 0.1414 and 0.85 ± 0.0707, each with its t-interval.
    assert "0.3000 ± 0.1414 [" in row and "0.8500 ± 0.0707 [" in row
    with pytest.raises(UserError, match=r"'risk_at_99' in --table-metrics; choose from .*risk_at_90, set_coverage_aps"):
        write_report([tmp_path / "runs"], tmp_path / "out", table_metrics=["risk_at_99"])
