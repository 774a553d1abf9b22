"""The run: build the parts, fit, checkpoint, resume, collect logits.

The config object reaches this module from the ``calibrun`` command (its schemas and
validation live in ``config.py``; docs/design.md §1 lists who else sees it). Components
are built with ``hydra.utils.instantiate`` from their ``_target_`` entries; the loop
calls the same hooks on every loss and never asks which loss or calibrator it runs
(docs/design.md §7).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

import calibrun
from calibrun import UserError
from calibrun._io import atomic_torch_save, atomic_write_text, remove_stale_temp_files
from calibrun.calibration import (build_calibrators, calibrate_and_report, console_table, decision_columns,
                                  describe_components,
                                  metric_settings)
from calibrun.config import Select, build_component, config_fingerprint, validate
from calibrun.data import DeviceLoader, Split
from calibrun.duration import DurationEstimate, run_eta
from calibrun.logits import save_logits
from calibrun.losses import Loss, as_loss
from calibrun.metrics import METRIC_NAMES, accuracy, ece
from calibrun.plots import training_curves
from calibrun.predict import load_checkpoint, predict, resolve_device
from calibrun.robustness import Predictor, evaluate_beyond_test
from calibrun.runfolder import (CONFIG, RunLock, check_same_experiment, group_choices, is_done, logits_file,
                                mark_done, recorded_epoch, write_status)
from calibrun.mlflow_tracking import MlflowRun, flat, require_mlflow
from calibrun.tensorboard import EpochBoard, require_tensorboard

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_acc", "val_ece", "seconds", "images_per_s"]


# --------------------------------------------------------------------------- run folder helpers


def _git_commit() -> str | None:
    for where in (Path(calibrun.__file__).parent, Path.cwd()):
        try:
            out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                                 timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def environment(device: torch.device, seed: int) -> dict:
    """Versions, commit, device and scheduler ids: what it takes to repeat the run."""
    import hydra
    import torchvision

    return {
        "calibrun": calibrun.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "hydra": hydra.__version__,
        "numpy": np.__version__,
        "cuda": torch.version.cuda,
        "git_commit": _git_commit(),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "seed": seed,
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "argv": sys.argv,
    }


def seed_everything(seed: int, deterministic: bool) -> None:
    if deterministic:
        # cuBLAS is only reproducible with a fixed workspace; read when CUDA first starts cuBLAS.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # cudnn.benchmark picks the fastest kernels for the fixed training shapes
    # (drop_last keeps them fixed), at the price of run-to-run bit differences.
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def write_history(run_dir: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "history.csv", buf.getvalue())


# --------------------------------------------------------------------------- building


def build(cfg: DictConfig) -> tuple[Any, torch.nn.Module, Loss, dict]:
    """Instantiate data, model, loss and calibrators; config errors surface here, before
    any data is read."""
    loss, model, data = (build_component(cfg[key], key) for key in ("loss", "model", "data"))
    return data, model, as_loss(loss), build_calibrators(cfg.calibrator)


def build_optimization(cfg: DictConfig, model: torch.nn.Module, steps_per_epoch: int) -> tuple[Any, Any]:
    """The optimizer (``conf/optimizer``) over the model's parameters and its per-step
    learning-rate schedule (``conf/scheduler``), both built from config partials."""
    make_optimizer = build_component(cfg.optimizer, "optimizer")
    make_scheduler = build_component(cfg.scheduler, "scheduler")
    try:
        optimizer = make_optimizer(model.parameters())
        return optimizer, make_scheduler(optimizer, steps_per_epoch=steps_per_epoch)
    except (TypeError, ValueError) as err:
        raise UserError(f"Cannot build the optimizer or scheduler ({cfg.optimizer._target_}, "
                        f"{cfg.scheduler._target_}): {err}") from None


# --------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    """Every random stream a resumed run must continue: Python's, NumPy's, torch's CPU
    generator and, once CUDA is in use, every GPU's (mixup draws there on a GPU)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    # torch.load maps tensors to the run's device; generator states must be CPU tensors.
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


@dataclasses.dataclass
class Progress:
    """Where training stands: epochs finished, their history rows, and the state of an
    epoch interrupted midway (batches done, running sums), if any."""

    epoch: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    partial: dict | None = None


# Seconds between progress lines in the log when no progress bar is shown.
HEARTBEAT_S = 30.0
# What a checkpoint holds (Checkpointer.save).
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "rng", "fingerprint", "epoch", "history", "partial")


