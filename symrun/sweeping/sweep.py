"""Sweeps: a grid of runs planned as packs — what symrun's Hydra sweeper does before it launches.

The grid comes from Hydra's override and sweep syntax (`key=a,b`, `range(…)`, `choice(…)`,
`glob(…)`) on the command line and in a preset's `hydra.sweeper.params`; the command line wins
per key. `plans` checks everything before anything is written. Each distinct *shape* — a grid
point's overrides other than per-run values (config.PER_RUN_KEYS) — is composed once, exactly as
the launcher's job will compose it; each run is its shape's config with its per-run values set
on a copy (composition.with_values), validated; each distinct dataset is loaded and each model
built once. Runs that share a shape share a pack (at most `pack_size` runs). `schedule` leaves
out runs finished in the folder (resume, extend), `write_plan` lays the folder out, and
`job_overrides` is what one pack's Hydra job composes: its shape's overrides and `+pack.*`, the
per-run values of its runs, which symrun.sweeping.job sets the same way.

A suite (a preset that sets `hydra.sweeper.suite`) is one plan per member preset, in
`<folder>/<member>/`; `write_launch` numbers their packs across the members for one launch.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from hydra.core.override_parser.types import Transformer

from symrun.training import engine, memory, reparam
from symrun import models
from symrun.sweeping import records, results
from symrun import data as data_mod
from symrun.sweeping.composition import Composer, Shape, composer, drop_hydra, hydra_quoted, literal
from symrun.config import PER_RUN_KEYS, Config, ConfigError, to_config, to_dict, total_steps


@dataclass(frozen=True)
class Setting:
    """One override of a grid point: its text and key; for a per-run setting with a plain value,
    that value (typed by Hydra's parser), so it can be set on a copy of its shape's config."""

    text: str
    key: str
    value: Any = None
    per_run: bool = False


@dataclass
class Plan:
    sweep_dir: Path
    name: str
    configs: dict[str, Config]                   # run_id → config, every run of the grid
    packs: list[list[str]]                       # run ids still to train, grouped
    swept: list[str]                             # keys that vary across the grid
    overrides: list[str]                         # the command line's, for sweep.json
    finished: list[str] = field(default_factory=list)   # already finished in sweep_dir: skipped
    settings: dict[str, tuple[Setting, ...]] = field(default_factory=dict)   # run_id → its grid point
    groups: dict[str, str] = field(default_factory=dict)   # run_id → what it shares with its pack mates
    parameters: dict[str, int] = field(default_factory=dict)   # group → the model's parameters per run

    @property
    def steps(self) -> int:
        return sum(total_steps(self.configs[p[0]]) for p in self.packs)


def plans(args: list[str], outputs: Path = Path("outputs"), sweep_dir: Optional[Path] = None) -> list[Plan]:
    """The sweeps `symrun sweep ARGS` runs (one, or one per member of a suite), checked; nothing
    is written. For the library and tests: the symrun command plans through its Hydra sweeper."""
    with composer(args) as comp:
        master = comp.master
        where = sweep_dir if sweep_dir is not None else results.new_sweep_dir(outputs, master.name)
        return sweeper_plans(comp, list(master.hydra.overrides.task), Path(where))


def plan(args: list[str], outputs: Path = Path("outputs"), sweep_dir: Optional[Path] = None,
         single: bool = False) -> Plan:
    """One sweep's plan (not a suite's); `single`: exactly one run, no sweep syntax."""
    with composer(args) as comp:
        if comp.master.hydra.sweeper.get("suite"):
            raise ConfigError(f"experiment={_experiment(comp)} is a suite of presets "
                              f"({', '.join(comp.master.hydra.sweeper.suite)}): run it with symrun sweep")
        arguments = list(comp.master.hydra.overrides.task)
        if single and any(o.is_sweep_override() for o in comp.parse(arguments)):
            raise ConfigError("symrun run takes one configuration; use symrun sweep for sweep syntax")
        where = sweep_dir if sweep_dir is not None else results.new_sweep_dir(outputs, comp.master.name)
        params = {} if single else dict(comp.master.hydra.sweeper.params)
        return plan_grid(comp, params, arguments, Path(where))


def compose_one(args: list[str], config_dir: Optional[Path] = None) -> Config:
    """One typed, validated and buildable config from overrides (no sweep syntax); nothing is written."""
    with composer(args, config_dir) as comp:
        if comp.master.hydra.sweeper.get("suite"):
            raise ConfigError(f"experiment={_experiment(comp)} is a suite of presets, not one configuration")
        arguments = list(comp.master.hydra.overrides.task)
        if any(o.is_sweep_override() for o in comp.parse(arguments)):
            raise ConfigError("this command takes one configuration, not sweep syntax")
        cfg = to_config(drop_hydra(comp.compose(arguments)))
    check_shape(cfg)
    return cfg


def sweeper_plans(comp: Composer, arguments: list[str], sweep_dir: Path) -> list[Plan]:
    """The plans of a sweep whose master config `comp` holds: its grid, or one per suite member
    in `sweep_dir/<member>/` (the member's preset and overrides, then `arguments`, which win).
    Every member is planned, so checked, before any is written."""
    sweeper = comp.master.hydra.sweeper
    if not sweeper.get("suite"):
        return [plan_grid(comp, dict(sweeper.params), arguments, sweep_dir)]
    suite = _experiment(comp)
    _check_suite(comp, suite, arguments)
    rest = [a for a in arguments if a.split("=", 1)[0] != "experiment"]
    out = []
    for member, overrides in sweeper.suite.items():
        args = [f"experiment={member}", *overrides, f"name={suite}/{member}", *rest]
        member_comp = comp.sweep_of(args)
        member_master = member_comp.master
        if member_master.hydra.sweeper.get("suite"):
            raise ConfigError(f"suite {suite}: member '{member}' is a suite itself")
        out.append(plan_grid(member_comp, dict(member_master.hydra.sweeper.params), args, sweep_dir / member))
    return out


def _check_suite(comp: Composer, suite: str, arguments: list[str]) -> None:
    """A suite preset holds only `name` and `hydra.sweeper.suite` (its members' presets and
    overrides), and each member is an experiment preset."""
    options = comp.group_options("experiment")
    for member in comp.master.hydra.sweeper.suite:
        if member not in options:
            raise ConfigError(f"suite {suite}: member '{member}' is not an experiment preset")
    without = drop_hydra(comp.sweep_of([a for a in arguments if a.split("=", 1)[0] != "experiment"]).master)
    mine = drop_hydra(copy.deepcopy(comp.master))
    mine.name = without.name
    if mine != without:
        raise ConfigError(f"suite {suite}: a suite preset sets only `name` and `hydra.sweeper.suite` "
                          "(put other settings in the member presets or the suite's override lists)")


def _experiment(comp: Composer) -> str:
    return str(comp.master.hydra.runtime.choices.get("experiment"))


def expand(comp: Composer, params: dict[str, str], arguments: list[str]) -> tuple[list[list[Setting]], list[str]]:
    """The grid's axes (each the Settings of its values) and the swept keys. Axes come from
    `params` (a preset's hydra.sweeper.params) and then `arguments`, which win per key."""
    parsed = comp.parse([f"{k}={v}" for k, v in params.items()] + list(arguments))
    keys = {o.key_or_group for o in parsed}
    axes: dict[str, list[Setting]] = {}
    swept: dict[str, bool] = {}
    for o in parsed:
        element = o.get_key_element()
        if o.is_sweep_override():
            if o.key_or_group == "experiment":
                raise ConfigError("sweep one experiment preset at a time (experiment=a,b is not supported)")
            if not o.is_discrete_sweep():
                raise ConfigError(f"{o.input_line}: symrun sweeps lists and ranges of values, not intervals")
            # text and value from one pass: shuffle(…) draws a new order on every pass
            try:
                pairs = [(f"{element}={Transformer.str(v)}", v) for v in o.sweep_iterator()]
            except ValueError as e:     # range(0,1,0): Python's own range() refuses it while Hydra expands
                raise ConfigError(f"a sweep axis cannot be expanded: {e}") from None
        else:
            pairs = [(o.input_line, o.value())]
        # A per-run value is set on a copy of its shape's config, unless another override of the
        # grid touches its parent (optim={…}): Hydra's order of the two then decides.
        settable = (o.key_or_group in PER_RUN_KEYS and o.package is None and not (o.is_delete() or o.is_add())
                    and not any(o.key_or_group.startswith(k + ".") for k in keys))
        axes[element] = [Setting(text, o.key_or_group, value, settable and _plain(value)) for text, value in pairs]
        swept[element] = o.is_sweep_override()
    if any(not values for values in axes.values()):
        raise ConfigError("the grid is empty: a sweep axis has no values")
    # A swept group (model=a,b) shows in the tables as its option's name column (model.name).
    column = lambda k: f"{k}.name" if k in ("model", "data", "constraint") else k  # noqa: E731
    return list(axes.values()), [column(k.lstrip("+~")) for k, s in swept.items() if s]


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str, bool))


