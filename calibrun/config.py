"""Everything about the config object: the schemas, validation, and which keys make two
runs different experiments.

``validate`` checks a composed Hydra config before any work: the trainer and metrics
have dataclass schemas, every component node (``data``, ``model``, ``loss``,
``optimizer``, ``scheduler``, each calibrator) gets a schema derived from the signature
of its ``_target_``, so a new component needs no schema of its own (docs/design.md §2).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import difflib
import enum
import hashlib
import inspect
import json
import logging
import types
import typing
from typing import Any, List, Optional

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from calibrun import UserError

# Config keys that never make two runs different experiments: changing one neither
# refuses a resume, nor names a new sweep folder, nor splits a report group. The
# override_dirname exclude list in conf/config.yaml must hold these (a test checks it).
# A key here also covers every key below it (``shift`` covers ``shift.root``).
NON_EXPERIMENT_KEYS = (
    "run_name", "data.root", "data.cache_dir", "data.download",
    "trainer.device", "trainer.progress", "trainer.checkpoint_every", "trainer.tensorboard",
    "trainer.mlflow",
    # How the step is issued, not what it computes (a resumed run may switch it).
    "trainer.compile_mode",
    # What a finished model is evaluated on besides its own test split (calibrun-evaluate).
    "shift", "shift.root", "ood", "ood.root",
    # How its numbers get their intervals, not the numbers (calibrun-calibrate redraws them).
    "metrics.intervals", "metrics.resamples", "metrics.level", "metrics.bootstrap_seed", "metrics.interval",
    "metrics.smooth_curve",
    # Which points of the risk–coverage curve get a column (the curve itself is kept whole).
    "metrics.coverages",
    # What a tuning sweeper reads from a finished run, not what the run computes.
    "objective", "objective.metric", "objective.calibrator",
)
# Component nodes built with hydra.utils.instantiate, each checked against its _target_.
COMPONENTS = ("data", "model", "loss", "optimizer", "scheduler")
# Components a run may leave out (their config group defaults to null).
OPTIONAL_COMPONENTS = ("shift", "ood")


def is_non_experiment_key(key: str) -> bool:
    """Whether config ``key`` is, or lies below, one of ``NON_EXPERIMENT_KEYS``."""
    return any(key == k or key.startswith(f"{k}.") for k in NON_EXPERIMENT_KEYS)


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
    # torch.compile's mode with compile=true: null (its default), reduce-overhead (CUDA
    # graphs), max-autotune, max-autotune-no-cudagraphs.
    compile_mode: Optional[str] = None
    deterministic: bool = MISSING
    checkpoint_every: int = MISSING
    select: Select = MISSING
    progress: bool = MISSING
    tensorboard: bool = MISSING
    # Absent from runs made before it existed: off then.
    mlflow: bool = False


@dataclasses.dataclass
class MetricsConfig:
    n_bins: int = MISSING
    # Absent from runs made before they existed: these defaults then (calibrun.metrics,
    # calibrun.bootstrap.Settings).
    collapse_margin: float = 0.25
    intervals: bool = True
    resamples: int = 1000
    level: float = 0.95
    bootstrap_seed: int = 0
    interval: str = "basic"
    smooth_curve: bool = False
    coverages: List[float] = dataclasses.field(default_factory=lambda: [0.8, 0.9, 0.95])
    conformal: bool = False
    conformal_alpha: float = 0.1
    conformal_methods: List[str] = dataclasses.field(default_factory=lambda: ["lac", "aps", "raps"])
    conformal_share: float = 0.5
    conformal_seed: int = 0
    conformal_raps_lambda: float = 0.01
    conformal_raps_k_reg: int = 5


@dataclasses.dataclass
class ObjectiveConfig:
    # The validation metric a tuning sweeper minimises (calibrun.sweep.objective); null: none.
    metric: Optional[str] = None
    calibrator: str = "temperature"


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
        return List[args[0]]  # type: ignore[valid-type]  # a type built at run time, as OmegaConf reads it
    return Any


def component_schema(node: DictConfig, key: str) -> type:
    """A structured-config schema derived from the signature of ``node._target_``.

    Each parameter becomes a typed field with the parameter's default, so the schema
    can never drift from the code: a new loss or calibrator needs no schema of its own.
    A ``_partial_: true`` node (an optimizer, say) leaves out the required parameters it
    does not set: the code that calls the partial supplies them (the model's parameters).
    """
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        raise UserError(f"Config '{key}' needs a _target_ naming the class or function to build.")
    hydra_log = logging.getLogger("hydra.utils")
    level = hydra_log.level
    # get_object logs its own multi-line error before raising; ours below is the one line.
    hydra_log.setLevel(logging.CRITICAL)
    try:
        obj = get_object(target)
    except Exception as err:
        cause = err.__cause__ or err
        hint = (" Install the package that holds it (pip install -e .) or put its folder on PYTHONPATH."
                if isinstance(cause, ModuleNotFoundError) else "")
        raise UserError(f"{key}._target_={target!r} cannot be imported: {first_line(cause)}.{hint}") from None
    finally:
        hydra_log.setLevel(level)
    partial = bool(node.get("_partial_", False))
    hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    fields: list[tuple[str, Any, Any]] = [("_target_", str, dataclasses.field(default=target))]
    if partial:
        fields.append(("_partial_", bool, dataclasses.field(default=True)))
    for name, param in inspect.signature(obj).parameters.items():
        required = param.default is inspect.Parameter.empty
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or (partial and required and name not in node):
            continue
        default = MISSING if required else param.default
        field = (dataclasses.field(default_factory=functools.partial(copy.deepcopy, default))
                 if isinstance(default, (list, dict)) else dataclasses.field(default=default))
        fields.append((name, _schema_type(hints.get(name, Any)), field))
    return dataclasses.make_dataclass(f"{key.replace('.', '_')}_schema", fields)


def _schema_field(name: str, node: Any, key: str) -> tuple[str, type, Any]:
    schema = component_schema(OmegaConf.create(node or {}), key)
    return name, schema, dataclasses.field(default_factory=schema)


# metrics.interval: how calibrun.bootstrap turns resampled values into an interval.
BOOTSTRAP_INTERVALS = ("basic", "percentile")
# metrics.conformal_methods: the scores of calibrun.conformal.
CONFORMAL_METHODS = ("lac", "aps", "raps")


def check_bootstrap(resamples: object, level: object, interval: object) -> None:
    """UserError naming the ``metrics.*`` bootstrap setting that is out of range."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 2:
        raise UserError(f"metrics.resamples must be an integer of at least 2, got {resamples!r}.")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise UserError(f"metrics.level must be in (0, 1), e.g. 0.95, got {level!r}.")
    if interval not in BOOTSTRAP_INTERVALS:
        raise UserError(f"metrics.interval must be one of {', '.join(BOOTSTRAP_INTERVALS)}, got {interval!r}.")


def _check_decisions(m: DictConfig) -> None:
    """UserError naming the ``metrics.coverages`` or ``metrics.conformal_*`` setting that is out of range."""
    if not m.coverages:
        raise UserError("metrics.coverages is empty: give at least one coverage in (0, 1], e.g. [0.8,0.9,0.95].")
    if any(not 0 < c <= 1 for c in m.coverages):
        raise UserError(f"metrics.coverages must lie in (0, 1], got {list(m.coverages)}.")
    if not 0 < m.conformal_alpha < 1:
        raise UserError(f"metrics.conformal_alpha must be in (0, 1), e.g. 0.1, got {m.conformal_alpha}.")
    if not 0 < m.conformal_share < 1:
        raise UserError(f"metrics.conformal_share must be in (0, 1), e.g. 0.5, got {m.conformal_share}.")
    unknown = [name for name in m.conformal_methods if name not in CONFORMAL_METHODS]
    if unknown or not m.conformal_methods:
        raise UserError(f"metrics.conformal_methods must name one or more of {', '.join(CONFORMAL_METHODS)}, "
                        f"got {list(m.conformal_methods)}.")
    if m.conformal_raps_lambda < 0 or m.conformal_raps_k_reg < 0:
        raise UserError("metrics.conformal_raps_lambda and metrics.conformal_raps_k_reg must be at least 0, got "
                        f"{m.conformal_raps_lambda} and {m.conformal_raps_k_reg}.")


def validate(cfg: DictConfig) -> DictConfig:
    """Resolve ``cfg`` and check it against the schemas; raise UserError naming the key.

    Runs before any work: an unknown key, a wrong type or a missing value stops the run.
    The keys calibrun defines itself are checked first: their mistakes need no import of
    the components' modules (and torch), so the command line answers them in a second.
    """
    try:
        raw = typing.cast(dict, OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "?")
        raise UserError(f"Config cannot be resolved: {first_line(err)} (key: {key}).") from None
    own = _merge_checked(_config_schema(raw, components=False), raw)
    _check_trainer(own.trainer)
    if own.metrics.n_bins < 1:
        raise UserError(f"metrics.n_bins must be at least 1, got {own.metrics.n_bins}.")
    if not 0 <= own.metrics.collapse_margin < 1:
        raise UserError(f"metrics.collapse_margin must be in [0, 1), got {own.metrics.collapse_margin}.")
    check_bootstrap(own.metrics.resamples, own.metrics.level, own.metrics.interval)
    _check_decisions(own.metrics)
    return _merge_checked(_config_schema(raw, components=True), raw)


def _config_schema(raw: dict, components: bool) -> type:
    """The schema of the whole config; with ``components=False`` the components' sections
    are left unchecked (Any), so that none of their modules is imported."""

    def section(key: str, node: Any) -> tuple[str, Any, Any]:
        if components and node is not None:
            return _schema_field(key, node, key)
        return key, Any, dataclasses.field(default=None)

    calibrators = raw.get("calibrator") or {}
    flat = [name for name, node in calibrators.items() if not isinstance(node, dict)]
    if flat:
        # A calibrator YAML written like a loss's: its keys landed directly under calibrator.
        raise UserError(f"calibrator.{flat[0]} is not a calibrator section. A calibrator's YAML holds its name "
                        "with the settings below it (conf/calibrator/temperature.yaml: 'temperature:' then "
                        "'  _target_: ...'), so that several can be chosen at once.")
    calibrator_schema = dataclasses.make_dataclass(
        "calibrator_schema", [section(name, node) for name, node in calibrators.items()])
    return dataclasses.make_dataclass(
        "calibrun_config",
        [
            ("seed", int, dataclasses.field(default=MISSING)),
            ("run_name", str, dataclasses.field(default=MISSING)),
            ("metrics", MetricsConfig, dataclasses.field(default_factory=MetricsConfig)),
            ("objective", ObjectiveConfig, dataclasses.field(default_factory=ObjectiveConfig)),
            *(section(key, raw.get(key) or {}) for key in COMPONENTS),
            *(section(key, raw.get(key)) for key in OPTIONAL_COMPONENTS),
            ("calibrator", calibrator_schema, dataclasses.field(default_factory=calibrator_schema)),
            ("trainer", TrainerConfig, dataclasses.field(default_factory=TrainerConfig)),
        ],
    )


def _merge_checked(schema: type, raw: dict) -> DictConfig:
    """``raw`` merged onto ``schema``, its mistakes (an unknown key, a wrong type, a missing
    value) raised as one UserError naming the key."""
    base = OmegaConf.structured(schema)
    try:
        merged = OmegaConf.merge(base, raw)
        missing = sorted(OmegaConf.missing_keys(merged))
    except ConfigKeyError as err:
        key = err.full_key or str(err.key)
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(base, parent) if parent else base
        siblings = [k for k in node.keys() if k != "_target_"]
        under = f" under {parent!r}" if parent else ""
        raise UserError(f"Unknown config key '{key}'. Allowed keys{under}: {', '.join(siblings)}.") from None
    except OmegaConfBaseException as err:
        raise UserError(f"Invalid value for '{err.full_key}': {first_line(err)}") from None
    if missing:
        raise UserError(f"Config values are missing for: {', '.join(missing)}.")
    return typing.cast(DictConfig, merged)


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` to a misspelt ``word``, or nothing."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_key_problem(key: str, cfg: DictConfig) -> str | None:
    """A dotted ``key`` that the composed ``cfg`` does not have, with the keys its node has."""
    node: object = cfg
    for depth, part in enumerate(key.split(".")):
        if not isinstance(node, DictConfig):
            return None  # below a value or a list: Hydra's own checks apply
        if part not in node:
            parent = ".".join(key.split(".")[:depth])
            allowed = sorted(str(k) for k in node.keys() if str(k) != "_target_")
            where = f" under '{parent}'" if parent else ""
            return (f"Unknown config key '{key}'.{did_you_mean(part, allowed)} Allowed keys{where}: "
                    f"{', '.join(allowed) or 'none'}.")
        node = node[part]
    return None


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line error reports."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# torch.compile's modes (None: its default).
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
        "compile_mode": t.compile_mode in COMPILE_MODES,
    }
    allowed = {
        "momentum": "in [0, 1)", "gamma": "in (0, 1]", "warmup_epochs": "between 0 and trainer.epochs",
        "milestones": "fractions of the run in (0, 1)", "device": "auto, cpu, cuda, cuda:N or mps",
        "weight_decay": ">= 0", "lr": "> 0",
        "compile_mode": "null, " + ", ".join(m for m in COMPILE_MODES if m),
    }
    for key, ok in rules.items():
        if not ok:
            raise UserError(f"Invalid value trainer.{key}={t[key]}: must be {allowed.get(key, '>= 1')}.")


def config_fingerprint(cfg: DictConfig) -> str:
    """A hash of the experiment: the resolved config without ``NON_EXPERIMENT_KEYS``.
    A run resumes only from a checkpoint with the same fingerprint."""
    plain = typing.cast(dict, OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    for dotted in NON_EXPERIMENT_KEYS:
        *parents, leaf = dotted.split(".")
        node = plain
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()


def build_component(node: DictConfig, key: str) -> Any:
    """``hydra.utils.instantiate`` with the component's own complaint (a hyperparameter
    out of range, say) turned into a one-line UserError naming the key."""
    try:
        return instantiate(node)
    except InstantiationException as err:
        raise UserError(f"Cannot build {key} ({node._target_}): {err.__cause__ or err}") from None