class Checkpointer:
    """Saves and restores what a resumed run needs to continue exactly: the weights, the
    optimizer and scheduler, the loss's own state (AdaFocal's γ), every RNG stream and the
    :class:`Progress`, stamped with the config fingerprint so that a changed experiment is
    never resumed."""

    def __init__(self, path: Path, fingerprint: str, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                 loss_fn: Loss) -> None:
        self.path, self.fingerprint = path, fingerprint
        self.model, self.optimizer, self.scheduler, self.loss_fn = model, optimizer, scheduler, loss_fn

    def save(self, progress: Progress) -> None:
        atomic_torch_save({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "loss": self.loss_fn.state_dict(), "rng": rng_state(),
            "fingerprint": self.fingerprint, "epoch": progress.epoch, "history": progress.history,
            "partial": progress.partial,
        }, self.path)

    def restore(self, device: torch.device) -> Progress:
        """The saved progress, with every part restored; a fresh start if there is none."""
        if not self.path.exists():
            return Progress()
        # A stateless loss needs no "loss" entry: checkpoints written before losses had state resume.
        stateful = ("loss",) if self.loss_fn.state_dict() else ()
        state = load_checkpoint(self.path, device, CHECKPOINT_KEYS + stateful)
        if state["fingerprint"] != self.fingerprint:
            # Config differences were named before anything was built (runfolder); what is
            # left is the data: other images or labels under the same config.
            run_dir = self.path.parent.parent
            raise UserError(
                f"Refusing to resume {run_dir}: the images or labels it would read are not those it was started "
                f"with (same config; is data.root the same data?). Point data.root at the original data, or use a "
                f"new run_name for a new experiment."
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if stateful:
            self.loss_fn.load_state_dict(state["loss"])
        set_rng_state(state["rng"])
        progress = Progress(state["epoch"], state["history"], state["partial"])
        log.info("Resuming from %s after epoch %d%s.", self.path, progress.epoch,
                 f" and {progress.partial['step']} steps of the next" if progress.partial else "")
        return progress


class BestWeights:
    """With ``trainer.select=best_val``, keeps the weights of the epoch with the best
    validation accuracy in ``checkpoints/best.pt``; otherwise does nothing."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def offer(self, model: torch.nn.Module, epoch: int, val_acc: float, history: list[dict]) -> None:
        if self.enabled and val_acc > max((h["val_acc"] for h in history), default=-1.0):
            atomic_torch_save({"model": model.state_dict(), "epoch": epoch}, self.path)

    def select(self, model: torch.nn.Module, device: torch.device) -> None:
        if self.enabled:
            best = load_checkpoint(self.path, device)
            model.load_state_dict(best["model"])
            log.info("Evaluating the weights of epoch %d, the best validation accuracy.", best["epoch"])


# --------------------------------------------------------------------------- the loop


class Interrupted(UserError):
    """SIGTERM/SIGUSR1 arrived; what there was to keep was saved and the run can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class SignalFlag:
    """Turns SIGTERM/SIGUSR1/SIGUSR2 into :class:`Interrupted`, after the previous handler (submitit's
    requeue, say) has run. SLURM sends one of them before killing a job (``--signal``,
    submitit's ``signal_delay_s``).

    With ``defer=True`` (the training loop) the signal is only recorded, so the loop can
    checkpoint at the next batch and then call :meth:`hand_over`; without it (data loading,
    prediction, calibration, writing) the run stops at once, as nothing needs saving there.
    """

    # SIGUSR2 is submitit's preemption/timeout signal (SUBMITIT_PREEMPT_SIGNAL), SIGUSR1 the
    # usual `sbatch --signal`, SIGTERM what `scancel` and most schedulers send.
    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))

    def __init__(self, defer: bool = False) -> None:
        self.defer = defer
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: Any) -> None:
        self.received = signum
        if not self.defer:
            self.hand_over()

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _previous_handler(self) -> Any:
        """The handler before ours, looking through enclosing SignalFlags (which learn of
        the signal on the way, so that their run records it)."""
        assert self.received is not None, "only a received signal is handed over"
        handler = self.previous.get(self.received)
        outer = getattr(handler, "__self__", None)
        if isinstance(outer, SignalFlag):
            outer.received = self.received
            return outer._previous_handler()
        return handler

    def hand_over(self) -> None:
        """Run the handler that was there before ours, then stop the run."""
        handler = self._previous_handler()
        signum = typing.cast(int, self.received)  # set: _previous_handler asserted it
        if callable(handler):
            handler(signum, None)
        saved = "a checkpoint was saved" if self.defer else "nothing needed saving at this point"
        name = signal.Signals(signum).name
        raise Interrupted(f"Interrupted by {name}; {saved}, and the run can be resumed.", signum)


