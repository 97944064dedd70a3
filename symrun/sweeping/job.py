"""A Hydra job of symrun: one pack of a planned sweep, or one run.

`task` is the task function every launcher runs — in this process (Hydra's basic launcher), a
joblib worker or a SLURM node. A pack job's config (its `.hydra/config.yaml`) is the shape its
runs share plus `pack`: the pack's number, the suite member it belongs to, and under `pack.runs`
one string per per-run setting that varies, a JSON list of its values, one per run
(symrun.sweeping.sweep.job_overrides; `values_of` reads it). Its runs' configs are rebuilt from
it as the planner built them — set on copies, not recomposed, not
read back from the run folders. A job without `pack` is one run: `symrun run` (its folder is
hydra.run.dir) or a job of another sweeper (`hydra/sweeper=basic`: its job folder).

`run_pack` keeps the sweep's contract: it trains the pack, records every run, and never raises
for a run's failure — a pack that fails marks its runs failed, and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from symrun.sweeping.composition import Shape, drop_hydra, register_configs
from symrun.config import Config, ConfigError, total_steps
from symrun.models.module import use_config_folders

register_configs()

# Progress of the jobs that run in this process, set by the symrun command; it never travels
# with the task to another process (joblib and submitit pickle the task function by reference).
ON_STEP: Optional[Callable[[int], None]] = None
# The packs the symrun command planned and launches in this process (Hydra's basic launcher),
# by their jobs' overrides, set for that launch only: (sweep folder, pack number, run ids,
# configs, the runs to train). A job composed from those overrides holds the plan's configs, so
# it takes them from here instead of building every run's config again and hashing its id (for
# 4,352 runs, 0.3–0.5 s and 0.4 s), and which of its runs to train: the plan read that, holding
# the folder's lock, and wrote their configs. A job launched anywhere else builds them from its
# config and reads its runs' folders.
PLANNED: dict[tuple[str, ...], tuple[Path, int, list[str], list[Config], list[str]]] = {}


def task(cfg: DictConfig) -> dict:
    """Hydra's task function: train the pack (or the one run) this job's config describes."""
    from hydra.core.hydra_config import HydraConfig

    use_config_folders(HydraConfig.get().runtime)     # model=module imports from them
    if "pack" in cfg:
        planned = PLANNED.get(tuple(HydraConfig.get().overrides.task))     # the job's overrides, less Hydra's
        if planned is not None:
            sweep_dir, index, ids, configs, todo = planned
            return run_pack(sweep_dir, index, configs, on_step=ON_STEP, ids=ids, todo=todo)
        sweep_dir, index, configs = pack_configs(cfg)
        return run_pack(sweep_dir, index, configs, on_step=ON_STEP)
    return run_one(cfg)


def task_overrides(overrides: list[str]) -> tuple[str, ...]:
    """A job's overrides without Hydra's own (hydra.*, hydra/…): what its hydra.overrides.task
    holds, in their order."""
    return tuple(o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/")))


def pack_configs(cfg: DictConfig) -> tuple[Path, int, list[Config]]:
    """(sweep folder, pack number, every run's config) of a pack job's config."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        pack = cfg.pop("pack")
    runs = _columns(OmegaConf.to_container(pack.runs)) if "runs" in pack else {}
    count = len(next(iter(runs.values()))) if runs else 1
    with _in(hc.runtime.cwd):       # relative paths mean what they meant where symrun started
        shape = Shape(cfg)
        configs = [shape.run({k: v[i] for k, v in runs.items()}) for i in range(count)]
    sweep_dir = Path(hc.sweep.dir)             # absolute: the sweep resolved it (sweep.job_overrides)
    return (sweep_dir / pack.member if pack.get("member") else sweep_dir), int(pack.index), configs


def _columns(tree: dict, prefix: str = "") -> dict[str, list]:
    out: dict[str, list] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_columns(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = values_of(v)
    return out


def values_of(text: Any) -> list:
    """The values of one per-run setting in a pack job's config: a JSON list, `'[0, 1]'`,
    `'[0.1, NaN]'` (floats as repr: exact), `'["constant", "cosine"]'`. A list (a job config
    written by hand) is taken as is; `'0.1,0.2'`, numbers only, is how earlier versions wrote it."""
    if isinstance(text, list):
        return text
    text = str(text)
    if text.startswith("["):
        return json.loads(text)
    return [int(v) if v.lstrip("-").isdigit() else float(v) for v in text.split(",")]


@contextlib.contextmanager
def _in(folder: str) -> Iterator[None]:
    """In `folder` as the working directory (a job may run in its own, hydra.job.chdir=true)."""
    here = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


def run_pack(sweep_dir: Path, index: int, configs: list[Config],
             on_step: Optional[Callable[[int], None]] = None, ids: Optional[list[str]] = None,
             todo: Optional[list[str]] = None) -> dict:
    """Train pack `index` of the sweep in `sweep_dir` — these runs' configs, planned there, and
    their run ids when the caller has them from the plan, and which of them to train when the
    plan was made in this process holding the folder's lock (`PLANNED`; else each run's folder
    says: a requeued job finds some written) — and record every run. Never raises
    for a run's failure: a pack that fails marks its runs failed, with the error, and the sweep
    goes on. The pack is trained whole, as planned, so each run's numbers are those of this
    pack (float rounding depends on a pack's size), but runs of it already finished — a kill, or
    a requeued job, after some were written — are never written again. A folder that cannot be
    written (a full disk) raises OutputError: the sweep stops, resumable."""
    from symrun import data
    from symrun.training import engine
    from symrun.sweeping import records, results

    sweep_dir = Path(sweep_dir)
    ids = list(ids) if ids is not None else [results.run_id(c) for c in configs]
    if todo is None:
        unplanned = _unplanned(sweep_dir, ids)      # the planner wrote each run's config.yaml: a run it did not plan is a bug
        if unplanned is not None:
            raise RuntimeError(f"pack {index} holds run {unplanned}, which was not planned in {sweep_dir}")
        todo = records.needing_training(sweep_dir, ids)
    if not todo:
        return {"pack": index, "runs": 0}
    info = {"pack": index, "pack_runs": len(ids), "started_at": results.now(),
            **results.provenance(str(engine.resolve_device(configs[0].device)))}
    if (digest := data.digest(configs[0].data)) is not None:     # a pack's runs share their data
        info["data_sha256"] = digest      # what a report checks the data file against before reading it
    results.write_pack_start(sweep_dir, ids, todo, info)      # its runs read as running from here on
    start = time.perf_counter()
    training = set(todo)        # looked up once a run below: a list would cost runs² (0.17 s at 4,608)
    ckpt = results.checkpoint_path(sweep_dir, ids)
    try:
        outcomes = engine.train_pack(configs, on_step=on_step, checkpoint=ckpt)
    except results.OutputError:
        raise                            # the folder cannot be written (disk full): stop, resumable
    except Exception as e:  # noqa: BLE001 — recorded per run; neighbours in other packs go on
        error = f"{type(e).__name__}: {e}"
        failed = dict(error=error, traceback=traceback.format_exc(), finished_at=results.now(),
                      wall_time_s=time.perf_counter() - start, **info)
        with results.one_sync(sweep_dir):
            results.write_statuses(sweep_dir, [(rid, results.FAILED, failed) for rid in todo])
        return {"pack": index, "runs": len(todo), "failed": len(todo)}
    wall = time.perf_counter() - start
    results.write_runs(sweep_dir, [(rid, out.status, out.rows, out.state, out.arrays,
                                    dict(diverged_at=out.diverged_at, resumed_from=out.resumed_from or None,
                                         finished_at=results.now(), wall_time_s=wall, train_time_s=out.train_seconds,
                                         **info))
                                   for rid, out in zip(ids, outcomes) if rid in training])
    results.remove_checkpoint(sweep_dir, ids)       # every run is recorded: the checkpoint has served
    return {"pack": index, "runs": len(todo), "diverged": sum(o.status == results.DIVERGED for o in outcomes)}


def _unplanned(sweep_dir: Path, ids: list[str]) -> Optional[str]:
    """The first of `ids` without a runs/<id>/config.yaml file, through runs/ opened once; a link
    on the way raises OutputError, as folder.kind does."""
    from symrun.sweeping import folder

    def kind(runs: folder.Folders, rid: str) -> Optional[str]:
        try:
            with runs.opened(rid, create=False) as run:
                return run.kind("config.yaml")
        except FileNotFoundError:
            return None
    try:
        with folder.folders(Path(sweep_dir, "runs"), sweep_dir, create=False) as runs:
            return next((rid for rid in ids if kind(runs, rid) != "file"), None)
    except FileNotFoundError:
        return ids[0] if ids else None


def run_plan(plan, on_step: Optional[Callable[[int], None]] = None) -> list[dict]:
    """Train every pack of a written plan (sweep.write_plan) here, without a launcher: the
    gallery and tests. A launcher's jobs get the same configs through their job configs."""
    from symrun.sweeping import results

    done = [run_pack(plan.sweep_dir, i, [plan.configs[rid] for rid in pack], on_step=on_step, ids=pack)
            for i, pack in enumerate(plan.packs)]
    results.remove_empty_checkpoints(plan.sweep_dir)
    return done


def run_one(cfg: DictConfig) -> dict:
    """One run in this job's folder, laid out as a sweep of one (report, status, collect and a
    rerun into the same folder treat it as any sweep). Returns its final metrics."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from symrun.sweeping import launch, records, results, sweep, tables

    hc = HydraConfig.get()
    folder = Path(hc.runtime.output_dir)
    with _in(hc.runtime.cwd):
        config = Shape(copy.deepcopy(cfg)).config
        if hc.mode != RunMode.RUN:     # symrun run checked it before Hydra wrote anything (RunChecks)
            sweep.check_shape(config)
    rid = results.run_id(config)
    records.remove_stale_temps(folder)
    plan = sweep.schedule(sweep.Plan(folder, config.name, {rid: config}, [], [], list(hc.overrides.task)))
    sweep.write_plan(plan)
    shown = launch.display()
    shown.planned([plan])
    if plan.packs:
        with shown.training(total_steps(config), "training steps") as advance:
            run_pack(folder, 0, [config], on_step=advance)
        results.remove_empty_checkpoints(folder)
    tables.write_tables(folder)
    shown.report(folder)
    info = records.read_run(folder, rid, config=False).info or {}
    if info.get("status") == results.FAILED:
        from symrun.sweeping import launch as launch_mod

        raise launch_mod.RunsFailed(f"the run failed; `symrun status {folder}` says why. Fix the cause, then rerun "
                                    f"with hydra.run.dir={folder} to train it again")
    return info.get("final", {})


def _check_hydra_files(run_dir: Path, config: DictConfig) -> None:
    """Hydra writes a run's `.hydra/` files and its log into the run's folder with plain open():
    in a folder used before, none of them may be a link (it would lead Hydra's write elsewhere)."""
    from symrun.sweeping import folder

    subdir = config.hydra.get("output_subdir")
    names = [f"{config.hydra.job.name}.log"]
    if subdir:
        names += [str(subdir), *(f"{subdir}/{n}" for n in ("config.yaml", "hydra.yaml", "overrides.yaml"))]
    for name in names:
        what = folder.kind(run_dir / name, run_dir)
        if what == "link":
            raise folder.link_error(run_dir / name)


class Refused(BaseException):
    """Bad input that RunChecks found. Hydra turns an Exception of a callback into a warning and
    goes on to write the run's folder, so this is a BaseException; the symrun command shows its
    message as its one error line."""


class RunChecks(Callback):
    """Hydra callback of symrun's primary config. A run's folder and `.hydra/` are written by
    Hydra after `on_run_start`: there `symrun run` checks its config, data, model and output
    location, and takes the folder's lock (held until `on_run_end`), so bad input writes nothing."""

    def __init__(self) -> None:
        self._held: Optional[contextlib.ExitStack] = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from symrun.data import DataError
        from symrun.sweeping.results import OutputError

        try:
            self._check(config)
        except (ConfigError, DataError, OutputError) as e:
            raise Refused(str(e)) from None

    def _check(self, config: DictConfig) -> None:
        from hydra.core.hydra_config import HydraConfig

        from symrun.sweeping import launch, records, results, sweep

        if config.hydra.sweeper.get("suite"):
            raise ConfigError(f"experiment={config.hydra.runtime.choices.get('experiment')} is a suite of presets "
                              f"({', '.join(config.hydra.sweeper.suite)}): run it with symrun sweep")
        HydraConfig.instance().set_config(config)        # hydra.run.dir may read ${hydra:…}
        use_config_folders(config.hydra.runtime)
        folder = Path(str(config.hydra.run.dir))
        shape = Shape(drop_hydra(copy.deepcopy(config))).config
        sweep.check_shape(shape)
        if config.hydra.sweeper.get("params"):
            launch.display().note("symrun run trains the preset's base config only; symrun sweep runs its grid")
        results.check_writable(folder)
        records.check_folder(folder, [results.run_id(shape)])     # a folder received or written before
        _check_hydra_files(folder, config)
        self._held = contextlib.ExitStack()
        self._held.enter_context(results.sweep_lock(folder))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None
