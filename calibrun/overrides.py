"""The command line's pre-check: unknown keys and options, and values the schemas reject,
found in ``calibrun``'s arguments before Hydra makes a run folder, each as one line with
the allowed keys or values and a suggestion for a near miss."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from calibrun import UserError
from calibrun.config import did_you_mean, unknown_key_problem, validate


# Command-line flags that replace calibrun's primary config: the pre-check cannot know it.
OTHER_CONFIG_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "--experimental-rerun")
CONFIG_DIR_FLAGS = ("-cd", "--config-dir")


# OmegaConf.select's answer for a key that is not there (None is a value).
_ABSENT = object()


def _group_options(group: str, roots: list[Path]) -> list[str]:
    """The options of config group ``group``: its YAML files in any of the config ``roots``."""
    return sorted({p.stem for root in roots for p in (root / group).glob("*.yaml")})


def _option_problem(group: str, values: Sequence[object], roots: list[Path]) -> str | None:
    """An option of config group ``group`` that has no YAML file in any of the config
    ``roots``, with the options they have."""
    options = _group_options(group, roots)
    for value in values:
        for option in value if isinstance(value, list) else [value]:
            if str(option) not in options and option is not None and str(option) != "null":
                return (f"{group}={option}: no such option.{did_you_mean(str(option), options)} "
                        f"{group} can be: {', '.join(options)}.")
    return None


def _added_config_dirs(argv: list[str], overrides: list[Override]) -> list[Path] | None:
    """The config folders a command adds to calibrun's (``--config-dir DIR`` and the
    ``file://`` entries of ``hydra.searchpath=[...]``), where a user's own components
    live; None when one is a ``pkg://`` entry, which only Hydra resolves."""
    dirs = [Path(arg.split("=", 1)[1]) for arg in argv if arg.split("=")[0] in CONFIG_DIR_FLAGS and "=" in arg]
    dirs += [Path(argv[i + 1]) for i, arg in enumerate(argv[:-1]) if arg in CONFIG_DIR_FLAGS]
    for override in overrides:
        if override.key_or_group == "hydra.searchpath":
            value = override.value()
            for entry in value if isinstance(value, list) else [value]:
                if str(entry).startswith("pkg://"):
                    return None
                dirs.append(Path(str(entry).removeprefix("file://")))
    return [d.resolve() for d in dirs]


def _parsed_overrides(argv: list[str]) -> list[Override] | None:
    """Hydra's parse of the overrides in ``argv``; None when the pre-check cannot judge
    them (a flag that replaces calibrun's config, or a syntax error Hydra will report)."""
    if any(arg.split("=")[0] in OTHER_CONFIG_FLAGS for arg in argv):
        return None
    try:
        return OverridesParser.create().parse_overrides(_override_texts(argv))
    except HydraException:
        return None  # a syntax error: Hydra's message says where


def check_overrides(argv: list[str], conf: Path) -> str | None:
    """The first command-line override that names no config group option or no config key,
    said the way a user can act on; None when all exist (Hydra then composes as usual).
    Options and keys from folders added with ``--config-dir`` or ``hydra.searchpath`` count."""
    overrides = _parsed_overrides(argv)
    if overrides is None:
        return None
    added = _added_config_dirs(argv, overrides)
    if added is None:
        return None
    roots = [conf, *added]
    groups = [o for o in overrides if "." not in o.key_or_group and not o.key_or_group.startswith("hydra")
              and any((root / o.key_or_group).is_dir() for root in roots)
              and o.package is None and not o.is_delete() and not o.is_add()]
    for override in groups:
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        problem = _option_problem(override.key_or_group, values, roots)
        if problem:
            return problem
    first = [f"{o.key_or_group}={_first_value(o)}" for o in groups]
    search = [f"hydra.searchpath=[{','.join(f'file://{d}' for d in added)}]"] if added else []
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*search, *first])
        for override in overrides:
            key = override.key_or_group
            if override in groups or override.is_add() or override.is_force_add() or override.is_delete() \
                    or key.startswith("hydra") or override.package is not None:
                continue
            problem = unknown_key_problem(key, cfg)
            if problem:
                return problem + _owners_hint(key, roots, [*search, *first])
    return None


def _owners_hint(key: str, roots: list[Path], overrides: list[str]) -> str:
    """For a key of a config group's option that the chosen option lacks (``loss.lam``
    beside the default ``loss=ce``): the options that have it, composed as the run would
    be. Called inside an initialised Hydra config folder."""
    group = key.split(".")[0]
    options = _group_options(group, roots)
    others = [o for o in overrides if o.split("=")[0] != group]
    owners = []
    for option in options:
        try:
            cfg = compose(config_name="config", overrides=[*others, f"{group}={option}"])
        except (HydraException, OmegaConfBaseException):
            continue  # an option that needs other choices cannot own the key here
        if OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT:
            owners.append(option)
    if not owners:
        return ""
    return (f" {key} belongs to {group}={', '.join(owners)}: choose one on the command line, "
            f"e.g. {group}={owners[0]} {key}=...")


def _first_value(override: Override) -> str:
    """The first value of a (possibly swept) group override, as override text."""
    value = next(iter(override.sweep_iterator())) if override.is_sweep_override() else override.value()
    return f"[{','.join(map(str, value))}]" if isinstance(value, list) else str(value)


# Flags after which Hydra answers a question (help, completion, its own info) instead of
# running: the config checks below must not stand in their way.
QUERY_FLAGS = ("-h", "--help", "--hydra-help", "-sc", "--shell-completion", "-i", "--info")
# Flags that print the composed config: unknown keys are still caught, values are not judged.
PRINT_FLAGS = ("-c", "--cfg", "-p", "--package", "--resolve")


def _override_texts(argv: list[str]) -> list[str]:
    """The overrides of a command line: ``key=value`` words that are not a flag's value."""
    flag_values = {argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in (*CONFIG_DIR_FLAGS, *OTHER_CONFIG_FLAGS)}
    return [a for a in argv if "=" in a and not a.startswith("-") and a not in flag_values]


def _value_variants(overrides: list[Override]) -> list[list[str]]:
    """Override lists to compose, so that every value of every swept key is composed once
    (the other swept keys at their first value): a sweep's bad value stops the command
    before its first job, not in the middle of the sweep."""
    plain = [o for o in overrides if not o.key_or_group.startswith("hydra") or o.key_or_group == "hydra.searchpath"]

    def text(override: Override, value: str | None = None) -> str:
        if value is None and not override.is_sweep_override():
            assert override.input_line is not None  # the parser keeps each override's own text
            return override.input_line
        value = value if value is not None else next(iter(override.sweep_string_iterator()))
        return f"{override.get_key_element()}={value}"

    first = [text(o) for o in plain]
    variants = [first]
    for i, override in enumerate(plain):
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())[1:]
            variants += [[*first[:i], text(override, v), *first[i + 1:]] for v in values]
    return variants


def check_values(argv: list[str], conf: Path, checks: Sequence[Callable[[DictConfig], object]] = ()) -> str | None:
    """The first config the schemas or ``checks`` reject (a wrong type, a value out of range,
    an added key no component takes), composed as the run would be: one line before any
    folder is made, instead of an error logged from inside a new run folder."""
    overrides = _parsed_overrides(argv)
    if overrides is None:
        return None
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        for variant in _value_variants(overrides):
            try:
                cfg = validate(compose(config_name="config", overrides=variant))
                for check in checks:
                    check(cfg)
            except UserError as err:
                return str(err)
    return None
