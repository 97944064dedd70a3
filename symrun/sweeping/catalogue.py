"""The catalogue of configs a command line can choose from, and where each comes from: symrun's
built-in options and presets, and those of the user's config folders (`--config-dir`,
`hydra.searchpath`), which come first. `symrun list`, the config groups of `--help` and shell
completion show it. It reads folders and symrun's dataclasses, never Hydra, so `symrun list`
answers at once.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

from symrun.config import CONFIG_DIR, DATA_OPTIONS, ConfigError
from symrun.models import registry

# Hydra's launcher plugins and the options they register, found without importing Hydra
LAUNCHER_PLUGINS = {"hydra_plugins.hydra_joblib_launcher": ["joblib"],
                    "hydra_plugins.hydra_submitit_launcher": ["submitit_local", "submitit_slurm"]}
GROUPS = ("model", "data", "constraint", "experiment", "hydra/launcher")
BUILT_IN = "built-in"


def config_folders(config_dir: Optional[str], arguments: list[str]) -> list[Path]:
    """A command line's own config folders in the order Hydra searches them — `--config-dir`, then
    the entries of `hydra.searchpath=[…]` — all before symrun's built-in configs."""
    folders = [Path(config_dir)] if config_dir else []
    for arg in arguments:
        if arg.startswith("hydra.searchpath="):
            for entry in arg.split("=", 1)[1].strip("[] ").split(","):
                scheme, _, where = entry.strip().strip("'\"").rpartition("://")
                folders += [_folder(scheme or "file", where)] if where else []
    for folder in folders:
        if folder is None or not folder.is_dir():
            raise ConfigError(f"config folder {folder} does not exist")
    return folders


def _folder(scheme: str, where: str) -> Optional[Path]:
    """The folder a search path entry names: file://DIR, or pkg://module's folder."""
    import importlib.util

    if scheme != "pkg":
        return Path(where)
    with contextlib.suppress(ImportError):
        spec = importlib.util.find_spec(where)
        if spec is not None and spec.submodule_search_locations:
            return Path(next(iter(spec.submodule_search_locations)))
    return None


def catalogue(folders: list[Path]) -> dict[str, list[tuple[str, str]]]:
    """Every option of symrun's config groups, {group: [(option, origin)]}, sorted: origin is
    the first of `folders` holding `<group>/<option>.yaml` (which replaces a built-in option of
    that name), else BUILT_IN."""
    import importlib.util

    built_in = {"model": registry.names(), "data": list(DATA_OPTIONS), "constraint": ["none", "dcs"],
                "experiment": [p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")],
                "hydra/launcher": ["basic", *(p.stem for p in (CONFIG_DIR / "hydra" / "launcher").glob("*.yaml"))]}
    for module, options in LAUNCHER_PLUGINS.items():
        with contextlib.suppress(ImportError):
            if importlib.util.find_spec(module) is not None:
                built_in["hydra/launcher"] += options
    out = {}
    for group in GROUPS:
        origin = {name: BUILT_IN for name in built_in[group]}
        for folder in reversed(folders):          # the first folder wins
            origin.update({p.stem: str(folder) for p in (folder / group).glob("*.yaml")})
        out[group] = sorted(origin.items())
    return out


def help_groups() -> str:
    """The config groups and their options for `--help` (Hydra's own list leaves out what is on
    hydra.searchpath, the presets among it): `${symrun.groups:}` in the help template."""
    from hydra.core.hydra_config import HydraConfig

    yours = [_folder(s.schema, s.path) for s in HydraConfig.get().runtime.config_sources
             if s.schema in ("file", "pkg") and s.provider not in ("hydra", "main")]
    folders = [f for f in yours if f is not None and f.resolve() != CONFIG_DIR]
    mark = lambda name, origin: name if origin == BUILT_IN else f"{name} [{origin}]"  # noqa: E731
    return "\n".join(f"{group}: " + ", ".join(mark(*option) for option in options)
                     for group, options in catalogue(folders).items())
