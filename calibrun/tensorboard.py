"""Optional TensorBoard logging (``trainer.tensorboard=true``) of the per-epoch values
that ``history.csv`` records, for watching a run while it trains."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

from calibrun import UserError

# history.csv column -> TensorBoard tag; the step of every scalar is the 1-based epoch.
TAGS = {
    "train_loss": "loss/train",
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "val_ece": "ece/val",
    "lr": "learning_rate",
    "images_per_s": "throughput/images_per_s",
}


def require_tensorboard(enabled: bool) -> None:
    """Fail before any data is read when ``trainer.tensorboard=true`` cannot be honoured."""
    if not enabled:
        return
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise UserError("trainer.tensorboard=true needs TensorBoard: pip install 'calibrun[tensorboard]' "
                        "(or pip install tensorboard).") from None


class EpochBoard:
    """Writes each epoch's row under ``run_dir/tensorboard`` when enabled; does nothing
    otherwise. ``epochs_done`` is where a resumed run starts: events of later epochs left
    by the interrupted process are dropped (they are trained again)."""

    def __init__(self, run_dir: Path, enabled: bool, epochs_done: int) -> None:
        self.writer = None
        if not enabled:
            return
        require_tensorboard(enabled)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=epochs_done + 1)

    def write(self, row: dict) -> None:
        if self.writer is None:
            return
        for column, tag in TAGS.items():
            self.writer.add_scalar(tag, row[column], global_step=row["epoch"])
        self.writer.flush()

    def __enter__(self) -> EpochBoard:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self.writer is not None:
            self.writer.close()
