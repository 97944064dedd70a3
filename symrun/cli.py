"""The `symrun` command: a thin Typer shell over symrun.sweep and symrun.report, rendered with rich.

Commands import torch, Hydra and pandas (through symrun.sweep and symrun.report) only when they
run, so `symrun --help` and `symrun list` answer at once.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from symrun import sweep

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="Experiments on how loss symmetries shape what networks learn. A sweep's grid is "
                       "trained as one batched model; results are tidy CSVs and phase diagrams.")
console = Console()
err = Console(stderr=True)
HYDRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
OUTPUTS = typer.Option(Path("outputs"), "--outputs", help="Root folder for results.")


def _fail(message: str) -> None:
    """One line on stderr (library messages may quote multi-line errors: they are folded), exit 2."""
    # escaped: a message may hold brackets (pip install 'symrun[vision]') that rich reads as markup
    err.print(f"[bold red]error:[/bold red] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _wants_cfg(args: list[str]) -> tuple[list[str], bool]:
    """Strip Hydra's `--cfg job` (or `-c job`): print the composed config instead of running."""
    out, show, skip = [], False, False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        if a in ("--cfg", "-c"):
            show, skip = True, i + 1 < len(args) and args[i + 1] in ("job", "all", "hydra")
        elif a in ("-m", "--multirun"):
            continue
        else:
            out.append(a)
    return out, show


@app.command("sweep", context_settings=HYDRA_ARGS)
def sweep_cmd(ctx: typer.Context, outputs: Path = OUTPUTS) -> None:
    """Run a grid: Hydra overrides and sweep syntax, e.g.
    `symrun sweep experiment=rescaling_sparsity optim.weight_decay=0,1e-3,1e-2 seed='range(0,4)'`.
    Hydra keys pass through (`hydra/launcher=joblib`, `hydra.sweep.dir=DIR` to resume a sweep
    in DIR, skipping finished runs). `--cfg job` prints the composed config and the grid."""
    _execute(list(ctx.args), outputs, single=False)


@app.command(context_settings=HYDRA_ARGS)
def run(ctx: typer.Context, outputs: Path = OUTPUTS) -> None:
    """Run one configuration, e.g. `symrun run model=mlp data=digits optim.weight_decay=1e-3`.
    `--cfg job` prints the composed config."""
    _execute(list(ctx.args), outputs, single=True)


def _execute(args: list[str], outputs: Path, single: bool) -> None:
    from omegaconf import OmegaConf

    from symrun import records, results, sweep
    from symrun.config import ConfigError, to_dict
    from symrun.data import DataError

    args, show = _wants_cfg(args)
    run_args, hydra_args = sweep.split_args(args)
    where = sweep.sweep_dir_from(hydra_args)
    try:
        plans = ([sweep.plan(run_args, outputs, where, single=True, hydra_args=tuple(hydra_args))] if single
                 else sweep.plans(run_args, outputs, where, hydra_args=tuple(hydra_args)))
    except (ConfigError, DataError, results.OutputError) as e:
        _fail(str(e))
    if show:
        for plan in plans:
            first = next(iter(plan.configs.values()))
            console.print(OmegaConf.to_yaml(to_dict(first)), end="", highlight=False)
            if plan.swept:
                console.print(f"# grid: {len(plan.configs)} runs over {', '.join(plan.swept)}")
        return
    if single and any(a.startswith("experiment=") for a in run_args):
        err.print("note: symrun run trains the preset's base config only; symrun sweep runs its grid", soft_wrap=True)
    if len(plans) > 1:
        console.print(f"suite of {len(plans)} sweeps → {plans[0].sweep_dir.parent}", highlight=False)
    suite = plans[0].sweep_dir.parent if len(plans) > 1 else None
    with contextlib.ExitStack() as held:
        for plan in plans:
            try:   # the lock file is the first thing written, so check the location before it
                results.check_writable(plan.sweep_dir)
                records.check_folder(plan.sweep_dir, plan.configs, suite)
                held.enter_context(results.sweep_lock(plan.sweep_dir))
            except results.OutputError as e:
                _fail(str(e))
        _launch([sweep.schedule(p) for p in plans], hydra_args, single)


