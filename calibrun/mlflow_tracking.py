"""Optional MLflow tracking (``trainer.mlflow=true``): the run's resolved config as
parameters, the per-epoch values of ``history.csv`` as metrics at their epoch, and every
calibrator's final test metrics, in one MLflow run named after the run folder.

Where: ``MLFLOW_TRACKING_URI`` when set, else a SQLite store in the run folder
(``sqlite:///<run>/mlflow.db``; MLflow 3 keeps its old ``./mlruns`` file store in
maintenance mode and refuses it by default). ``mlflow ui --backend-store-uri
sqlite:///<run>/mlflow.db`` shows it. A resumed run continues the same MLflow run, whose
id ``mlflow.json`` keeps; epochs trained again after an interruption are logged again at
the same step.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import pandas as pd

from calibrun import UserError
from calibrun._io import atomic_write_text

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

EXPERIMENT = "calibrun"
RUN_ID_FILE = "mlflow.json"
# history.csv columns logged each epoch (step: the 1-based epoch).
EPOCH_METRICS = ("train_loss", "train_acc", "val_acc", "val_ece", "lr", "images_per_s")
# MLflow's longest parameter value; longer ones (a long list) are cut.
_PARAM_LENGTH = 6000


def require_mlflow(enabled: bool) -> None:
    """Fail before any data is read when ``trainer.mlflow=true`` cannot be honoured."""
    if not enabled:
        return
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise UserError("trainer.mlflow=true needs MLflow: pip install 'calibrun[mlflow]' "
                        "(or pip install mlflow-skinny).") from None


def tracking_uri(run_dir: Path) -> str:
    """``MLFLOW_TRACKING_URI``, or the SQLite store in ``run_dir``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def flat(node: object, prefix: str = "") -> dict[str, object]:
    """A nested config as ``{"trainer.lr": 0.1, ...}``, lists kept whole."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, object] = {}
    for key, value in node.items():
        out.update(flat(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out


class MlflowRun:
    """The MLflow run of a calibrun run when ``enabled``; does nothing otherwise."""

    def __init__(self, run_dir: Path, enabled: bool, params: dict[str, object]) -> None:
        self.client, self.run_id = None, ""
        if not enabled:
            return
        require_mlflow(enabled)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri(run_dir))
        self.run_id = self._open(self.client, run_dir, params)

    @staticmethod
    def _open(client: MlflowClient, run_dir: Path, params: dict[str, object]) -> str:
        """The run id kept in ``mlflow.json`` (a resumed run), or a new run with ``params``."""
        from mlflow.entities import Param

        path = run_dir / RUN_ID_FILE
        uri = tracking_uri(run_dir)
        if path.is_file():
            kept = json.loads(path.read_text())
            if kept.get("tracking_uri") == uri:
                client.update_run(kept["run_id"], status="RUNNING")
                return kept["run_id"]
        experiment = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
        run_id = client.create_run(experiment_id, run_name=run_dir.name).info.run_id
        values = [Param(key, str(value)[:_PARAM_LENGTH]) for key, value in params.items()]
        for start in range(0, len(values), 100):  # MLflow takes at most 100 parameters per batch
            client.log_batch(run_id, params=values[start:start + 100])
        atomic_write_text(path, json.dumps({"run_id": run_id, "tracking_uri": uri}) + "\n")
        return run_id

    def epoch(self, row: dict) -> None:
        """One row of history.csv."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(name, float(row[name]), now, int(row["epoch"]))
                                                    for name in EPOCH_METRICS])

    def final(self, table: pd.DataFrame, metrics: tuple[str, ...]) -> None:
        """``test.<calibrator>.<metric>`` of every test row of ``table`` (metrics.csv)."""
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        test = table[table["split"] == "test"]
        values = [Metric(f"test.{row['calibrator']}.{name}", float(row[name]), now, 0)
                  for _, row in test.iterrows() for name in metrics if pd.notna(row.get(name))]
        for start in range(0, len(values), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=values[start:start + 1000])

    def __enter__(self) -> MlflowRun:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self.client is not None:
            status = "FINISHED" if error is None else "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            self.client.set_terminated(self.run_id, status=status)
