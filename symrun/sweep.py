"""Sweeps: expand Hydra override/sweep syntax into runs, group them into packs, launch the packs.

`plan(...)` does every check before anything is written: it composes and validates each run's
config, loads each distinct dataset once and builds each model shape once. `write_plan` then lays
out the sweep folder and `launch` runs the packs as Hydra jobs (`pack=0,…,P−1` over the
`pack_job` config), so `hydra/launcher=joblib|submitit_local|submitit_slurm` work unchanged.
A suite's member sweeps are planned alike and launched together (`write_launch`): one multirun
over every member's packs.
Finished runs already in the folder are skipped: rerunning a sweep with
`hydra.sweep.dir=<its folder>` completes it, and packs with a checkpoint (train.checkpoint_every)
continue from it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from symrun import budget, engine, models, records, reparam, results, tables
from symrun import data as data_mod
from symrun.config import (CONFIG_DIR, Config, ConfigError, did_you_mean, experiment_presets, flatten,
                           register_configs, to_config, to_dict, total_steps)

register_configs()


@dataclass
class Plan:
    sweep_dir: Path
    name: str
    configs: dict[str, Config]                   # run_id → config, every run of the grid
    packs: list[list[str]]                       # run ids still to train, grouped
    swept: list[str]                             # keys that vary across the grid
    overrides: list[str]
    finished: list[str] = field(default_factory=list)   # already finished in sweep_dir: skipped

    @property
    def steps(self) -> int:
        return sum(total_steps(self.configs[p[0]]) for p in self.packs)


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(run overrides, Hydra overrides such as hydra/launcher=joblib or hydra.sweep.dir=...)."""
    is_hydra = lambda a: a.lstrip("+~").startswith(("hydra.", "hydra/"))  # noqa: E731
    return [a for a in args if not is_hydra(a)], [a for a in args if is_hydra(a)]


def _parse(args: list[str]):
    try:   # with the config loader, glob(...) sweeps over group options work too
        return OverridesParser.create(config_loader=GlobalHydra.instance().config_loader()).parse_overrides(args)
    except HydraException as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def _hydra_context():
    GlobalHydra.instance().clear()
    return initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name="symrun")


def _compose(overrides: list[str], **kw) -> DictConfig:
    try:
        return compose("config", overrides=overrides, **kw)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e)) from None


def _explain(e: Exception, keys=()) -> str:
    """One line a user can act on from a Hydra/OmegaConf error: the setting and the type it wants,
    and for a misspelt setting (among `keys`) or group option the nearest valid name."""
    cause = e.__cause__ or e.__context__
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return f"wrong type for {cause.full_key}: {_first_line(cause)}"
    message = _first_line(e)
    if m := re.match(r"Could not override '([^']+)'", message):
        return f"unknown setting '{m[1]}'" + did_you_mean(m[1], keys)
    if m := re.search(r"Could not find '(.+)/([^/']+)'", message):
        group, option = m[1], m[2]
        options = GlobalHydra.instance().config_loader().get_group_options(group)
        return (f"unknown {group} option '{option}'" + (did_you_mean(option, options) or "")
                + f" (options: {', '.join(options)})")
    return message


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _groups() -> set[str]:
    return set(GlobalHydra.instance().config_loader().list_groups(""))


def _is_group(override, groups: set[str]) -> bool:
    """A group choice (model=mlp, experiment=x, hydra/launcher=…) rather than a value (model.width=8)."""
    return override.key_or_group.split("@")[0] in groups or "/" in override.key_or_group


