"""What `symrun sweep` does once Hydra has parsed its command line (symrun's sweeper calls
`run_sweep`): plan the grid (symrun.sweep); for a dry run show the plan and stop; otherwise,
holding each sweep folder's lock, lay the folders out, hand every pack to the configured Hydra
launcher as one job, and tabulate.

What the user sees goes through a `Display`, which the symrun command sets (`use`); elsewhere
(a launcher's worker, a test) nothing is shown.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Protocol

if TYPE_CHECKING:        # torch and pandas wait for real work: `symrun run --cfg job` needs neither
    from symrun.composition import Composer
    from symrun.sweep import Plan

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"   # runs jobs in this process


class LaunchError(RuntimeError):
    """A job of the launcher ended without a result (killed, out of memory, node lost, refused)."""


class Display(Protocol):
    def note(self, text: str) -> None: ...
    def planned(self, plans: list[Plan]) -> None: ...
    def dry_run(self, plans: list[Plan]) -> None: ...
    def training(self, total: int, unit: str) -> ContextManager[Callable[[int], None]]: ...
    def report(self, sweep_dir: Path) -> None: ...


class Quiet:
    """Shows nothing (tables are written either way)."""

    def note(self, text: str) -> None:
        pass

    def planned(self, plans: list[Plan]) -> None:
        pass

    def dry_run(self, plans: list[Plan]) -> None:
        pass

    @contextlib.contextmanager
    def training(self, total: int, unit: str) -> Iterator[Callable[[int], None]]:
        yield lambda n: None

    def report(self, sweep_dir: Path) -> None:
        from symrun import results

        results.write_tables(sweep_dir)


_DISPLAY: list[Display] = [Quiet()]


def display() -> Display:
    return _DISPLAY[0]


def use(shown: Display) -> None:
    _DISPLAY[0] = shown


def run_sweep(comp: Composer, launcher: Any, arguments: list[str], dry_run: bool = False) -> list[Plan]:
    """Plan the sweep of `arguments` (the command line's task overrides) on the master config
    `comp` holds, then train it with `launcher`. Bad input raises (ConfigError, DataError,
    results.OutputError) before anything is written; a job that ends without a result raises
    LaunchError once every other job has ended and the tables are written."""
    from omegaconf import OmegaConf

    from symrun import results
    from symrun import sweep as sweep_mod

    folder = Path(os.path.abspath(str(comp.master.hydra.sweep.dir)))
    plans = sweep_mod.sweeper_plans(comp, arguments, folder)
    if dry_run:
        display().dry_run(plans)
        return plans
    suite = bool(comp.master.hydra.sweeper.get("suite"))
    with contextlib.ExitStack() as held:
        for p in plans:       # the lock file is the first thing written: check the location before it
            results.check_writable(p.sweep_dir)
            held.enter_context(results.sweep_lock(p.sweep_dir))
        plans = [sweep_mod.schedule(p) for p in plans]    # afresh: another sweep may have finished runs
        written = []
        for p in plans:
            results.remove_stale_temps(p.sweep_dir)
            written.append((p, sweep_mod.write_plan(p)))
        display().planned(plans)
        path = sweep_mod.write_launch(folder, written) if suite else written[0][1]
        k = int(path.parent.name)
        results.write_atomic(results.launch_config(folder, k), OmegaConf.to_yaml(comp.master))   # as Hydra's sweepers do
        jobs = [sweep_mod.job_overrides(p, i, folder, k, p.sweep_dir.name if suite else None)
                for p in plans for i in range(len(p.packs))]
        try:
            _launch(launcher, jobs, plans, in_process=comp.master.hydra.launcher._target_ == BASIC_LAUNCHER)
        except LaunchError as e:
            for p in plans:           # the runs that ended are on disk: tabulate them
                display().report(p.sweep_dir)
            raise LaunchError(f"{e}; other jobs may still run. See `symrun status {folder}`; rerun with "
                              f"hydra.sweep.dir={folder} to finish the {'suite' if suite else 'sweep'}") from None
        for p in plans:
            display().report(p.sweep_dir)
    return plans


def _launch(launcher: Any, jobs: list[list[str]], plans: list[Plan], in_process: bool) -> None:
    """Every job through the launcher, under a progress bar: steps when the jobs run in this
    process, ended runs (from their status files) when they run elsewhere."""
    from symrun import job, results

    if not jobs:
        return
    if in_process:
        with display().training(sum(p.steps for p in plans), "training steps (all packs)") as advance:
            job.ON_STEP = advance
            try:
                returns = launcher.launch(jobs, initial_job_idx=0)
            finally:
                job.ON_STEP = None
        for r in returns:
            _ = r.return_value         # a task's exception here is a bug: raise it as it is
        return
    with display().training(sum(len(pack) for p in plans for pack in p.packs), "runs ended") as advance:
        since = results.now()
        with _polling(lambda: sum(runs_done(p, since) for p in plans), advance):
            try:
                returns = launcher.launch(jobs, initial_job_idx=0)
            except Exception as e:  # noqa: BLE001 — a launcher gives up when a job dies without a result
                raise LaunchError(f"a job ended without a result ({type(e).__name__}: {_first_line(e)})") from e
    for r in returns:
        try:
            _ = r.return_value
        except Exception as e:  # noqa: BLE001
            raise LaunchError(f"a job failed ({type(e).__name__}: {_first_line(e)})") from e


@contextlib.contextmanager
def _polling(count: Callable[[], int], advance: Callable[[int], None]) -> Iterator[None]:
    """Advance the progress by `count()` (runs ended, from their files) every second, and at the end."""
    stop, seen = threading.Event(), [0]

    def update() -> None:
        now = count()
        advance(now - seen[0])
        seen[0] = now

    def poll() -> None:
        while not stop.wait(1.0):
            update()

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        update()


def runs_done(p: Plan, since: str) -> int:
    """How many of the plan's runs have ended since `since` (results.now()) — progress from afar."""
    from symrun import results

    ended = 0
    for rid in (r for pack in p.packs for r in pack):
        st = results.status(p.sweep_dir, rid) or {}
        ended += st.get("status") not in (None, results.RUNNING) and str(st.get("finished_at")) >= since
    return ended


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