@dataclasses.dataclass
class Training:
    """The built parts the loop works with."""

    model: torch.nn.Module
    forward: torch.nn.Module  # the model, or its torch.compile wrapper (a Module too)
    loss_fn: Loss
    optimizer: Any
    scheduler: Any
    train_loader: DeviceLoader
    eval_loaders: dict[str, DeviceLoader]
    amp: bool
    checkpointer: Checkpointer
    best: BestWeights


def optimizer_step(tr: Training, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on one batch; returns the loss and the logits (not detached)."""
    inputs, targets = tr.loss_fn.mix(x, y)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=tr.amp):
        logits = tr.forward(inputs)
    loss = tr.loss_fn(logits.float(), targets)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    tr.optimizer.step()
    tr.scheduler.step()
    return loss, logits


def train_epoch(tr: Training, epoch: int, progress: Progress, interrupt: SignalFlag, bar_desc: str | None,
                estimate: DurationEstimate) -> dict:
    """One pass over the training split, continuing ``progress.partial`` if the epoch was
    interrupted before. On SIGTERM/SIGUSR1 it checkpoints mid-epoch and stops the run.
    Returns the epoch's loss and accuracy, images seen and start time."""
    tr.loss_fn.set_epoch(epoch)
    tr.train_loader.set_epoch(epoch)
    tr.model.train()
    resumed, progress.partial = progress.partial or {}, None
    device = tr.train_loader.device
    # Sums stay on the device: one synchronisation per epoch, not per step.
    loss_sum = torch.zeros((), device=device) + resumed.get("loss_sum", 0.0)
    correct = torch.zeros((), device=device, dtype=torch.long) + resumed.get("correct", 0)
    seen, skip = resumed.get("seen", 0), resumed.get("step", 0)
    started = time.perf_counter() - resumed.get("seconds", 0.0)
    batches = tqdm(tr.train_loader.iterate(skip), total=len(tr.train_loader), initial=skip, unit="batch",
                   desc=bar_desc, leave=False, disable=None if bar_desc else True)
    last_line = time.monotonic()
    for step, (x, y) in enumerate(batches, start=skip):
        loss, logits = optimizer_step(tr, x, y)
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        estimate.batch_done()
        if not batches.disable and step % 20 == 0:
            batches.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", refresh=False)  # one sync per 20 steps
        if batches.disable and time.monotonic() - last_line >= HEARTBEAT_S:
            # No progress bar (not a terminal, or trainer.progress=false): a line now and then.
            last_line = time.monotonic()
            log.info("epoch %d: batch %d/%d, loss %.4f, %.0f img/s", epoch + 1, step + 1, len(tr.train_loader),
                     loss_sum.item() / seen, seen / (time.perf_counter() - started))
        if interrupt.received is not None:
            progress.partial = {"step": step + 1, "loss_sum": loss_sum.item(), "correct": correct.item(),
                                "seen": seen, "seconds": time.perf_counter() - started}
            tr.checkpointer.save(progress)
            interrupt.hand_over()
    train_loss = loss_sum.item() / seen
    if not math.isfinite(train_loss):
        raise UserError(f"Non-finite training loss ({train_loss}) in epoch {epoch + 1}; stopping. "
                        f"Lower trainer.lr or check the loss hyperparameters.")
    return {"train_loss": train_loss, "train_acc": correct.item() / seen, "seen": seen, "started": started}


def validation_scores(tr: Training, n_bins: int) -> dict:
    """Accuracy and ECE of the current weights on the validation split, whose logits the
    loss is shown too (its ``observe_validation`` hook, before the next epoch)."""
    logits, labels = predict(tr.forward, tr.eval_loaders["val"])
    tr.loss_fn.observe_validation(logits, labels)
    probs = torch.softmax(logits.double(), dim=1).cpu().numpy()
    y = labels.cpu().numpy()
    return {"val_acc": accuracy(probs, y), "val_ece": ece(probs, y, n_bins)}


def fit(tr: Training, cfg: DictConfig, run_dir: Path, progress: Progress,
        on_epoch: Callable[[dict], None] = lambda row: None) -> None:
    """Train from ``progress`` to the last epoch: validate, record and checkpoint each;
    ``on_epoch`` receives each epoch's row of history.csv (the MLflow run's)."""
    t = cfg.trainer
    per_epoch = len(tr.train_loader)
    device = tr.train_loader.device
    estimate = DurationEstimate(
        batches_left=(t.epochs - progress.epoch) * per_epoch - (progress.partial or {}).get("step", 0),
        batches_per_epoch=per_epoch,
        synchronize=lambda: torch.cuda.synchronize(device) if device.type == "cuda" else None)
    with SignalFlag(defer=True) as interrupt, EpochBoard(run_dir, t.tensorboard, progress.epoch) as board:
        for epoch in range(progress.epoch, t.epochs):
            bar_desc = (f"epoch {epoch + 1}/{t.epochs}{run_eta(progress.history, t.epochs - epoch)}"
                        if t.progress else None)
            result = train_epoch(tr, epoch, progress, interrupt, bar_desc, estimate)
            row = {"epoch": epoch + 1, "lr": tr.optimizer.param_groups[0]["lr"], "train_loss": result["train_loss"],
                   "train_acc": result["train_acc"], **validation_scores(tr, cfg.metrics.n_bins)}
            seconds = time.perf_counter() - result["started"]
            estimate.epoch_done(seconds, t.epochs - epoch - 1)
            row.update(seconds=round(seconds, 3), images_per_s=round(result["seen"] / seconds, 1))
            tr.best.offer(tr.model, epoch + 1, row["val_acc"], progress.history)
            progress.history.append(row)
            progress.epoch = epoch + 1
            write_history(run_dir, progress.history)
            log.info("epoch %d/%d  loss %.4f  train_acc %.4f  val_acc %.4f  val_ece %.4f  %.0f img/s",
                     epoch + 1, t.epochs, row["train_loss"], row["train_acc"], row["val_acc"], row["val_ece"],
                     row["images_per_s"])
            board.write(row)
            on_epoch(row)
            if (epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == t.epochs or interrupt.received is not None:
                tr.checkpointer.save(progress)
            write_status(run_dir, "running", epoch=epoch + 1)
            if interrupt.received is not None:
                interrupt.hand_over()


def run(cfg: DictConfig, run_dir: Path, snapshot: Callable[[], None] | None = None) -> list[dict] | None:
    """Validate, then train and evaluate into ``run_dir``, which this process locks.

    A folder whose run had another config is refused before anything is written there; a
    finished one with the same config is skipped. ``snapshot`` (the command line's record
    of the config, ``.hydra/``) is called once the run is accepted. The run ends ``done``,
    ``failed`` or ``interrupted`` (a signal) in ``status.json``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = validate(cfg)
    with RunLock(run_dir), SignalFlag() as interrupt:
        check_same_experiment(run_dir, cfg)
        if is_done(run_dir):
            log.info("%s holds DONE with the same config: nothing to do.", run_dir)
            return None
        if snapshot is not None:
            snapshot()
        stale = remove_stale_temp_files(run_dir)
        if stale:
            log.info("Removed %d temporary file(s) left by writes that were interrupted.", stale)
        try:
            write_status(run_dir, "running", epoch=0)
            result = _train_and_evaluate(cfg, run_dir)
        except BaseException as err:
            interrupted = interrupt.received is not None or isinstance(err, KeyboardInterrupt)
            message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            # The epochs finished before the stop stay on record: a resume starts after them.
            write_status(run_dir, "interrupted" if interrupted else "failed", epoch=recorded_epoch(run_dir),
                         error=message)
            raise
        mark_done(run_dir)
    return result


def check_training_data(splits: dict[str, Split], num_classes: int, names: Sequence[str] | None) -> None:
    """Refuse data a model cannot be trained and judged on: an empty split, or a class
    without a training image (a K-way model would silently learn K − 1 classes)."""
    empty = [name for name, split in splits.items() if len(split) == 0]
    if empty:
        raise UserError(f"The {' and '.join(empty)} split has no images; check the data under data.root.")
    missing = sorted(set(range(num_classes)) - set(splits["train"].labels.unique().tolist()))
    if missing:
        shown = ", ".join(str(names[k]) if names is not None and k < len(names) else str(k) for k in missing)
        raise UserError(f"No training image of class {shown} ({len(missing)} of {num_classes}): the model would "
                        "never learn it. Check the data under data.root (an empty class folder or split file?).")


def data_fingerprint(splits: dict[str, Split]) -> str:
    """A hash of every split's images, labels and indices: the same data under another
    root or cache gives the same value; other images do not."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        digest.update(name.encode())
        for tensor in (splits[name].images, splits[name].labels, splits[name].index):
            digest.update(tensor.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def prepare(cfg: DictConfig, run_dir: Path) -> tuple[Training, dict[str, Split], dict]:
    """Record the config and environment, build every part and put the data on the device."""
    t = cfg.trainer
    device = resolve_device(t.device)
    require_tensorboard(t.tensorboard)
    require_mlflow(t.mlflow)
    seed_everything(cfg.seed, t.deterministic)
    atomic_write_text(run_dir / CONFIG, OmegaConf.to_yaml(cfg))
    atomic_write_text(run_dir / "env.json", json.dumps(environment(device, cfg.seed), indent=2))
    data, model, loss_fn, calibrators = build(cfg)
    amp = t.amp and device.type == "cuda"
    channels_last = t.channels_last and device.type == "cuda"
    log.info("Device %s (amp=%s, channels_last=%s). Run folder: %s", device, amp, channels_last, run_dir.resolve())
    splits = data.splits()
    log.info("Images: train %d, val %d, test %d", *(len(splits[s]) for s in ("train", "val", "test")))
    check_training_data(splits, data.num_classes, getattr(data, "classes", None))
    train_loader = DeviceLoader(splits["train"], t.batch_size, device, data.train_transform, shuffle=True,
                                drop_last=len(splits["train"]) > t.batch_size, seed=cfg.seed,
                                channels_last=channels_last)
    eval_loaders = {split: DeviceLoader(splits[split], t.eval_batch_size, device, data.eval_transform,
                                        channels_last=channels_last) for split in ("val", "test")}
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimization(cfg, model, len(train_loader))
    checkpoints = run_dir / "checkpoints"
    tr = Training(
        # torch.compile gives an OptimizedModule, which torch's stubs type as a plain callable.
        model=model, forward=typing.cast(torch.nn.Module, torch.compile(model, mode=t.compile_mode)) if t.compile
        else model,
        loss_fn=loss_fn.to(device),
        optimizer=optimizer, scheduler=scheduler, train_loader=train_loader, eval_loaders=eval_loaders, amp=amp,
        # The data's content, not its location, is part of what a checkpoint continues.
        checkpointer=Checkpointer(checkpoints / "last.pt", f"{config_fingerprint(cfg)}-{data_fingerprint(splits)}",
                                  model, optimizer, scheduler, loss_fn),
        best=BestWeights(checkpoints / "best.pt", t.select == Select.best_val),
    )
    return tr, splits, calibrators


def _train_and_evaluate(cfg: DictConfig, run_dir: Path) -> list[dict]:
    tr, splits, calibrators = prepare(cfg, run_dir)
    progress = tr.checkpointer.restore(tr.train_loader.device)
    with MlflowRun(run_dir, cfg.trainer.mlflow, flat(OmegaConf.to_container(cfg, resolve=True))) as tracking:
        fit(tr, cfg, run_dir, progress, tracking.epoch)
        tr.best.select(tr.model, tr.train_loader.device)
        draw_training_curves(run_dir, progress.history, cfg)
        for split, loader in tr.eval_loaders.items():
            logits, labels = predict(tr.forward, loader)
            save_logits(logits_file(run_dir, split), logits.cpu().numpy(), labels.cpu().numpy(),
                        splits[split].index.cpu().numpy())
        table = calibrate_and_report(run_dir, calibrators, **metric_settings(cfg))
        tracking.final(table, (*METRIC_NAMES, *decision_columns(table)))
    test_loader = tr.eval_loaders["test"]
    evaluate_beyond_test(run_dir, cfg, Predictor(tr.forward, test_loader.transform, test_loader.device,
                                                 cfg.trainer.eval_batch_size, test_loader.channels_last))
    write_status(run_dir, "done", epoch=cfg.trainer.epochs)
    log.info("Results in %s\n%s", run_dir.resolve(), console_table(table))
    return table.to_dict("records")


def draw_training_curves(run_dir: Path, history: list[dict], cfg: DictConfig) -> None:
    """``figures/training_curves.png`` from the run's history, the evaluated epoch marked."""
    table = pd.DataFrame(history)
    selected = int(table.loc[table["val_acc"].idxmax(), "epoch"]) if cfg.trainer.select == Select.best_val \
        else int(table["epoch"].iloc[-1])
    # The same words as metrics.md's header, so that figure and table name one model.
    described = describe_components(typing.cast(dict, OmegaConf.to_container(cfg, resolve=True)),
                                    group_choices(run_dir))
    title = (f"{run_dir.name}: data={described['data']}, loss={described['loss']}, seed {cfg.seed}\n"
             f"model={described['model']}")
    training_curves(table, run_dir / "figures" / "training_curves.png", title=title, selected_epoch=selected)
