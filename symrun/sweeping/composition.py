"""Composition: symrun's configs in Hydra, and configs composed the way Hydra composes them.

Hydra searches for configs in its main config folder first, then in the command line's
(`--config-dir`, `hydra.searchpath`), then in its ConfigStore. symrun's main folder is
symrun/primary/, which holds only the primary config (its defaults list, the sweeper, where
results go, the help text). The typed options are in the ConfigStore (`register_configs`: the
schema `base_config`, model/data/constraint options from symrun.config). The presets (configs/:
experiment/, hydra/launcher/) are a search path entry kept *after* the user's folders
(`presets_last`), so a preset of the user's with a built-in name replaces it. (Presets in the
main folder would shadow the user's; in the ConfigStore, Hydra would merge a user's file of the
same name onto them instead of replacing them.)

`Composer` composes what a launcher's jobs compose (`ConfigLoader.load_sweep_config` on the
sweep's master config), parses overrides and turns Hydra's errors into one line (`explain`).
`Shape` sets the per-run settings (config.PER_RUN_KEYS) of each run on a copy of one typed
config: a grid's runs that share everything else cost one composition, not one each.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import re
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException, ValidationError

from symrun.sweeping.catalogue import help_groups
from symrun.models.module import use_config_folders
from symrun.config import (CONFIG_DIR, DATA_OPTIONS, PER_RUN_KEYS, Config, ConfigError,
                           ConstraintConfig, did_you_mean, flatten, model_node, model_options, to_config, to_dict, validate)

PRIMARY_DIR = Path(__file__).resolve().parents[1] / "primary"     # Hydra's main config folder (symrun/primary): config.yaml only
PRESETS = f"file://{CONFIG_DIR}"          # the search path entry of the built-in presets
# Where a sweep (or `symrun run`) writes, below the outputs folder; the primary config spells the
# same for outputs/, and `--outputs DIR` puts it below DIR. The 4 random hex digits keep sweeps
# started in the same second apart.
RESULTS_SUBDIR = "${name}/${now:%Y-%m-%d_%H-%M-%S}-${symrun.uid:}"


@functools.lru_cache(maxsize=None)
def register_configs() -> None:
    """Register symrun's typed options in Hydra's ConfigStore (once per process; the Hydra edge
    calls it, so `symrun --help` and `symrun list` never import Hydra)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config, provider="symrun")
    for name in model_options():
        cs.store(group="model", name=name, node=model_node(name), provider="symrun")
    for name, cls in DATA_OPTIONS.items():
        cs.store(group="data", name=name, node=cls, provider="symrun")
    for name in ("none", "dcs"):    # one schema, so every run's table has the same constraint.* keys
        cs.store(group="constraint", name=name, node=ConstraintConfig(name=name), provider="symrun")
    # Cached per config, and Hydra copies a sweep's cache into each job's config: one value per sweep.
    OmegaConf.register_new_resolver("symrun.uid", lambda: secrets.token_hex(2), use_cache=True, replace=True)
    OmegaConf.register_new_resolver("symrun.groups", help_groups, replace=True)   # the --help text's


def presets_last(arguments: list[str]) -> tuple[list[str], list[str]]:
    """(`arguments` without their hydra.searchpath override, one that replaces it: the command
    line's folders, then symrun's presets). A command-line hydra.searchpath replaces the primary
    config's, and a primary config of the user's has none: the presets stay on the path."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    entries, rest = [], []
    for arg in arguments:
        if arg.lstrip("+").startswith("hydra.searchpath="):
            value = OverridesParser.create().parse_override(arg).value()
            if not isinstance(value, list):
                return list(arguments), []       # Hydra will say what is wrong with it
            entries += value
        else:
            rest.append(arg)
    return rest, [f"hydra.searchpath=[{','.join(hydra_quoted(str(e)) for e in [*entries, PRESETS])}]"]


@dataclass
class Composer:
    """Hydra's config loader and a sweep's master config (composed by Hydra in multirun mode
    from the command line, its sweep overrides left out)."""

    loader: Any                      # hydra.core.config_loader.ConfigLoader
    master: DictConfig

    def __post_init__(self) -> None:
        use_config_folders(self.master.hydra.runtime)     # model=module imports from them

    def compose(self, overrides: list[str]) -> DictConfig:
        """The config a launcher's job with these overrides composes, `hydra` node included."""
        try:
            return self.loader.load_sweep_config(self.master, list(overrides))
        except Exception as e:  # noqa: BLE001 — Hydra and OmegaConf raise many types; all become one line
            if not _is_config_error(e):
                raise
            raise ConfigError(explain(e)) from None

    def parse(self, arguments: list[str]) -> list:
        """Hydra's parsed overrides (glob() over group options needs the config loader)."""
        from hydra.core.override_parser.overrides_parser import OverridesParser

        try:
            return OverridesParser.create(config_loader=self.loader).parse_overrides(list(arguments))
        except Exception as e:  # noqa: BLE001
            if not _is_config_error(e):
                raise
            raise ConfigError(explain(e)) from None

    def sweep_of(self, arguments: list[str]) -> "Composer":
        """The Composer of another sweep on this command line's Hydra settings (a suite's member)."""
        from hydra.types import RunMode

        overrides = [*OmegaConf.to_container(self.master.hydra.overrides.hydra), *arguments]
        try:
            master = self.loader.load_configuration(self.master.hydra.job.config_name, overrides, run_mode=RunMode.MULTIRUN)
        except Exception as e:  # noqa: BLE001
            if not _is_config_error(e):
                raise
            raise ConfigError(explain(e)) from None
        return Composer(self.loader, master)

    def group_options(self, group: str) -> list[str]:
        """Options of a config group, from every source of this command line's search path."""
        overrides = OmegaConf.to_container(self.master.hydra.overrides.hydra)
        return self.loader.get_group_options(group, config_name=self.master.hydra.job.config_name,
                                             overrides=overrides)