def expand(args: list[str]) -> tuple[list[list[str]], list[str]]:
    """Every run's override list, and the swept keys. Grid axes come from the preset's
    `hydra.sweeper.params` and from sweep syntax on the command line (which wins per key)."""
    parsed = _parse(args)
    if any(o.is_sweep_override() and o.get_key_element() == "experiment" for o in parsed):
        raise ConfigError("sweep one experiment preset at a time (experiment=a,b is not supported)")
    # Only group choices (experiment=, model=, …) decide which preset grid applies; value overrides
    # are checked per run, where they meet the model they belong to (model=mlp,ensemble model.width=8).
    groups = _groups()
    base = _compose([o.input_line for o in parsed if not o.is_sweep_override() and _is_group(o, groups)],
                    return_hydra_config=True)
    params = OmegaConf.select(base, "hydra.sweeper.params") or {}
    combined = _parse([f"{k}={v}" for k, v in params.items()] + args)
    final = {o.get_key_element(): o.is_sweep_override() for o in combined}
    try:
        grid = BasicSweeper.split_arguments(combined, max_batch_size=None)[0]
    except HydraException as e:
        raise ConfigError(_first_line(e)) from None
    except ValueError as e:        # range(0,1,0): Python's own range() refuses it while Hydra expands
        raise ConfigError(f"a sweep axis cannot be expanded: {e}") from None
    if not grid:
        raise ConfigError("the grid is empty: a sweep axis has no values")
    # A swept group (model=a,b) shows in the tables as its option's name column (model.name).
    column = lambda k: f"{k}.name" if k in ("model", "data", "constraint") else k  # noqa: E731
    return grid, [column(k) for k, swept in final.items() if swept]


def compose_all(grid: list[list[str]]) -> list[Config]:
    """Typed configs for each override list; composes once per distinct group choice (model=,
    data=, experiment=) and applies plain value overrides to a copy — Hydra's own override
    semantics, without a full composition per run."""
    groups = _groups()
    cache: dict[tuple, DictConfig] = {}
    configs = []
    for overrides in grid:
        parsed = _parse(overrides)
        group_part = tuple(o.input_line for o in parsed if _is_group(o, groups))
        if group_part not in cache:
            cache[group_part] = _compose(list(group_part))
        cfg = copy.deepcopy(cache[group_part])
        try:
            ConfigLoaderImpl._apply_overrides_to_config([o for o in parsed if not _is_group(o, groups)], cfg)
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(_explain(e, flatten(OmegaConf.to_container(cache[group_part])))) from None
        configs.append(to_config(cfg))
    return configs


def check_hydra_args(hydra_args: list[str]) -> None:
    """Compose the pack job with the user's Hydra arguments, so a bad launcher or key fails now."""
    if any(a.lstrip("+~").startswith("hydra.sweeper.params") for a in hydra_args):
        raise ConfigError("put grid axes on the command line (key=a,b) or in a preset, not in hydra.sweeper.params")
    try:
        compose("pack_job", overrides=["plan=x", *hydra_args], return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e)) from None


def check_buildable(configs: list[Config]) -> None:
    """Load every distinct dataset and build every distinct model once, before any work starts,
    and estimate each pack's memory (symrun.budget)."""
    seen: dict[str, data_mod.Dataset] = {}
    per_pack = Counter(engine.pack_key(c) for c in configs)
    for cfg in configs:
        device = engine.resolve_device(cfg.device)
        key = json.dumps(to_dict(cfg)["data"], sort_keys=True, default=str)
        if key not in seen:
            seen[key] = data_mod.load(cfg.data)
        ds = seen[key]
        model = models.build(cfg.model, ds.in_dim, ds.out_dim)
        reparam.build(cfg, model)   # also checks constraint=dcs
        budget.check_pack(cfg, ds, model, min(cfg.pack_size, per_pack[engine.pack_key(cfg)]), device, engine.EVAL_CHUNK)
        if ds.task == "classification" and cfg.noise.label_std > 0:
            raise ConfigError("noise.label_std applies to regression; this data is classification (use noise.label_flip)")
        if ds.task == "regression" and cfg.noise.label_flip > 0:
            raise ConfigError("noise.label_flip applies to classification; this data is regression (use noise.label_std)")
        if cfg.data.batch_size is not None and cfg.data.batch_size > len(ds.x):
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} exceeds the {len(ds.x)} training examples")
        if cfg.tasks.count > 1 and cfg.tasks.change == "labels" and ds.task != "classification":
            raise ConfigError("tasks.change=labels permutes class labels: it needs a classification task")


