"""``calibrun-calibrate``: refitting calibrators of a finished run from its saved logits."""

import subprocess
import sys

import pandas as pd
from conftest import FAST


def calibrate(args, cwd):
    return subprocess.run([sys.executable, "-c", "from calibrun.cli import calibrate; calibrate()", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=600)


def test_refit_a_subset_keeps_the_other_rows_and_the_checkpoint(run_cli, tmp_path):
    assert run_cli([*FAST, "calibrator=[temperature,isotonic]", "run_name=r"]).returncode == 0
    run_dir = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "r"
    ckpt = run_dir / "checkpoints" / "last.pt"
    before_ckpt = ckpt.stat().st_mtime_ns
    before = pd.read_csv(run_dir / "metrics.csv")
    (run_dir / "figures" / "reliability_temperature.png").unlink()

    proc = calibrate([str(run_dir), "calibrator=[temperature,histogram]"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
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


def test_unfinished_folder_is_refused(tmp_path):
    (tmp_path / "half" / "logits").mkdir(parents=True)
    proc = calibrate([str(tmp_path / "half")], tmp_path)
    assert proc.returncode == 1
    assert "is not a finished calibrun run" in proc.stderr and "DONE" in proc.stderr
    assert "Traceback" not in proc.stderr