@contextlib.contextmanager
def composer(arguments: list[str], config_dir: Optional[Path] = None) -> Iterator[Composer]:
    """A Composer for these command-line arguments (run and Hydra overrides) through Hydra's
    compose API, for the library and tests; the symrun command gets its own from Hydra."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    register_configs()
    GlobalHydra.instance().clear()
    if config_dir is not None:         # as --config-dir: after the primary config, before the presets
        arguments = [*arguments, f"hydra.searchpath=[{hydra_quoted('file://' + str(Path(config_dir).resolve()))}]"]
    init = initialize_config_dir(config_dir=str(PRIMARY_DIR), version_base="1.3", job_name="symrun")
    with init, strict_searchpath():
        loader = GlobalHydra.instance().config_loader()
        try:
            rest, searchpath = presets_last(arguments)
            master = loader.load_configuration("config", [*searchpath, *rest], run_mode=RunMode.MULTIRUN)
        except Exception as e:  # noqa: BLE001
            if not _is_config_error(e):
                raise
            raise ConfigError(explain(e)) from None
        yield Composer(loader, master)


@contextlib.contextmanager
def strict_searchpath() -> Iterator[None]:
    """A hydra.searchpath entry that is no folder or package is an error (Hydra only warns, and
    the presets the user meant are then "unknown"): `explain` names the entry."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"provider=.* is not available", category=UserWarning)
        yield


def hydra_quoted(text: str) -> str:
    """`text` as one single-quoted value of Hydra's override grammar (interpolations in it stay
    interpolations): a quote, and backslashes before a quote or the end, are escaped."""
    escaped = re.sub(r"(\\*)'", lambda m: m[1] * 2 + "\\'", text)
    return "'" + re.sub(r"(\\+)$", lambda m: m[1] * 2, escaped) + "'"


def literal(text: str) -> str:
    """`text` with `${` escaped, so OmegaConf reads it as written, not as an interpolation."""
    return text.replace("${", "\\${")


def drop_hydra(cfg: DictConfig) -> DictConfig:
    """`cfg` without its `hydra` node (what a job's task function receives), in place."""
    with read_write(cfg), open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def has_interpolation(node: Any) -> bool:
    """Whether any value below `node` is an interpolation (`${…}`): such a config cannot take
    per-run values by `with_values`, which would not re-resolve what depends on them."""
    if isinstance(node, DictConfig):
        return any(OmegaConf.is_interpolation(node, k) or has_interpolation(node._get_node(k)) for k in node.keys())
    if OmegaConf.is_list(node):
        return any(OmegaConf.is_interpolation(node, i) or has_interpolation(node._get_node(i)) for i in range(len(node)))
    return False


_CONVERTED: dict[tuple, Any] = {}


@functools.lru_cache(maxsize=None)
def _probe() -> DictConfig:
    return OmegaConf.structured(Config)    # a typed config to convert values with, built once


