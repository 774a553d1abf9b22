"""trainer.mlflow=true: the run's config, per-epoch values and final metrics in MLflow,
read back with MLflow's own client."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
from conftest import FAST, only_run_dir

from calibrun import UserError
from calibrun.mlflow_tracking import require_mlflow, tracking_uri

pytest.importorskip("mlflow")


def test_params_epoch_metrics_and_final_metrics_read_back(run_cli, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    proc = run_cli([*FAST, "trainer.mlflow=true", "calibrator=[temperature]", "run_name=tracked"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri(run_dir))
    assert tracking_uri(run_dir).startswith("sqlite:///") and (run_dir / "mlflow.db").is_file()
    run = client.get_run(json.loads((run_dir / "mlflow.json").read_text())["run_id"])
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    assert run.data.params["trainer.epochs"] == "2" and run.data.params["model.depth"] == "8"
    assert run.data.params["calibrator.temperature._target_"] == "calibrun.calibrators.TemperatureScaling"
    history = pd.read_csv(run_dir / "history.csv")
    for column in ("train_loss", "val_acc", "val_ece", "lr"):
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, column))
        assert logged == [(int(e), pytest.approx(v, rel=1e-9)) for e, v in zip(history["epoch"], history[column])]
    metrics = pd.read_csv(run_dir / "metrics.csv").query("split == 'test'").set_index("calibrator")
    for name in ("ece", "nll", "aurc", "risk_at_90"):
        assert run.data.metrics[f"test.temperature.{name}"] == pytest.approx(metrics.loc["temperature", name])
    assert run.data.metrics["test.none.accuracy"] == pytest.approx(metrics.loc["none", "accuracy"])


def test_without_mlflow_the_run_stops_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(UserError, match=r"trainer.mlflow=true needs MLflow: pip install 'calibrun\[mlflow\]'"):
        require_mlflow(True)
    require_mlflow(False)