def compose_one(args: list[str]) -> Config:
    """One typed, validated and buildable config from overrides (no sweep syntax); nothing is written."""
    if (suite := suite_of(args)) is not None:
        raise ConfigError(f"experiment={suite[0]} is a suite of presets ({', '.join(suite[1])}), not one configuration")
    with _hydra_context():
        if any(o.is_sweep_override() for o in _parse(args)):
            raise ConfigError("this command takes one configuration, not sweep syntax")
        cfg = compose_all([args])[0]
    check_buildable([cfg])
    return cfg


def suite_of(args: list[str]) -> Optional[tuple[str, dict[str, list[str]]]]:
    """(name, {member preset: its overrides}) when `experiment=` names a suite: a preset file
    whose only key is `suite:`, mapping presets to the overrides each runs with. Else None."""
    chosen = [a.split("=", 1)[1] for a in args if a.startswith("experiment=")]
    presets = experiment_presets(CONFIG_DIR)
    if chosen and ("/" in chosen[-1] or chosen[-1].startswith(".")):   # never a file outside the presets
        raise ConfigError(f"unknown experiment option '{chosen[-1]}'" + did_you_mean(chosen[-1], presets)
                          + f" (options: {', '.join(presets)})")
    path = CONFIG_DIR / "experiment" / f"{chosen[-1]}.yaml" if chosen else None
    if path is None or not path.is_file():
        return None
    raw = OmegaConf.to_container(OmegaConf.load(path))
    if not isinstance(raw, dict) or "suite" not in raw:
        return None
    members = raw["suite"]
    ok = (set(raw) == {"suite"} and isinstance(members, dict) and members
          and all(isinstance(v, list) and all(isinstance(o, str) for o in v) for v in members.values()))
    if not ok:
        raise ConfigError(f"{path}: a suite holds only `suite:`, a map of preset name → list of override strings")
    for member in members:
        if member not in presets or suite_of([f"experiment={member}"]) is not None:
            raise ConfigError(f"{path}: suite member '{member}' is not an experiment preset")
    return chosen[-1], members


def plans(args: list[str], outputs: Path = Path("outputs"), sweep_dir: Optional[Path] = None,
          hydra_args: tuple[str, ...] = ()) -> list[Plan]:
    """The sweeps `symrun sweep ARGS` runs: one plan, or for a suite one per member preset, in
    `<sweep folder>/<member>/` with the member's overrides and then ARGS (which win). Every
    member is planned, so checked, before any of them is written."""
    suite = suite_of(args)
    if suite is None:
        return [plan(args, outputs, sweep_dir, hydra_args=hydra_args)]
    name, members = suite
    parent = Path(sweep_dir) if sweep_dir is not None else results.new_sweep_dir(outputs, name)
    rest = [a for a in args if not a.startswith("experiment=")]
    return [plan([f"experiment={member}", *overrides, f"name={name}/{member}", *rest], outputs, parent / member,
                 hydra_args=hydra_args)
            for member, overrides in members.items()]


def plan(args: list[str], outputs: Path = Path("outputs"), sweep_dir: Optional[Path] = None,
         single: bool = False, hydra_args: tuple[str, ...] = ()) -> Plan:
    """Everything a sweep will do, checked; nothing is written. `single`: exactly one run.
    `hydra_args` (launcher choice and settings) are checked here too, before any work."""
    if (suite := suite_of(args)) is not None:
        raise ConfigError(f"experiment={suite[0]} is a suite of presets ({', '.join(suite[1])}): run it with symrun sweep")
    with _hydra_context():
        grid, swept = expand(args) if not single else ([args], [])
        if single and any(o.is_sweep_override() for o in _parse(args)):
            raise ConfigError("symrun run takes one configuration; use symrun sweep for sweep syntax")
        configs = compose_all(grid)
        check_hydra_args(list(hydra_args))
    check_buildable(configs)
    by_id = {results.run_id(c): c for c in configs}
    name = configs[0].name
    sweep_dir = Path(sweep_dir) if sweep_dir is not None else results.new_sweep_dir(outputs, name)
    tables.check_consistent(sweep_dir, by_id, swept)
    return schedule(Plan(sweep_dir, name, by_id, [], swept, list(args)))


