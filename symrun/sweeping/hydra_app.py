"""`symrun sweep` and `symrun run` as a Hydra application: their command line goes to
`hydra.main`, which parses it — overrides, sweep syntax and every Hydra flag.

symrun adds to it only what it must: its own options (`--outputs DIR`, `--plan`) as the Hydra
overrides they stand for; the built-in presets on hydra.searchpath after the user's folders
(composition.presets_last); `--multirun` for a sweep; and, when Hydra shows one config instead of
running (`--cfg`, `--info`, `--help`), the command line's grid moved into hydra.sweeper.params,
where a preset's grid is. Hydra's and argparse's errors raise CommandError instead of printing
several lines and exiting, so the command shows one line. A sweep skips the composition Hydra
makes only to read hydra.mode, which `--multirun` decides.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

# Hydra flags that show something instead of running
SHOWING = ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc", "--version")
COMMANDS = ("sweep", "run", "report", "status", "collect", "check", "list", "bench")


class CommandError(ValueError):
    """Why `symrun sweep|run` stopped, in one line, and its exit status: 2 for bad input or a
    sweep that could not go on (the line starts with `error:`), 1 when runs failed, 130 when
    the user interrupted it (the line says so itself)."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def run(command: str, args: list[str], outputs: Optional[Path] = None, plan: bool = False) -> None:
    """Hand `symrun COMMAND ARGS` to Hydra: `sweep` is a multirun through symrun's sweeper, `run` a
    run. Bad input (an override, a flag, a config folder, the data…) raises CommandError, with one
    line, before anything is written."""
    import hydra
    import yaml
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from symrun.sweeping import composition, job, launch
    from symrun.console import Shown

    saved = sys.argv
    sys.argv = [saved[0], *argv(command, args, outputs, plan)]
    launch.use(Shown())
    try:
        with _hydra_errors_raise(), composition.strict_searchpath(), _mode_from_the_flag(command == "sweep"):
            hydra.main(version_base="1.3", config_path=str(composition.PRIMARY_DIR), config_name="config")(job.task)()
    except launch.Interrupted as e:
        raise CommandError(str(e), code=130) from None
    except launch.RunsFailed as e:
        raise CommandError(str(e), code=1) from None
    except (launch.LaunchError, _FlagError, job.Refused) as e:
        raise CommandError(str(e)) from None
    except (HydraException, OmegaConfBaseException, UserWarning, yaml.YAMLError) as e:
        raise CommandError(composition.explain(e)) from None
    except Exception as e:  # noqa: BLE001 — bad input found past Hydra; imported here, as torch comes with them
        from symrun.config import ConfigError
        from symrun.data import DataError
        from symrun.sweeping.results import OutputError

        if not isinstance(e, (ConfigError, DataError, OutputError)):
            raise
        raise CommandError(str(e)) from None
    finally:
        sys.argv = saved
        launch.use(launch.Quiet())


def argv(command: str, args: list[str], outputs: Optional[Path] = None, plan: bool = False) -> list[str]:
    """The arguments Hydra gets for `symrun COMMAND ARGS` (see the module's docstring)."""
    from hydra.errors import HydraException

    from symrun.sweeping import composition

    sweeping = command == "sweep"
    showing = any(a.split("=", 1)[0] in SHOWING for a in args)
    if not sweeping and any(a in ("-m", "--multirun") for a in args):
        raise CommandError("symrun run takes one configuration; use symrun sweep for a grid")
    _refuse_paths(args)
    try:
        args, extra = composition.presets_last(args)
    except HydraException as e:
        raise CommandError(composition.explain(e)) from None
    if outputs is not None:
        where = composition.literal(f"{os.path.abspath(outputs)}/") + composition.RESULTS_SUBDIR
        extra.append(f"hydra.{'sweep' if sweeping else 'run'}.dir={composition.hydra_quoted(where)}")
    if sweeping and plan:
        extra.append("hydra.sweeper.dry_run=true")
    if sweeping and showing:
        args, grid = _grid_as_params(args)    # Hydra shows one config: the grid goes where the sweeper reads it
        extra += grid
    args = _with_overrides(args, extra)
    if sweeping and not showing and not any(a in ("-m", "--multirun") for a in args):
        args.append("--multirun")
    return args


GROUPS = ("model", "data", "constraint", "experiment")


def _refuse_paths(args: list[str]) -> None:
    """A group option is a config's name in its group's folders, never a path: Hydra would load
    `experiment=../../x` from outside every config folder."""
    for a in args:
        if not _is_override(a):
            continue
        key, _, value = a.partition("=")
        key = key.lstrip("+~")
        if (key in GROUPS or "/" in key) and ("/" in value or value.startswith(".")):
            raise CommandError(f"unknown {key} option '{value}': an option is the name of a config in the {key} "
                               "group's folders, not a path")