def plan_grid(comp: Composer, params: dict[str, str], arguments: list[str], sweep_dir: Path) -> Plan:
    """Every run of the grid, composed and checked, with its finished runs and packs."""
    axes, swept = expand(comp, params, arguments)
    shapes: dict[tuple[str, ...], tuple[Shape, str, str]] = {}    # overrides → (shape, data's task, pack group)
    parameters: dict[str, int] = {}                                  # pack group → parameters per run
    built: dict[str, tuple] = {}                                     # pack group → (config, data, model)
    datasets: dict[str, data_mod.Dataset] = {}
    configs: dict[str, Config] = {}
    settings: dict[str, tuple[Setting, ...]] = {}
    groups: dict[str, str] = {}
    ids: dict[tuple, Callable[[Config], str]] = {}     # (overrides, per-run keys) → the run ids of its runs
    for point in itertools.product(*axes):
        key = tuple(s.text for s in point if not s.per_run)
        if key not in shapes:
            shape = Shape(drop_hydra(comp.compose(list(key))))
            ds, model = build(shape.config, datasets)
            shapes[key] = shape, ds.task, _group(shape.config)
            parameters[shapes[key][2]] = sum(math.prod(s) for s, _ in model.shapes().values())
            built[shapes[key][2]] = shape.config, ds, model
        shape, task, group = shapes[key]
        values = {s.key: s.value for s in point if s.per_run}
        cfg = shape.run(values)
        check_noise(cfg, task)
        named = (key, tuple(values))
        if named not in ids:      # an interpolation may carry a per-run value anywhere: ids in full
            ids[named] = results.run_id if shape.interpolated else results.RunIds(cfg, values)
        rid = ids[named](cfg)
        configs[rid], settings[rid] = cfg, point
        # An interpolation may carry a per-run value into any setting: such runs are grouped by their own.
        groups[rid] = rid if not models.spec(cfg.model.name).packs else _group(cfg) if shape.interpolated else group
        parameters.setdefault(groups[rid], parameters[group])
        built.setdefault(groups[rid], built[group])
    _check_memory(configs, groups, built)
    records.check_consistent(Path(sweep_dir), configs, swept)
    name = next(iter(configs.values())).name
    return schedule(Plan(Path(sweep_dir), name, configs, [], swept, list(arguments), settings=settings, groups=groups,
                         parameters=parameters))