def _launch(plans: list[sweep.Plan], hydra_args: list[str], single: bool) -> None:
    """Holding the sweeps' locks: clear what a killed sweep left half-written, lay out, train
    (a suite's members in one launch, so a cluster runs them at once), report."""
    from symrun import records, results, sweep

    paths = []
    for plan in plans:
        records.remove_stale_temps(plan.sweep_dir)
        paths.append(sweep.write_plan(plan))
        console.print(f"[bold]{plan.name}[/bold]: {len(plan.configs)} runs in {len(plan.packs)} pack(s)"
                      + (f", {len(plan.finished)} already finished" if plan.finished else "")
                      + f" → {plan.sweep_dir}", highlight=False)
    suite = len(plans) > 1
    where = plans[0].sweep_dir.parent if suite else plans[0].sweep_dir
    what = "suite" if suite else "sweep"
    launch_path = sweep.write_launch(where, list(zip(plans, paths))) if suite else paths[0]
    try:
        _train(plans, launch_path, hydra_args, single)
    except KeyboardInterrupt:
        err.print(f"interrupted: the {what} in {where} stopped; runs that finished are kept. To resume it, run the "
                  f"same command with hydra.sweep.dir={where}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001
        if (full := _folder_error(e)) is not None:   # the folder cannot be written (a full disk): it stays resumable
            _fail(f"{full} (then resume with hydra.sweep.dir={where})")
        if single or sweep.in_process(hydra_args):
            raise
        if (refused := _submission_error(e)) is not None:
            _fail(refused)
        # A launcher gives up when a job dies without a result (killed, out of memory, node lost);
        # the runs that ended are on disk: tabulate them and say how to finish the rest.
        for plan in plans:
            _show_report(plan.sweep_dir)
        _fail(f"a job ended without a result ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
              f"other jobs may still run. See `symrun status {where}`; rerun with "
              f"hydra.sweep.dir={where} to finish the {what}")
    for plan in plans:
        try:
            _show_report(plan.sweep_dir)
        except results.OutputError as e:     # every run is recorded; only the tables or figures are missing
            _fail(f"{e} (every run is recorded: then `symrun report {where}` writes the tables and figures)")
    failed = sum(records.read_run(p.sweep_dir, rid, config=False).status == results.FAILED
                 for p in plans for rid in p.configs)
    if failed:
        err.print(f"[bold red]error:[/bold red] {failed} of {sum(len(p.configs) for p in plans)} runs failed; "
                  f"`symrun status {where}` says why. Fix the cause, then rerun with hydra.sweep.dir={where} to "
                  "train them again", highlight=False, soft_wrap=True)
        raise typer.Exit(1)


def _folder_error(e: BaseException) -> Optional[str]:
    """One line when training stopped because the results could not be written: symrun's own
    writes say so (OutputError); Hydra's job files fail with a bare OSError when the disk is full."""
    import errno

    from symrun import results

    if isinstance(e, results.OutputError):
        return str(e)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the disk ({e.filename or 'writing the results'}): free some space"
    return None


# What a cluster's refusal (sbatch's message) is most likely about → the launcher key to change
_REFUSALS = {"gres": "gpus_per_node", "gpu": "gpus_per_node", "partition": "partition", "memory": "mem_gb",
             "time limit": "timeout_min", "cpu": "cpus_per_task", "qos": "qos", "account": "account"}


def _submission_error(e: BaseException) -> Optional[str]:
    """One line when a launcher failed because the scheduler refused the submission (sbatch
    exited with an error: nothing was submitted), naming its message and the key to change."""
    import subprocess

    seen = e
    while seen is not None and not (isinstance(seen, subprocess.CalledProcessError) and "sbatch" in str(seen.cmd)):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    message = " ".join(str(seen.stderr or seen.output or seen).split())
    keys = list(dict.fromkeys(k for word, k in _REFUSALS.items() if word in message.lower()))
    keys = keys or ["partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min"]
    return (f"the cluster refused the jobs, nothing was submitted: {message}. Change the launcher's settings "
            f"({', '.join('hydra.launcher.' + k for k in keys)}) on the command line and run again")


def _train(plans: list[sweep.Plan], launch_path: Path, hydra_args: list[str], single: bool) -> None:
    """Train every pack of the plans (written to `launch_path`) under a progress bar: steps when
    they run in this process, ended runs (from their status files) when a launcher runs them
    elsewhere."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from symrun import sweep

    packs = sum(len(p.packs) for p in plans)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        if single or sweep.in_process(hydra_args):
            task = progress.add_task("training steps (all packs)", total=sum(p.steps for p in plans))
            on_step = lambda n: progress.advance(task, n)  # noqa: E731
            if single:
                for i in range(packs):
                    sweep.run_pack(launch_path, i, on_step=on_step)
            else:
                sweep.launch(launch_path, packs, hydra_args, on_step=on_step)
            return
        task = progress.add_task("runs ended", total=sum(len(pack) for p in plans for pack in p.packs))
        ended = lambda: sum(sweep.runs_done(p) for p in plans)  # noqa: E731
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(1.0):
                progress.update(task, completed=ended())

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        try:
            sweep.launch(launch_path, packs, hydra_args)
        finally:
            stop.set()
            watcher.join()
            progress.update(task, completed=ended())


@app.command()
def report(sweep_dir: Path = typer.Argument(..., help="A sweep folder (outputs/<name>/<id>), or a folder holding "
                                                      "sweeps (a suite's).")) -> None:
    """Rebuild runs.csv/results.csv from the run folders, draw the phase diagrams, print a summary."""
    from symrun.config import ConfigError
    from symrun.data import DataError
    from symrun.folder import OutputError

    for d in _sweeps(sweep_dir):
        try:
            _show_report(d)
        except (ConfigError, DataError, OutputError) as e:
            _fail(str(e))


def _show_report(sweep_dir: Path) -> None:
    from symrun import report as report_mod
    from symrun import results

    rep = report_mod.build(sweep_dir)
    if not rep.summary.empty:
        table = Table(title=f"summary (mean ± std over seeds) — {sweep_dir}", title_justify="left")
        cols = [c for c in rep.summary.columns if not c.endswith(" std")]
        for col in cols:
            table.add_column(col.removesuffix(" mean"), justify="right")
        for _, row in rep.summary.iterrows():
            cells = []
            for col in cols:
                std = row.get(col.replace(" mean", " std")) if col.endswith(" mean") else None
                cells.append(_fmt(row[col]) + (f" ± {std:.1g}" if std is not None and std == std else ""))
            table.add_row(*cells)
        console.print(table)
    console.print(f"runs: {report_mod.status_line(rep.status_counts) or 'none'}")
    console.print(f"tables: {sweep_dir / 'runs.csv'}, {sweep_dir / 'results.csv'}", highlight=False)
    for fig in rep.figures:
        console.print(f"figure: {fig}", highlight=False)
    _warn_damaged(rep.problems)
    failed = {s: n for s, n in rep.status_counts.items() if s not in (results.FINISHED, results.DAMAGED)}
    if failed:
        err.print(f"[yellow]warning:[/yellow] {report_mod.status_line(failed)} (see runs/<run_id>/status.json)")


def _warn_damaged(problems: list[str]) -> None:
    """One line per file that cannot be read back (it names the file and what to do)."""
    for line in problems:
        err.print(f"[yellow]warning:[/yellow] {escape(' '.join(line.split()))}", highlight=False, soft_wrap=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if v != v else f"{v:.4g}"
    return str(v)


SWEEPS = typer.Argument(..., help="A sweep folder, or a folder holding sweeps (e.g. outputs).")


def _sweeps(where: Path) -> list[Path]:
    from symrun import tables

    found = tables.find_sweeps(where)
    if not found:
        _fail(f"no sweep folders (with sweep.json and runs/) in {where}")
    return found


@app.command()
def status(where: Path = SWEEPS) -> None:
    """How many runs of each sweep are finished, running, interrupted (running, but their sweep
    stopped), failed, diverged, pending or damaged (a file that cannot be read back), from each run's
    folder, and why. Read-only; works while a sweep runs elsewhere."""
    from symrun import results, tables

    states = [tables.sweep_status(d) for d in _sweeps(where)]
    for st in states:
        counts = ", ".join(f"{n} {s}" for s, n in st.counts.items())   # every state, in results' order
        console.print(f"{st.sweep_dir}\n  {sum(st.counts.values())} runs: {counts}", highlight=False, soft_wrap=True)
        for reason, ids in st.reasons.items():
            shown = ", ".join(ids[:3]) + (f", +{len(ids) - 3} more" if len(ids) > 3 else "")
            console.print(f"  {len(ids)} {reason}  [{shown}]", highlight=False, markup=False, soft_wrap=True)
        _warn_damaged(st.problems)
    if any(st.counts.get(s) for st in states for s in (results.FAILED, results.INTERRUPTED, results.PENDING)):
        console.print("To finish a sweep: rerun it with hydra.sweep.dir=<its folder> (finished runs are skipped, "
                      "checkpointed packs resume). Logs: launches/<k>/packs/<i>/ and launches/<k>/.submitit/ of the "
                      "sweep (of the suite's folder, for a suite's members).",
                      highlight=False, soft_wrap=True)


@app.command()
def collect(where: Path = SWEEPS) -> None:
    """Rebuild runs.csv and results.csv of each sweep from its run folders (e.g. after a partly
    failed sweep or while one runs on a cluster)."""
    from symrun import results, tables

    for d in _sweeps(where):
        try:
            runs, res = tables.write_tables(d)
        except results.OutputError as e:
            _fail(str(e))
        counts = runs["status"].value_counts().to_dict() if not runs.empty else {}
        line = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no runs started"
        console.print(f"{d}: {line}; {len(res)} result rows → runs.csv, results.csv", highlight=False, soft_wrap=True)
        _warn_damaged(tables.problems(d, runs))


@app.command(context_settings=HYDRA_ARGS)
def check(ctx: typer.Context,
          json_out: bool = typer.Option(False, "--json", help="Print the result as JSON instead of a table."),
          mirrors: int = typer.Option(8, "--mirrors", min=1, help="Mirrors tried per symmetry (random ones).")) -> None:
    """Verify numerically that the composed model has the mirror symmetries it declares, e.g.
    `symrun check model=mlp model.activation=relu`: loss invariance, Oᵀ∇L = 0 and a block-diagonal
    Hessian on the constraint set, at random parameters on a real batch, in float64; also tries
    mirrors the model did not declare. Exit status 1 when a declared mirror fails."""
    from symrun import check as check_mod
    from symrun import sweep
    from symrun.config import ConfigError
    from symrun.data import DataError

    try:
        result = check_mod.run(sweep.compose_one(list(ctx.args)), mirrors=mirrors)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    if json_out:
        console.print_json(data=result.to_dict())
    else:
        _show_check(result)
    if not result.ok:
        raise typer.Exit(1)


def _show_check(result) -> None:
    from rich import box

    table = Table(title=f"mirror symmetries of model={result.model} (float64, batch of {result.batch}, "
                        f"relative tolerance {result.tolerance:g})", title_justify="left", box=box.SIMPLE_HEAD,
                  padding=(0, 1, 0, 0), pad_edge=False)
    for col in ("symmetry", "kind", "decl.", "tried", "ΔL", "Oᵀ∇L", "OᵀHv", "verdict"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("symmetry", "kind", "verdict") else "right")
    fmt = lambda v: "—" if v is None else f"{v:.0e}"  # noqa: E731
    for c in result.checks:
        if c.declared:
            verdict = "[green]holds[/green]" if c.holds else "[bold red]FAILS[/bold red]"
        else:
            verdict = "[yellow]holds†[/yellow]" if c.holds else "no"
        table.add_row(c.symmetry, c.kind, "yes" if c.declared else "no", f"{c.mirrors}/{c.of}",
                      fmt(c.invariance), fmt(c.gradient), fmt(c.hessian), verdict)
    console.print(table)
    console.print("ΔL = max |L(ρ) − L(Rρ)|/max(1,|L|); at ρ₀ = (I − OOᵀ)ρ on the constraint set: Oᵀ∇L = max "
                  "‖Oᵀ∇L‖/‖∇L‖, OᵀHv = max ‖OᵀH(I − OOᵀ)v‖/‖H(I − OOᵀ)v‖ (random v). decl. no = a candidate "
                  "the model does not declare; † = it holds anyway.", highlight=False)
    if not result.checks:
        console.print("this model declares no mirrors and has no candidates to try")
    console.print("all declared mirrors hold" if result.ok else "[bold red]a declared mirror fails[/bold red]")


@app.command("list")
def list_cmd() -> None:
    """Config groups and their options, experiment presets, launchers."""
    from symrun.config import CONFIG_DIR, DATA_OPTIONS, MODEL_OPTIONS

    table = Table(title="config groups (choose with GROUP=OPTION)", title_justify="left")
    table.add_column("group")
    table.add_column("options")
    table.add_row("model", ", ".join(sorted(MODEL_OPTIONS)))
    table.add_row("data", ", ".join(sorted(DATA_OPTIONS)))
    table.add_row("constraint", "none, dcs")
    table.add_row("experiment", ", ".join(sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))))
    table.add_row("hydra/launcher", ", ".join(_launchers(CONFIG_DIR)))
    console.print(table)
    presets = Table(title="experiment presets (symrun sweep experiment=NAME)", title_justify="left")
    presets.add_column("name")
    presets.add_column("what it shows")
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        lines = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#") and "@package" not in ln]
        presets.add_row(path.stem, lines[0] if lines else "")
    console.print(presets)
    console.print("Other keys: optim.{name,lr,momentum,weight_decay}, noise.{label_std,label_flip,temperature}, "
                  "symmetry.{remove,remove_std}, constraint.{kind,params,per,path} (with constraint=dcs), "
                  "train.{steps,log_every,dtype,checkpoint_every}, tasks.{count,change,shrink,perturb}, metrics.*, "
                  "seed, device, name, pack_size. "
                  "`symrun run --cfg job` prints every key with its value.")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def bench(ctx: typer.Context) -> None:
    """Time the packed engine against one nn.Module + torch.optim loop per run (`symrun bench --help`)."""
    from symrun import bench as bench_mod
    from symrun.config import ConfigError

    try:
        bench_mod.main(list(ctx.args))
    except ConfigError as e:
        _fail(str(e))


# Hydra launcher plugins and the options they register, found without importing Hydra
_LAUNCHER_PLUGINS = {"hydra_plugins.hydra_joblib_launcher": ["joblib"],
                     "hydra_plugins.hydra_submitit_launcher": ["submitit_local", "submitit_slurm"]}


def _launchers(config_dir: Path) -> list[str]:
    """`basic` (Hydra's own), the installed plugins' options, and symrun's configs/hydra/launcher/."""
    import importlib.util

    names = ["basic"]
    for module, options in _LAUNCHER_PLUGINS.items():
        try:
            if importlib.util.find_spec(module) is not None:
                names += options
        except ImportError:
            pass
    names += sorted(p.stem for p in (config_dir / "hydra" / "launcher").glob("*.yaml"))
    return names


def main(argv: Optional[list[str]] = None) -> None:
    app(args=argv if argv is not None else sys.argv[1:], prog_name="symrun")

