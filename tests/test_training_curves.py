"""Training curves: ``figures/training_curves.png`` in every run and, with
``trainer.tensorboard=true``, the same per-epoch values as TensorBoard events."""

import pandas as pd
import pytest
from conftest import FAST
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from calibrun import UserError, plots
from calibrun.tensorboard import TAGS, EpochBoard, require_tensorboard


def scalars(folder) -> dict[str, dict[int, float]]:
    """Every scalar under ``folder``: tag -> {step: value} (the last event of a step wins,
    as TensorBoard shows it)."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_a_run_draws_its_curves_and_logs_every_epoch_to_tensorboard(run_cli, tmp_path):
    proc = run_cli([*FAST, "trainer.epochs=3", "trainer.tensorboard=true", "trainer.select=best_val",
                    "calibrator=[temperature]", "run_name=tb"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "tb"
    assert (run_dir / "figures" / "training_curves.png").stat().st_size > 10_000
    history = pd.read_csv(run_dir / "history.csv")
    logged = scalars(run_dir / "tensorboard")
    assert set(logged) == set(TAGS.values())
    for column, tag in TAGS.items():
        assert list(logged[tag]) == [1, 2, 3]
        # Event files store float32.
        assert list(logged[tag].values()) == pytest.approx(history[column].tolist(), rel=1e-6)


def test_without_the_option_no_events_are_written(run_cli, tmp_path):
    assert run_cli([*FAST, "trainer.epochs=1", "calibrator=[temperature]", "run_name=plain"]).returncode == 0
    run_dir = tmp_path / "outputs" / "runs" / "synthetic" / "ce" / "plain"
    assert not (run_dir / "tensorboard").exists() and (run_dir / "figures" / "training_curves.png").is_file()


def test_the_figure_names_the_model_and_loss_as_the_table_does(compose_cfg, tmp_path, monkeypatch):
    """A preset's depth=8 ResNet is not called ResNet-110 in the figure while the table
    says depth=8: both read one description."""
    from calibrun import train

    titles = []
    monkeypatch.setattr(train, "training_curves", lambda *args, title, **kwargs: titles.append(title))
    train.run(compose_cfg([*FAST, "trainer.epochs=1", "loss=gap_cap", "loss.lam=3", "calibrator=[temperature]"]),
              tmp_path / "run")
    header = (tmp_path / "run" / "metrics.md").read_text().splitlines()
    model = next(line for line in header if line.startswith("- Model: ")).removeprefix("- Model: ")
    loss = next(line for line in header if line.startswith("- Loss: ")).removeprefix("- Loss: ")
    assert "depth=8" in model and "lam=3" in loss
    assert f"model={model}" in titles[0] and f"loss={loss}" in titles[0]


def row(epoch: int, value: float) -> dict:
    return {"epoch": epoch, **{column: value for column in TAGS}}


def test_a_resumed_run_replaces_the_epochs_it_trains_again(tmp_path):
    """Killed after logging epoch 2 but checkpointed after epoch 1: TensorBoard shows the
    resumed run's epoch 2 only, not both (equal steps are not caught as out of order)."""
    with EpochBoard(tmp_path, True, epochs_done=0) as board:
        for epoch in (1, 2):
            board.write(row(epoch, 0.5 * epoch))
    with EpochBoard(tmp_path, True, epochs_done=1) as board:
        board.write(row(2, 0.75))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss/train")] == [(1, 0.5), (2, 0.75)]


def test_missing_tensorboard_is_a_user_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(UserError, match=r"pip install 'calibrun\[tensorboard\]'"):
        require_tensorboard(True)
    require_tensorboard(False)  # nothing needed when off


def test_the_curves_need_at_least_one_epoch(tmp_path):
    history = pd.DataFrame([{"epoch": e, "lr": 0.1 / e, "train_loss": 1 / e, "train_acc": 0.2 * e,
                             "val_acc": [0.3, 0.6, 0.5][e - 1], "val_ece": 0.1} for e in (1, 2, 3)])
    plots.training_curves(history, tmp_path / "curves.png", title="t", selected_epoch=2)
    assert (tmp_path / "curves.png").is_file()
    with pytest.raises(ValueError, match="at least one epoch"):
        plots.training_curves(history.iloc[:0], tmp_path / "empty.png")