def _check_memory(configs: dict[str, Config], groups: dict[str, str], built: dict[str, tuple]) -> None:
    """Refuse, before any work, a pack that cannot fit in memory (symrun.training.memory): each group's
    largest pack: its runs, at most the pack size (symrun.training.memory.pack_size)."""
    runs: dict[str, int] = {}
    for rid in configs:
        runs[groups[rid]] = runs.get(groups[rid], 0) + 1
    for group, count in runs.items():
        cfg, ds, model = built[group]
        device = engine.resolve_device(cfg.device)
        memory.check_pack(cfg, ds, model, 1, device)   # one run must fit, by the estimate
        # Sizing a pack from memory measures a real step of 1 and 2 runs: first make sure, by the
        # estimate, that 2 runs fit, else refuse the pack the sweep would train (it needs more).
        if not memory.fits(cfg, ds, model, min(2, count), device):
            memory.check_pack(cfg, ds, model, min(cfg.pack_size or count, count), device)
        memory.check_pack(cfg, ds, model, min(memory.pack_size(cfg), count), device)


def _group(cfg: Config) -> str:
    """What the runs of one pack share: every setting but the per-run ones (the engine's pack
    key), and the sweep's name and pack size, so a pack's job composes exactly its runs' configs."""
    return json.dumps([engine.pack_key(cfg), cfg.name, cfg.pack_size])


def check_shape(cfg: Config, datasets: Optional[dict] = None) -> tuple[str, int]:
    """Load the config's dataset (once per distinct one in `datasets`) and build its model, and
    check what depends on the data, before any work starts. Returns the data's task and the
    model's parameters per run."""
    ds, model = build(cfg, datasets)
    return ds.task, sum(math.prod(shape) for shape, _ in model.shapes().values())


def build(cfg: Config, datasets: Optional[dict] = None):
    """(dataset, packed model) of a config, checked as `check_shape` says."""
    engine.resolve_device(cfg.device)
    datasets = {} if datasets is None else datasets
    key = json.dumps(to_dict(cfg)["data"], sort_keys=True, default=str)
    if key not in datasets:
        datasets[key] = data_mod.load(cfg.data)
    ds = datasets[key]
    model = models.build(cfg.model, ds.in_dim, ds.out_dim)
    reparam.build(cfg, model)                                  # also checks constraint=dcs
    if cfg.data.batch_size is not None and cfg.data.batch_size > len(ds.x):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} exceeds the {len(ds.x)} training examples")
    if cfg.tasks.count > 1 and cfg.tasks.change == "labels" and ds.task != "classification":
        raise ConfigError("tasks.change=labels permutes class labels: it needs a classification task")
    check_noise(cfg, ds.task)
    return ds, model