def schedule(p: Plan) -> Plan:
    """The plan with its finished runs and packs read afresh from its folder: runs finished there
    are skipped, the rest grouped into packs by shape. A pack with a checkpoint, or one a kill
    stopped while it wrote its runs, is kept as it was (records.unfinished_packs), so it resumes
    from its checkpoint and ends bit for bit as it would have. Cheap; call it again once the
    sweep's lock is held, so runs another sweep finished in between are not trained twice."""
    finished = [rid for rid in p.configs if not records.needs_training(p.sweep_dir, rid)]
    packs: list[list[str]] = []
    taken: set[str] = set()
    for ids in records.unfinished_packs(p.sweep_dir):
        if (set(ids) <= set(p.configs) - taken and not set(ids) <= set(finished)
                and len({engine.pack_key(p.configs[r]) for r in ids}) == 1):
            packs.append(ids)
            taken |= set(ids)
    todo: dict[str, list[str]] = {}
    for rid, cfg in p.configs.items():
        if rid not in finished and rid not in taken:
            todo.setdefault(engine.pack_key(cfg), []).append(rid)
    for ids in todo.values():
        size = p.configs[ids[0]].pack_size
        packs += [ids[i: i + size] for i in range(0, len(ids), size)]
    return dataclasses.replace(p, packs=packs, finished=finished)


def write_plan(p: Plan) -> Path:
    """Lay out the sweep folder: sweep.json (with this launch appended to its history), the
    launch's plan and each new run's config.yaml. Returns the plan's path."""
    previous = records.read_sweep(p.sweep_dir)[0]
    launches = previous.get("launches", [])
    results.write_json(p.sweep_dir / "sweep.json", {
        "name": p.name,
        "swept": list(dict.fromkeys(previous.get("swept", []) + p.swept)),
        "created": previous.get("created", results.now()),
        "launches": launches + [{"at": results.now(), "overrides": p.overrides, "runs": len(p.configs),
                                 "already_finished": len(p.finished), "packs": len(p.packs)}]})
    for rid, cfg in p.configs.items():
        if rid not in p.finished:           # a finished run's folder is never touched again
            results.save_config(p.sweep_dir, rid, cfg)
    return results.write_launch_plan(p.sweep_dir, len(launches), {"sweep_dir": str(p.sweep_dir.resolve()),
                                                                  "grid": list(p.configs), "packs": p.packs})


def write_launch(folder: Path, written: list[tuple[Plan, Path]]) -> Path:
    """One launch of several written plans (a suite's members, each with its plan from
    `write_plan`): `<folder>/launches/<k>/plan.json` lists the plans and numbers their packs
    0…P−1 across them, so one multirun — one job array on SLURM — runs every member's packs at
    once. `run_pack` follows a pack to its member's plan. Returns the launch's path."""
    packs = [[i, j] for i, (p, _) in enumerate(written) for j in range(len(p.packs))]
    return results.write_launch_plan(Path(folder), 0, {"plans": [str(pp.resolve()) for _, pp in written], "packs": packs})