def per_run_value(key: str, value: Any) -> Any:
    """`value` converted to the type of per-run setting `key` exactly as OmegaConf converts an
    override (0 → 0.0 for a float, '1e-3' → 0.001), or the error OmegaConf gives. Cached: a
    grid has few distinct values per key."""
    cache_key = (key, type(value), repr(value) if isinstance(value, float) else value)    # -0.0 is not 0.0
    if cache_key not in _CONVERTED:
        try:
            OmegaConf.update(_probe(), key, value, merge=True)
            _CONVERTED[cache_key] = OmegaConf.select(_probe(), key)
        except ValidationError as e:
            _CONVERTED[cache_key] = ConfigError(f"wrong type for {key}: {_first_line(e)}")
    converted = _CONVERTED[cache_key]
    if isinstance(converted, ConfigError):
        raise converted
    return converted


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of `cfg` with these per-run settings (dotted keys of PER_RUN_KEYS, typed values).
    Sub-configs they do not touch are shared with `cfg`, so treat configs as read-only."""
    top, nested = {}, {}
    for key, value in values.items():
        assert key in PER_RUN_KEYS, key
        group, _, name = key.rpartition(".")
        if group:
            nested.setdefault(group, {})[name] = value
        else:
            top[name] = value
    return dataclasses.replace(cfg, **top, **{g: dataclasses.replace(getattr(cfg, g), **v) for g, v in nested.items()})


class Shape:
    """A composed config (its `hydra` node dropped) that runs copy with their own per-run values.

    Set on a copy of the typed config, each run costs a validation, not an OmegaConf conversion;
    a config with interpolations (which may read a per-run value) takes each run's values through
    OmegaConf instead, as Hydra would."""

    def __init__(self, task: DictConfig):
        self.interpolated = has_interpolation(task)
        self.task = task
        self.config = to_config(task)
        self._valid: set[tuple] = set()       # the per-run values, but the seed, of runs validated

    def run(self, values: dict[str, Any]) -> Config:
        if not self.interpolated:
            typed = {k: per_run_value(k, v) for k, v in values.items()}
            cfg = with_values(self.config, typed)
            # No check of `validate` reads a run's seed: runs that differ in it alone pass or fail
            # alike, so each other combination of values is validated once (4,352 runs over 256
            # seeds: 17 validations, not 4,352). repr keeps 1 and 1.0, 0.0 and -0.0 apart.
            others = tuple((k, repr(v)) for k, v in typed.items() if k != "seed")
            if others not in self._valid:
                validate(cfg)
                self._valid.add(others)
            return cfg
        cfg = copy.deepcopy(self.task)
        for key, value in values.items():
            try:
                OmegaConf.update(cfg, key, value, merge=True)
            except ValidationError as e:
                raise ConfigError(f"wrong type for {key}: {_first_line(e)}") from None
        return to_config(cfg)


def _is_config_error(e: Exception) -> bool:
    """An error in what the user wrote (a setting, an override, a config file of theirs)."""
    import yaml
    from hydra.errors import HydraException

    return isinstance(e, (HydraException, OmegaConfBaseException, ConfigError, UserWarning, yaml.YAMLError))


def explain(e: Exception) -> str:
    """One line a user can act on from a Hydra, OmegaConf or YAML error: the setting and the type
    it wants, and for a misspelt setting or group option the nearest valid name."""
    import yaml
    from hydra.errors import MissingConfigException

    if isinstance(e, ConfigError):
        return str(e)
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark, where = e.problem_mark, e.context_mark
        since = f" ({e.context} from line {where.line + 1})" if e.context and where is not None else ""
        return f"{mark.name}, line {mark.line + 1}: not valid YAML: {e.problem}{since}"
    if isinstance(e, UserWarning) and (m := re.match(r"provider=.*, path=(.*) is not available", str(e))):
        return f"hydra.searchpath: {m[1]} is not a folder or an importable package"
    cause = e.__cause__ or e.__context__
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return f"wrong type for {cause.full_key}: {_first_line(cause)}"
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options is not None:
        group, _, option = e.missing_cfg_file.rpartition("/")
        return (f"unknown {group} option '{option}'" + did_you_mean(option, e.options)
                + f" (options: {', '.join(e.options)})")
    message = _first_line(e)
    if m := re.match(r"Could not override '([^']+)'", message):
        hint = did_you_mean(m[1], known_settings())
        if not hint and m[1].startswith("model."):   # a constructor argument of a user's module is a new key
            hint = f" (an argument of model=module's constructor is added with +: +{m[1]}=…)"
        return f"unknown setting '{m[1]}'" + hint
    if m := re.match(r"(?:Ambiguous value for argument|Sweep parameters) '([^']+)'", message):
        return f"one configuration takes no sweep syntax ({m[1]}); use symrun sweep for a grid"
    # A config file of the user's with a key the schema lacks: "In 'experiment/x': ConfigKeyError
    # raised while composing config:" and the key on a later line.
    if (m := re.match(r"(In '[^']+'): \w+ raised while composing config", message)) and (
            key := re.search(r"full_key: (\S+)", str(e))):
        return f"{m[1]}: unknown setting '{key[1]}'" + did_you_mean(key[1], known_settings())
    return message


@functools.lru_cache(maxsize=None)
def known_settings() -> tuple[str, ...]:
    """Every setting of every model and data option, for "did you mean" on a misspelt key."""
    keys: set[str] = set()
    for model in model_options().values():
        for data in DATA_OPTIONS.values():
            keys |= set(flatten(to_dict(Config(model=model(), data=data()))))
    return tuple(sorted(keys))


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