def check_noise(cfg: Config, task: str) -> None:
    if task == "classification" and cfg.noise.label_std > 0:
        raise ConfigError("noise.label_std applies to regression; this data is classification (use noise.label_flip)")
    if task == "regression" and cfg.noise.label_flip > 0:
        raise ConfigError("noise.label_flip applies to classification; this data is regression (use noise.label_std)")


def schedule(p: Plan) -> Plan:
    """The plan with its finished runs and packs read afresh from its folder: runs finished there
    are skipped, the rest grouped into packs. A pack with a checkpoint, or one a kill stopped
    while it wrote its runs, is kept as it was (records.unfinished_packs), so it resumes from its
    checkpoint and ends bit for bit as it would have. Cheap; call it again once the sweep's lock
    is held, so runs another sweep finished in between are not trained twice."""
    waiting = set(records.needing_training(p.sweep_dir, p.configs))
    finished = [rid for rid in p.configs if rid not in waiting]
    done = set(finished)
    group = lambda rid: p.groups.get(rid) or engine.pack_key(p.configs[rid])  # noqa: E731
    packs: list[list[str]] = []
    taken: set[str] = set()
    for ids in records.unfinished_packs(p.sweep_dir):
        if set(ids) <= set(p.configs) - taken and not set(ids) <= done and len({group(r) for r in ids}) == 1:
            packs.append(ids)
            taken |= set(ids)
    todo: dict[str, list[str]] = {}
    for rid in p.configs:
        if rid not in done and rid not in taken:
            todo.setdefault(group(rid), []).append(rid)
    for ids in todo.values():
        size = memory.pack_size(p.configs[ids[0]])
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
    finished = set(p.finished)
    with results.one_sync(p.sweep_dir):       # a finished run's folder is never touched again
        results.save_configs(p.sweep_dir, [(rid, cfg) for rid, cfg in p.configs.items() if rid not in finished])
    return results.write_launch_plan(p.sweep_dir, len(launches), {"sweep_dir": os.path.abspath(p.sweep_dir),
                                                                  "grid": list(p.configs), "packs": p.packs})


def write_launch(folder: Path, written: list[tuple[Plan, Path]]) -> Path:
    """One launch of several written plans (a suite's members, each with its plan from
    `write_plan`): `<folder>/launches/<k>/plan.json` lists the plans and numbers their packs
    0…P−1 across them, so one multirun — one job array on SLURM — runs every member's packs at
    once. Returns the launch's path."""
    packs = [[i, j] for i, (p, _) in enumerate(written) for j in range(len(p.packs))]
    return results.write_launch_plan(Path(folder), 0, {"plans": [os.path.abspath(pp) for _, pp in written],
                                                       "packs": packs})


def job_overrides(p: Plan, index: int, folder: Path, launch: int, member: Optional[str] = None) -> list[str]:
    """What the Hydra job of pack `index` composes: the overrides of its first run without the
    per-run settings that vary within the pack; its folder, `folder`/launches/<launch>/packs/<job
    number> (`folder` as the sweep resolved it: a job's own `name` or clock may differ); and
    `+pack.*`: its number, the suite member it belongs to, and `+pack.runs.<key>='[…]'`, one value
    per run for each per-run setting that varies, as one string holding a JSON list (`'[0.1, 0.2]'`,
    `'["constant", "cosine"]'`; symrun.sweeping.job.pack_configs reads them). One string, not a
    Hydra list: Hydra's override parser takes time quadratic in a list's length (4 s for a pack of
    4,608 runs), and linear in a string's."""
    runs = [p.configs[rid] for rid in p.packs[index]]
    varying = [k for k in PER_RUN_KEYS if len({_get(c, k) for c in runs}) > 1]
    out = [s.text for s in p.settings[p.packs[index][0]] if s.key not in varying]
    out += [f"hydra.sweep.dir={hydra_quoted(literal(os.path.abspath(folder)))}",
            f"hydra.sweep.subdir={results.job_subdir(launch)}", f"+pack.index={index}"]
    out += [f"+pack.member={member}"] if member is not None else []
    out += [f"+pack.runs.{k}={hydra_quoted(literal(json.dumps([_get(c, k) for c in runs])))}" for k in varying]
    return out


def _get(cfg: Config, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg

