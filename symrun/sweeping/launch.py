"""What `symrun sweep` does once Hydra has parsed its command line (symrun's sweeper calls
`run_sweep`): plan the grid (symrun.sweeping.sweep); for a dry run show the plan and stop; otherwise,
holding each sweep folder's lock, lay the folders out, hand every pack to the configured Hydra
launcher as one job, and tabulate.

What the user sees goes through a `Display`, which the symrun command sets (`use`); elsewhere
(a launcher's worker, a test) nothing is shown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Optional, Protocol

if TYPE_CHECKING:        # torch and pandas wait for real work: `symrun run --cfg job` needs neither
    from symrun.sweeping.composition import Composer
    from symrun.sweeping.sweep import Plan

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"   # runs jobs in this process


class LaunchError(RuntimeError):
    """The sweep stopped before its runs ended: a job of the launcher ended without a result
    (killed, out of memory, node lost), the cluster refused the jobs, or the folder could not be
    written (a full disk). The message is one line that says how to go on."""


class RunsFailed(RuntimeError):
    """The sweep ended, and some of its runs failed (exit status 1); one line."""


class Interrupted(BaseException):
    """The user stopped the sweep (Ctrl-C; exit status 130). A BaseException, like the
    KeyboardInterrupt it stands for, so Hydra passes it through as it passes that."""


class Display(Protocol):
    def note(self, text: str) -> None: ...
    def planned(self, plans: list[Plan]) -> None: ...
    def dry_run(self, plans: list[Plan]) -> None: ...
    def training(self, total: int, unit: str) -> ContextManager[Callable[[int], None]]: ...
    def report(self, sweep_dir: Path) -> dict[str, str]:
        """Write (and show) the sweep's tables; each tabulated run's status, by run id."""


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

    def report(self, sweep_dir: Path) -> dict[str, str]:
        from symrun.sweeping import tables

        return tables.statuses(tables.write_tables(sweep_dir)[0])


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

    from symrun.sweeping.reporter import Reporter

    with contextlib.ExitStack() as held:
        # forked before torch and pandas are imported: the report's imports overlap the sweep's
        reporter = held.enter_context(Reporter()) if not dry_run else None
        from symrun.sweeping import records, results
        from symrun.sweeping import sweep as sweep_mod

        folder = Path(os.path.abspath(str(comp.master.hydra.sweep.dir)))
        plans = sweep_mod.sweeper_plans(comp, arguments, folder)
        if dry_run:
            display().dry_run(plans)
            return plans
        suite = bool(comp.master.hydra.sweeper.get("suite"))
        for p in plans:       # the lock file is the first thing written: check the location before it
            results.check_writable(p.sweep_dir)
            records.check_folder(p.sweep_dir, p.configs, folder if suite else None)
            held.enter_context(results.sweep_lock(p.sweep_dir))
        plans = [sweep_mod.schedule(p) for p in plans]    # afresh: another sweep may have finished runs
        written = []
        for p in plans:
            records.remove_stale_temps(p.sweep_dir)
            written.append((p, sweep_mod.write_plan(p)))
        display().planned(plans)
        path = sweep_mod.write_launch(folder, written) if suite else written[0][1]
        k = int(path.parent.name)
        results.write_atomic(results.launch_config(folder, k), OmegaConf.to_yaml(comp.master))   # as Hydra's sweepers do
        packs = [(p, i) for p in plans for i in range(len(p.packs))]
        jobs = [sweep_mod.job_overrides(p, i, folder, k, p.sweep_dir.name if suite else None) for p, i in packs]
        what = "suite" if suite else "sweep"
        in_process = comp.master.hydra.launcher._target_ == BASIC_LAUNCHER
        try:
            _launch(launcher, jobs, plans, in_process, packs)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted: the {what} in {folder} stopped; runs that finished are kept. To resume "
                              f"it, run the same command with hydra.sweep.dir={folder}") from None
        except Exception as e:  # noqa: BLE001 — said in one line below, or raised as it is (a bug)
            if (full := folder_error(e)) is not None:     # the folder cannot be written: it stays resumable
                raise LaunchError(f"{full} (then resume with hydra.sweep.dir={folder})") from None
            if in_process:
                raise
            if (refused := submission_error(e)) is not None:
                raise LaunchError(refused) from None
            for p in plans:           # the runs that ended are on disk: tabulate them
                reporter.report(p.sweep_dir)
            raise LaunchError(f"{_first_line(e)}; other jobs may still run. See `symrun status {folder}`; rerun "
                              f"with hydra.sweep.dir={folder} to finish the {what}") from None
        tabulated = []
        for p in plans:
            results.remove_empty_checkpoints(p.sweep_dir)      # every job has ended
            try:
                tabulated.append(reporter.report(p.sweep_dir))
            except results.OutputError as e:     # every run is recorded; only the tables or figures are missing
                raise LaunchError(f"{e} (every run is recorded: then `symrun report {folder}` writes the tables "
                                  "and figures)") from None
    # the grid's runs that failed, as the tables just read them from their folders
    failed = sum(shown.get(rid) == results.FAILED for p, shown in zip(plans, tabulated) for rid in p.configs)
    if failed:
        raise RunsFailed(f"{failed} of {sum(len(p.configs) for p in plans)} runs failed; `symrun status {folder}` says "
                         f"why. Fix the cause, then rerun with hydra.sweep.dir={folder} to train them again")
    return plans


def folder_error(e: BaseException) -> Optional[str]:
    """One line when training stopped because the results could not be written: symrun's own
    writes say so (OutputError); Hydra's job files fail with a bare OSError when the disk is full."""
    import errno

    from symrun.sweeping import results

    if isinstance(e, results.OutputError):
        return str(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the disk ({e.filename or 'writing the results'}): free some space"
    return None


# What a cluster's refusal (sbatch's message) is most likely about → the launcher key to change
_REFUSALS = {"gres": "gpus_per_node", "gpu": "gpus_per_node", "partition": "partition", "memory": "mem_gb",
             "time limit": "timeout_min", "cpu": "cpus_per_task", "qos": "qos", "account": "account"}


def submission_error(e: BaseException) -> Optional[str]:
    """One line when a launcher failed because the scheduler refused the submission (sbatch
    exited with an error: nothing was submitted), naming its message and the key to change."""
    import subprocess

    seen: Optional[BaseException] = e
    while seen is not None and not (isinstance(seen, subprocess.CalledProcessError) and "sbatch" in str(seen.cmd)):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    message = " ".join(str(seen.stderr or seen.output or seen).split())
    keys = list(dict.fromkeys(k for word, k in _REFUSALS.items() if word in message.lower()))
    keys = keys or ["partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min"]
    return (f"the cluster refused the jobs, nothing was submitted: {message}. Change the launcher's settings "
            f"({', '.join('hydra.launcher.' + k for k in keys)}) on the command line and run again")


def _launch(launcher: Any, jobs: list[list[str]], plans: list[Plan], in_process: bool,
            packs: list[tuple[Plan, int]]) -> None:
    """Every job through the launcher, under a progress bar: steps when the jobs run in this
    process (each job taking its pack's configs from the plan: job.PLANNED), ended runs (from
    their status files) when they run elsewhere. `packs`: each job's plan and pack number."""
    if not jobs:
        return
    with _short_job_lines(jobs, [len(p.packs[i]) for p, i in packs]):
        _launch_jobs(launcher, jobs, plans, in_process, packs)


def _launch_jobs(launcher: Any, jobs: list[list[str]], plans: list[Plan], in_process: bool,
                 packs: list[tuple[Plan, int]]) -> None:
    from symrun.sweeping import job, results

    if in_process:
        with display().training(sum(p.steps for p in plans), "training steps (all packs)") as advance:
            job.ON_STEP = advance
            finished = {p.sweep_dir: set(p.finished) for p in plans}
            planned = {job.task_overrides(overrides): (p.sweep_dir, i, list(p.packs[i]),
                                                       [p.configs[rid] for rid in p.packs[i]],
                                                       [rid for rid in p.packs[i] if rid not in finished[p.sweep_dir]])
                       for overrides, (p, i) in zip(jobs, packs)}
            # each job's overrides name its pack (+pack.index, +pack.member): two alike would
            # share an entry, so then every job builds its own configs
            job.PLANNED = planned if len(planned) == len(jobs) else {}
            try:
                returns = launcher.launch(jobs, initial_job_idx=0)
            finally:
                job.ON_STEP, job.PLANNED = None, {}
        for r in returns:
            _ = r.return_value         # a task's exception here is a bug: raise it as it is
        return
    if type(launcher).__module__.startswith("hydra_plugins.hydra_submitit_launcher"):
        from symrun.sweeping import slurm_watch

        slurm_watch.install()        # a job that ends without a result is seen to end, accounting or not
    with display().training(sum(len(pack) for p in plans for pack in p.packs), "runs ended") as advance:
        since = results.now()
        with _polling(lambda: sum(runs_done(p, since) for p in plans), advance):
            try:
                returns = launcher.launch(jobs, initial_job_idx=0)
            except Exception as e:  # noqa: BLE001 — a launcher gives up when a job dies without a result
                if folder_error(e) is not None or submission_error(e) is not None:
                    raise
                raise LaunchError(f"a job ended without a result ({type(e).__name__}: {_first_line(e)})") from e
    for r in returns:
        try:
            _ = r.return_value
        except Exception as e:  # noqa: BLE001
            if folder_error(e) is not None:
                raise
            raise LaunchError(f"a job failed ({type(e).__name__}: {_first_line(e)})") from e


@contextlib.contextmanager
def _short_job_lines(jobs: list[list[str]], runs: list[int]) -> Iterator[None]:
    """While the launcher runs, the line its log has for each job ("#3 : model=mlp …
    +pack.index=3 +pack.runs.seed='[0, 1, …]'": Hydra's launchers log one per job, each in its
    own module) shows each per-run list as its count of values, `+pack.runs.seed=<256 values>`.
    The lists are for the job to read; one of a 4,352-run pack is a 45 KB line on the terminal.
    `runs`: each job's pack size. Done as records are made, so it reaches every launcher's log."""
    short = {o: f"{o.split('=', 1)[0]}=<{n} values>" for overrides, n in zip(jobs, runs)
             for o in overrides if o.startswith("+pack.runs.")}
    make = logging.getLogRecordFactory()

    def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        made = make(*args, **kwargs)
        if isinstance(made.msg, str) and " +pack.runs." in made.msg and not made.args:
            head, *tails = made.msg.split(" +pack.runs.")     # the per-run lists come last in a job's overrides
            made.msg = " ".join([head, *(short.get("+pack.runs." + t, "+pack.runs." + t) for t in tails)])
        return made

    logging.setLogRecordFactory(record)
    try:
        yield
    finally:
        logging.setLogRecordFactory(make)


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
    from symrun.sweeping import records, results

    ended = 0
    for rid in (r for pack in p.packs for r in pack):
        st = records.read_run(p.sweep_dir, rid, config=False).info or {}
        ended += st.get("status") not in (None, results.RUNNING) and str(st.get("finished_at")) >= since
    return ended


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
