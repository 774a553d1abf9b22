"""calibrun-report over a λ × seed sweep, repeated sweeps, and failed jobs."""

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import FAST

from calibrun import UserError
from calibrun.config import NON_EXPERIMENT_KEYS
from calibrun.metrics import METRIC_NAMES
from calibrun.report import aggregate, collect, lam_curves, write_report

SWEEP = ["-m", "loss=gap_cap", "loss.lam=0,1,10", "seed=0,1", *FAST, "trainer.epochs=1",
         "calibrator=[temperature]", "run_name=sweep"]


def report_cli(args, cwd):
    return subprocess.run([sys.executable, "-c", "from calibrun.cli import report; report()", *args],
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


def fake_run(folder, config: dict, ece: float) -> None:
    """A finished run folder as calibrun-report reads it: .hydra/, config.yaml, DONE, metrics.csv."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "DONE").write_text("")
    rows = [{"split": split, "calibrator": "none", **dict.fromkeys(METRIC_NAMES, 0.5), "ece": ece, "n": 10}
            for split in ("val", "test")]
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)


def test_runs_differing_only_in_non_experiment_keys_seed_and_calibrators_form_one_group(tmp_path):
    for i, ece in enumerate((0.1, 0.2, 0.3)):
        config = {"seed": i, "loss": {"_target_": "calibrun.losses.GapCap", "lam": 1.0}, "trainer": {"epochs": 2},
                  "calibrator": {"histogram": {"_target_": "calibrun.calibrators.HistogramBinning", "n_bins": 5 + i}}}
        for key in NON_EXPERIMENT_KEYS:
            _set(config, key, f"value-{i}")
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
    assert gap_cap.label == "gap_cap, none" and nts.label == "nts, none"
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
    from calibrun.cli import report

    fake_run(tmp_path / "runs" / "r0", {"seed": 0, "loss": {"lam": 10.0}}, 0.1)
    caption = "Paper's network (gapcap_net), λ = 10: the mean-CE reading."
    # The grid calibrator is one the fake run lacks, so no figure needs its bins.
    common = [str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--grid-calibrator", "temperature"]
    report([*common, "--name", "with", "--caption", caption])
    report([*common, "--name", "without"])
    assert (tmp_path / "out" / "with.md").read_text().splitlines()[:4] == ["# with", "", caption, ""]
    without = (tmp_path / "out" / "without.md").read_text()
    assert caption not in without and without.splitlines()[2].startswith("1 runs under")