class _FlagError(ValueError):
    """A malformed Hydra flag (argparse's message)."""


@contextlib.contextmanager
def _hydra_errors_raise() -> Iterator[None]:
    """Hydra prints its errors and exits 1, argparse prints its usage and exits 2: let both
    raise instead, so the command shows one line. HYDRA_FULL_ERROR=1 is Hydra's own switch."""
    import argparse

    def flag_error(parser: argparse.ArgumentParser, message: str) -> None:
        raise _FlagError(message)

    saved_env, saved_error = os.environ.get("HYDRA_FULL_ERROR"), argparse.ArgumentParser.error
    os.environ["HYDRA_FULL_ERROR"] = "1"
    argparse.ArgumentParser.error = flag_error   # Hydra's parser is private: this is its one hook
    try:
        yield
    finally:
        argparse.ArgumentParser.error = saved_error
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env


@contextlib.contextmanager
def _mode_from_the_flag(sweeping: bool) -> Iterator[None]:
    """Before it composes the config to run, Hydra composes it once more only to read
    hydra.mode (0.14–0.22 s of a sweep's start). A sweep always runs with `--multirun`, which
    decides the mode whatever hydra.mode says, so that first composition is skipped: Hydra then
    takes the mode from the flag, as it does when hydra.mode is unset (the default)."""
    from hydra._internal.hydra import Hydra

    if not sweeping or not hasattr(Hydra, "get_mode"):
        yield
        return
    saved = Hydra.get_mode
    Hydra.get_mode = lambda self, config_name, overrides: None
    try:
        yield
    finally:
        Hydra.get_mode = saved


def _is_override(arg: str) -> bool:
    return "=" in arg and not arg.startswith("-")


def _with_overrides(args: list[str], extra: list[str]) -> list[str]:
    """`args` with `extra` overrides beside its own, or first: argparse takes Hydra's overrides
    only as one run of arguments, and a bare `--info` would take the next one as its value."""
    at = next((i for i, a in enumerate(args) if _is_override(a)), 0)
    return args[:at] + extra + args[at:]


def _grid_as_params(args: list[str]) -> tuple[list[str], list[str]]:
    """The command line without its sweep overrides, and an override that puts them into
    hydra.sweeper.params (where a preset's grid is, and the sweeper reads both the same way),
    so Hydra can compose the one config `--cfg`, `--info` and `--help` show."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from symrun.sweeping.composition import hydra_quoted

    parser, out, grid = OverridesParser.create(), [], []
    for a in args:
        parsed = None
        if _is_override(a):
            with contextlib.suppress(Exception):         # not an override: Hydra will say so
                parsed = parser.parse_override(a)
        if parsed is not None and parsed.is_sweep_override() and not parsed.is_hydra_override():
            grid.append(f"{parsed.get_key_element()}:{hydra_quoted(parsed.get_value_string())}")
        else:
            out.append(a)
    return out, [f"++hydra.sweeper.params={{{','.join(grid)}}}"] if grid else []


def complete(argv: list[str]) -> None:
    """Shell completion: the script `symrun sweep -sc install=bash` prints (Hydra's) calls
    `symrun -sc query=bash` with the line typed so far: complete the command; the options of
    the preset groups, which Hydra's completion does not see on hydra.searchpath; anything else
    is Hydra's, given the line without the command."""
    from symrun.sweeping.catalogue import catalogue, config_folders
    from symrun.console import console

    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if len(words) < 2 or (len(words) == 2 and not line.endswith(" ")):
        typed = words[1] if len(words) > 1 else ""
        console.print(" ".join(c for c in COMMANDS if c.startswith(typed)), highlight=False)
        return
    if words[1] not in ("sweep", "run"):
        return
    group, eq, typed = ("" if line.endswith(" ") else words[-1]).partition("=")
    if eq and group in ("experiment", "hydra/launcher"):
        at = [i + 1 for i, w in enumerate(words[:-1]) if w in ("-cd", "--config-dir")]
        with contextlib.suppress(Exception):       # a folder that does not exist: no options from it
            found = catalogue(config_folders(words[at[-1]] if at else None, words))[group]
            console.print(" ".join(f"{group}={name}" for name, _ in found if name.startswith(typed)), highlight=False)
        return
    os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]]) + (" " if line.endswith(" ") else "")
    run(words[1], argv)
