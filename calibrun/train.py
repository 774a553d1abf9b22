"""The run: validate the config, build the parts, fit, checkpoint, resume, collect logits.

This module and ``cli.py`` are the only ones that see the config object. Components are
built with ``hydra.utils.instantiate`` from their ``_target_`` entries; the loop calls
the same hooks on every loss and never asks which loss or calibrator it runs.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import hashlib
import inspect
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
import types
import typing
from pathlib import Path
from typing import Any, List, Optional

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from tqdm.auto import tqdm

import calibrun
from calibrun import UserError
from calibrun._io import atomic_open, atomic_torch_save, atomic_write_text
from calibrun.data import DeviceLoader
from calibrun.metrics import accuracy, ece
from calibrun.report import calibrate_and_report

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_acc", "val_ece", "seconds", "images_per_s"]
# Keys that may change between a run and its resumption without changing the experiment.
RESUME_IGNORED = ("run_name", "trainer.device", "trainer.progress", "trainer.checkpoint_every")


# --------------------------------------------------------------------------- config schema


class Schedule(str, enum.Enum):
    multistep = "multistep"
    cosine = "cosine"


class Select(str, enum.Enum):
    """Which weights are evaluated: the last epoch's, or the best validation accuracy's."""

    last = "last"
    best_val = "best_val"


@dataclasses.dataclass
class TrainerConfig:
    """Schema of ``conf/trainer/*.yaml``; the values live in the YAML files."""

    epochs: int = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    lr: float = MISSING
    momentum: float = MISSING
    nesterov: bool = MISSING
    weight_decay: float = MISSING
    schedule: Schedule = MISSING
    # Fractions of the run after which the learning rate is multiplied by gamma
    # (multistep), so that shortening a run keeps the shape of its schedule.
    milestones: List[float] = MISSING
    gamma: float = MISSING
    warmup_epochs: float = MISSING
    device: str = MISSING
    amp: bool = MISSING
    channels_last: bool = MISSING
    compile: bool = MISSING
    deterministic: bool = MISSING
    checkpoint_every: int = MISSING
    select: Select = MISSING
    progress: bool = MISSING


@dataclasses.dataclass
class MetricsConfig:
    n_bins: int = MISSING


def _schema_type(hint: Any) -> Any:
    """Map a parameter annotation onto a type OmegaConf can enforce."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and type(None) in args:
            return Optional[_schema_type(rest[0])]
        return Any
    if hint in (int, float, bool, str) or (isinstance(hint, type) and issubclass(hint, enum.Enum)):
        return hint
    if typing.get_origin(hint) in (list, List) and args and args[0] in (int, float, bool, str):
        return List[args[0]]
    return Any


def component_schema(node: DictConfig, key: str) -> type:
    """A structured-config schema derived from the signature of ``node._target_``.

    Each parameter becomes a typed field with the parameter's default, so the schema
    can never drift from the code: a new loss or calibrator needs no schema of its own.
    """
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        raise UserError(f"Config '{key}' needs a _target_ naming the class or function to build.")
    try:
        obj = get_object(target)
    except Exception as err:
        raise UserError(f"{key}._target_={target!r} cannot be imported: {err}") from None
    fn = obj.__init__ if inspect.isclass(obj) else obj
    hints = typing.get_type_hints(fn)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default=target))]
    for name, param in inspect.signature(obj).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = MISSING if param.default is inspect.Parameter.empty else param.default
        if isinstance(default, (list, dict)):
            fields.append((name, _schema_type(hints.get(name, Any)), dataclasses.field(default_factory=lambda d=default: d)))
        else:
            fields.append((name, _schema_type(hints.get(name, Any)), dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{key.replace('.', '_')}_schema", fields)


def _schema_field(name: str, node: Any, key: str) -> tuple[str, type, Any]:
    schema = component_schema(OmegaConf.create(node or {}), key)
    return name, schema, dataclasses.field(default_factory=schema)


def validate(cfg: DictConfig) -> DictConfig:
    """Resolve ``cfg`` and check it against the schemas; raise UserError naming the key.

    Runs before any work: an unknown key, a wrong type or a missing value stops the run.
    """
    try:
        raw = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise UserError(f"Config cannot be resolved: {_first_line(err)} (key: {getattr(err, 'full_key', '?')}).") from None
    calibrators = raw.get("calibrator") or {}
    calibrator_schema = dataclasses.make_dataclass(
        "calibrator_schema",
        [_schema_field(name, node, f"calibrator.{name}") for name, node in calibrators.items()],
    )
    schema = dataclasses.make_dataclass(
        "calibrun_config",
        [
            ("seed", int, dataclasses.field(default=MISSING)),
            ("run_name", str, dataclasses.field(default=MISSING)),
            ("metrics", MetricsConfig, dataclasses.field(default_factory=MetricsConfig)),
            *(_schema_field(key, raw.get(key), key) for key in ("data", "model", "loss")),
            ("calibrator", calibrator_schema, dataclasses.field(default_factory=calibrator_schema)),
            ("trainer", TrainerConfig, dataclasses.field(default_factory=TrainerConfig)),
        ],
    )
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, raw)
        missing = sorted(OmegaConf.missing_keys(merged))
    except ConfigKeyError as err:
        key = err.full_key or str(err.key)
        parent = key.rpartition(".")[0]
        allowed = ", ".join(k for k in OmegaConf.select(base, parent).keys() if k != "_target_") if parent else ", ".join(base.keys())
        raise UserError(f"Unknown config key '{key}'. Allowed keys{f' under {parent!r}' if parent else ''}: {allowed}.") from None
    except OmegaConfBaseException as err:
        raise UserError(f"Invalid value for '{err.full_key}': {_first_line(err)}") from None
    if missing:
        raise UserError(f"Config values are missing for: {', '.join(missing)}.")
    _check_trainer(merged.trainer)
    if merged.metrics.n_bins < 1:
        raise UserError(f"metrics.n_bins must be at least 1, got {merged.metrics.n_bins}.")
    return merged


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _check_trainer(t: DictConfig) -> None:
    rules = {
        "epochs": t.epochs >= 1,
        "batch_size": t.batch_size >= 1,
        "eval_batch_size": t.eval_batch_size >= 1,
        "lr": t.lr > 0,
        "momentum": 0 <= t.momentum < 1,
        "weight_decay": t.weight_decay >= 0,
        "gamma": 0 < t.gamma <= 1,
        "warmup_epochs": 0 <= t.warmup_epochs <= t.epochs,
        "checkpoint_every": t.checkpoint_every >= 1,
        "milestones": all(0 < m < 1 for m in t.milestones),
        "device": t.device in ("auto", "cpu", "cuda", "mps") or t.device.startswith("cuda:"),
    }
    allowed = {
        "momentum": "in [0, 1)", "gamma": "in (0, 1]", "warmup_epochs": "between 0 and trainer.epochs",
        "milestones": "fractions of the run in (0, 1)", "device": "auto, cpu, cuda, cuda:N or mps",
        "weight_decay": ">= 0", "lr": "> 0",
    }
    for key, ok in rules.items():
        if not ok:
            raise UserError(f"Invalid value trainer.{key}={t[key]}: must be {allowed.get(key, '>= 1')}.")


# --------------------------------------------------------------------------- run folder helpers


def write_status(run_dir: Path, state: str, epoch: int | None = None, error: str | None = None) -> None:
    atomic_write_text(run_dir / "status.json", json.dumps({"state": state, "epoch": epoch, "error": error}, indent=2))


def _git_commit() -> str | None:
    for where in (Path(calibrun.__file__).parent, Path.cwd()):
        try:
            out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
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
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "seed": seed,
        "hostname": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "argv": sys.argv,
    }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but CUDA is not available here; use trainer.device=auto or cpu.")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # cudnn.benchmark picks the fastest kernels for the fixed training shapes
    # (drop_last keeps them fixed), at the price of run-to-run bit differences.
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic


def lr_factor(step: int, steps_per_epoch: int, t: DictConfig) -> float:
    """Learning-rate multiplier at an optimizer step: linear warm-up, then the schedule."""
    epoch = step / steps_per_epoch
    if epoch < t.warmup_epochs:
        return (step + 1) / (t.warmup_epochs * steps_per_epoch)
    if t.schedule == Schedule.cosine:
        span = max(t.epochs - t.warmup_epochs, 1e-9)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (epoch - t.warmup_epochs) / span)))
    return t.gamma ** sum(epoch >= m * t.epochs for m in t.milestones)


def config_fingerprint(cfg: DictConfig) -> str:
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for dotted in RESUME_IGNORED:
        *parents, leaf = dotted.split(".")
        node = plain
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


def write_history(run_dir: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "history.csv", buf.getvalue())


# --------------------------------------------------------------------------- the loop


class Interrupted(UserError):
    """SIGTERM/SIGUSR1 arrived; a checkpoint was saved and the run can be resumed."""


class SignalFlag:
    """Records SIGTERM/SIGUSR1 instead of dying, so the loop can checkpoint first.

    SLURM sends one of them before killing a job (``--signal``, submitit's
    ``signal_delay_s``). After the checkpoint, the previous handler (submitit's requeue,
    say) still runs.
    """

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> SignalFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def hand_over(self) -> None:
        """Run the handler that was there before ours, then stop the run."""
        handler = self.previous.get(self.received)
        name = signal.Signals(self.received).name
        if callable(handler):
            handler(self.received, None)
        raise Interrupted(f"Interrupted by {name}; a checkpoint was saved. Run the same command again to resume.")


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DeviceLoader, amp: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, on the device) and labels of a whole split, in split order."""
    model.eval()
    outs, labels = [], []
    for x, y in loader:
        with torch.autocast(loader.device.type, dtype=torch.bfloat16, enabled=amp):
            outs.append(model(x).float())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def build(cfg: DictConfig) -> tuple[Any, torch.nn.Module, Any, dict]:
    """Instantiate data, model, loss and calibrators; config errors surface here, before
    any data is read."""
    parts = {}
    for key in ("loss", "model", "data"):
        try:
            parts[key] = instantiate(cfg[key])
        except InstantiationException as err:
            cause = err.__cause__ or err
            raise UserError(f"Cannot build {key} ({cfg[key]._target_}): {cause}") from None
    return parts["data"], parts["model"], parts["loss"], build_calibrators(cfg)


def build_calibrators(cfg: DictConfig) -> dict:
    calibrators = {}
    for name, node in cfg.calibrator.items():
        try:
            calibrators[name] = instantiate(node)
        except InstantiationException as err:
            raise UserError(f"Cannot build calibrator.{name}: {err.__cause__ or err}") from None
    return calibrators


def run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Validate, then train and evaluate into ``run_dir``; skip a run that is DONE."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / "DONE").exists():
        log.info("%s holds DONE: nothing to do.", run_dir)
        return None
    try:
        cfg = validate(cfg)
        write_status(run_dir, "running", epoch=0)
        result = _train_and_evaluate(cfg, run_dir)
    except BaseException as err:
        write_status(run_dir, "failed", error=f"{type(err).__name__}: {err}" if not isinstance(err, UserError) else str(err))
        raise
    atomic_write_text(run_dir / "DONE", time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return result


def _train_and_evaluate(cfg: DictConfig, run_dir: Path) -> dict:
    t = cfg.trainer
    device = resolve_device(t.device)
    seed_everything(cfg.seed, t.deterministic)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(run_dir / "env.json", json.dumps(environment(device, cfg.seed), indent=2))
    data, model, loss_fn, calibrators = build(cfg)
    on_cuda = device.type == "cuda"
    amp = t.amp and on_cuda
    channels_last = t.channels_last and on_cuda
    log.info("Device %s (amp=%s, channels_last=%s). Run folder: %s", device, amp, channels_last, run_dir.resolve())

    splits = data.splits()
    log.info("Images: train %d, val %d, test %d", *(len(splits[s]) for s in ("train", "val", "test")))
    drop_last = len(splits["train"]) > t.batch_size
    train_loader = DeviceLoader(splits["train"], t.batch_size, device, data.train_transform, shuffle=True,
                                drop_last=drop_last, seed=cfg.seed, channels_last=channels_last)
    eval_loaders = {
        split: DeviceLoader(splits[split], t.eval_batch_size, device, data.eval_transform, channels_last=channels_last)
        for split in ("val", "test")
    }

    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    loss_fn = loss_fn.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                                weight_decay=t.weight_decay)
    steps = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, t))
    forward = torch.compile(model) if t.compile else model

    ckpt_path = run_dir / "checkpoints" / "last.pt"
    fingerprint = config_fingerprint(cfg)
    history: list[dict] = []
    start_epoch, partial = 0, None
    if ckpt_path.exists():
        state = _load_checkpoint(ckpt_path, device)
        if state["fingerprint"] != fingerprint:
            raise UserError(
                f"Refusing to resume {run_dir}: its config differs from the one it was started with "
                f"(compare {run_dir / 'config.yaml'}). Use a new run_name for a new experiment."
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        history, start_epoch, partial = state["history"], state["epoch"], state.get("partial")
        log.info("Resuming from %s after epoch %d%s.", ckpt_path, start_epoch,
                 f" and {partial['step']} steps of the next" if partial else "")

    def checkpoint(epoch: int, partial: dict | None = None) -> None:
        atomic_torch_save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
            "epoch": epoch, "partial": partial, "history": history, "fingerprint": fingerprint,
        }, ckpt_path)

    best_path = run_dir / "checkpoints" / "best.pt"
    with SignalFlag() as interrupt:
        for epoch in range(start_epoch, t.epochs):
            loss_fn.set_epoch(epoch)
            train_loader.set_epoch(epoch)
            model.train()
            # Sums stay on the device: one synchronisation per epoch, not per step.
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen, skip, spent = 0, 0, 0.0
            if partial:
                loss_sum += partial["loss_sum"]
                correct += partial["correct"]
                seen, skip, spent, partial = partial["seen"], partial["step"], partial["seconds"], None
            started = time.perf_counter() - spent
            bar = tqdm(train_loader.iterate(skip), total=len(train_loader), initial=skip, unit="batch",
                       desc=f"epoch {epoch + 1}/{t.epochs}", leave=False, disable=None if t.progress else True)
            for step, (x, y) in enumerate(bar, start=skip):
                inputs, targets = loss_fn.mix(x, y)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    logits = forward(inputs)
                loss = loss_fn(logits.float(), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                if interrupt.received is not None:
                    checkpoint(epoch, {"step": step + 1, "loss_sum": loss_sum.item(), "correct": correct.item(),
                                       "seen": seen, "seconds": time.perf_counter() - started})
                    interrupt.hand_over()
            train_loss = loss_sum.item() / seen
            if not math.isfinite(train_loss):
                raise UserError(
                    f"Non-finite training loss ({train_loss}) in epoch {epoch + 1}; stopping. "
                    f"Lower trainer.lr or check the loss hyperparameters."
                )
            val_logits, val_labels = predict(forward, eval_loaders["val"], amp)
            val_probs = torch.softmax(val_logits.double(), dim=1).cpu().numpy()
            seconds = time.perf_counter() - started
            row = {
                "epoch": epoch + 1,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": train_loss,
                "train_acc": correct.item() / seen,
                "val_acc": accuracy(val_probs, val_labels.cpu().numpy()),
                "val_ece": ece(val_probs, val_labels.cpu().numpy(), cfg.metrics.n_bins),
                "seconds": round(seconds, 3),
                "images_per_s": round(seen / seconds, 1),
            }
            if t.select == Select.best_val and row["val_acc"] > max((h["val_acc"] for h in history), default=-1.0):
                atomic_torch_save({"model": model.state_dict(), "epoch": epoch + 1}, best_path)
            history.append(row)
            write_history(run_dir, history)
            log.info("epoch %d/%d  loss %.4f  train_acc %.4f  val_acc %.4f  val_ece %.4f  %.0f img/s",
                     epoch + 1, t.epochs, train_loss, row["train_acc"], row["val_acc"], row["val_ece"],
                     row["images_per_s"])
            if (epoch + 1) % t.checkpoint_every == 0 or epoch + 1 == t.epochs or interrupt.received is not None:
                checkpoint(epoch + 1)
            write_status(run_dir, "running", epoch=epoch + 1)
            if interrupt.received is not None:
                interrupt.hand_over()

    if t.select == Select.best_val:
        best = _load_checkpoint(best_path, device)
        model.load_state_dict(best["model"])
        log.info("Evaluating the weights of epoch %d, the best validation accuracy.", best["epoch"])
    for split, loader in eval_loaders.items():
        logits, labels = predict(forward, loader, amp)
        save_logits(run_dir / "logits" / f"{split}.npz", logits, labels, splits[split].index)
    table = calibrate_and_report(run_dir, calibrators, cfg.metrics.n_bins)
    write_status(run_dir, "done", epoch=t.epochs)
    log.info("Results in %s\n%s", run_dir.resolve(), table.to_string(index=False))
    return table.to_dict("records")


def _load_checkpoint(path: Path, device: torch.device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f"Checkpoint {path} is unreadable ({err}); delete it to start the run again.") from None


def save_logits(path: Path, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
    with atomic_open(path) as fh:
        np.savez(fh, logits=logits.cpu().numpy().astype(np.float32), labels=labels.cpu().numpy().astype(np.int64),
                 index=index.cpu().numpy().astype(np.int64))