def run_pack(plan_path: Path, index: int, on_step: Optional[Callable[[int], None]] = None) -> dict:
    """Train pack `index` of a written plan (or launch, `write_launch`) and record every run. Never
    raises for a run's failure: a pack that fails marks its runs failed, with the error, and the
    sweep goes on. The pack is trained whole, as planned, so each run's numbers are those of this
    pack (float rounding depends on a pack's size), but runs of it already finished — a kill, or a
    requeued job, after some were written — are never written again."""
    written = results.read_json(Path(plan_path))
    if "plans" in written:                        # a launch of several plans: the member's pack
        member, local = written["packs"][index]
        return {**run_pack(Path(written["plans"][member]), local, on_step), "plan": written["plans"][member]}
    sweep_dir = Path(written["sweep_dir"])
    planned = written["packs"][index]
    todo = [rid for rid in planned if records.needs_training(sweep_dir, rid)]
    if not todo:
        return {"pack": index, "runs": 0}
    readable = all(records.read_run(sweep_dir, rid).config is not None for rid in planned)
    trained = planned if readable else todo
    configs = [to_config(results.load_config_dict(sweep_dir, rid)) for rid in trained]
    info = {"pack": index, "pack_runs": len(trained), "started_at": results.now(),
            **results.provenance(str(engine.resolve_device(configs[0].device)))}
    for rid in todo:
        results.write_status(sweep_dir, rid, results.RUNNING, **info)
    start = time.perf_counter()
    ckpt = results.checkpoint_path(sweep_dir, trained)
    try:
        outcomes = engine.train_pack(configs, on_step=on_step, checkpoint=ckpt)
    except results.OutputError:
        raise                            # the folder cannot be written (disk full): stop, resumable
    except Exception as e:  # noqa: BLE001 — recorded per run; neighbours in other packs go on
        error = f"{type(e).__name__}: {e}"
        for rid in todo:
            results.write_status(sweep_dir, rid, results.FAILED, error=error, traceback=traceback.format_exc(),
                                 finished_at=results.now(), wall_time_s=time.perf_counter() - start, **info)
        return {"pack": index, "runs": len(todo), "failed": len(todo)}
    wall = time.perf_counter() - start
    for rid, out in zip(trained, outcomes):
        if rid in todo:
            results.write_run(sweep_dir, rid, out.status, out.rows, out.state, out.arrays, diverged_at=out.diverged_at,
                              resumed_from=out.resumed_from or None, finished_at=results.now(), wall_time_s=wall, **info)
    results.remove_checkpoint(sweep_dir, trained)       # every run is recorded: the checkpoint has served
    return {"pack": index, "runs": len(todo), "diverged": sum(o.status == results.DIVERGED for o in outcomes)}


# The Hydra job a launcher runs. A plain module-level function, so joblib and submitit pickle
# it by reference; the progress callback is process-local state that never travels with it.
_ON_STEP: Optional[Callable[[int], None]] = None


def pack_task(cfg: DictConfig) -> dict:
    return run_pack(Path(cfg.plan), int(cfg.pack), on_step=_ON_STEP)


def in_process(hydra_args: list[str]) -> bool:
    """Whether the launcher runs jobs in this process (Hydra's basic launcher)."""
    chosen = [a.split("=", 1)[1] for a in hydra_args if a.startswith("hydra/launcher=")]
    return not chosen or chosen[-1] == "basic"


def launch(plan_path: Path, packs: int, hydra_args: list[str], on_step: Optional[Callable[[int], None]] = None) -> None:
    """Run the `packs` packs of a written plan or launch as Hydra multirun jobs through the
    configured launcher (basic: in-process); their Hydra folders go beside the plan. A launcher's
    error (a job that died without a result) is raised, not printed and exited on."""
    global _ON_STEP
    if not packs:
        return
    argv = [f"plan='{plan_path.resolve()}'", f"pack={','.join(str(i) for i in range(packs))}",
            f"hydra.sweep.dir='{plan_path.parent.resolve()}'", "hydra.sweep.subdir=packs/${hydra.job.num}",
            "hydra.job.name=symrun", *[a for a in hydra_args if not a.startswith("hydra.sweep.dir=")], "--multirun"]
    saved, _ON_STEP = sys.argv, on_step
    sys.argv = [saved[0], *argv]
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        GlobalHydra.instance().clear()
        hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="pack_job")(pack_task)()
    finally:
        sys.argv, _ON_STEP = saved, None
        GlobalHydra.instance().clear()
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR")
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error


def runs_done(p: Plan) -> int:
    """How many of the plan's runs have ended (any status but running) — for progress from afar."""
    ended = 0
    for rid in (r for pack in p.packs for r in pack):
        st = records.read_run(p.sweep_dir, rid, config=False).info
        ended += st is not None and st.get("status") != results.RUNNING
    return ended


def sweep_dir_from(hydra_args: list[str]) -> Optional[Path]:
    """The folder a `hydra.sweep.dir=...` override names (to resume into), if any."""
    for a in hydra_args:
        if a.startswith("hydra.sweep.dir="):
            return Path(a.split("=", 1)[1].strip("'\""))
    return None
