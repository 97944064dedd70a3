"""The `symrun` command: a thin Typer shell over Hydra and the library, rendered with rich.

`symrun sweep` and `symrun run` hand their command line to Hydra (symrun.sweeping.hydra_app), so every
Hydra flag and override works: a sweep is a Hydra multirun through symrun's sweeper plugin
(hydra_plugins/symrun_sweeper), `run` a Hydra run. The other commands read sweep folders.
Commands import torch, Hydra and pandas only when they run, so `symrun --help`, `--version` and
`symrun list` answer at once.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from symrun.console import console, err, error, warn_damaged

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="Experiments on how loss symmetries shape what networks learn. A sweep's grid is "
                       "trained as one batched model; results are tidy CSVs and phase diagrams.")
OVERRIDES = {"allow_extra_args": True, "ignore_unknown_options": True}
# Hydra reads --help/-h itself: symrun's help for the command, Hydra's flags, the config groups
HYDRA_COMMAND = {**OVERRIDES, "help_option_names": []}
OUTPUTS = typer.Option(None, "--outputs", help="Put results below this folder instead of outputs/.")
CONFIG_DIR = typer.Option(None, "--config-dir", "-cd", help="A folder of your own configs (as Hydra's --config-dir).")


def _fail(message: str) -> None:
    error(message)
    raise typer.Exit(2)


def _version(shown: bool) -> None:
    if shown:
        from symrun import __version__

        console.print(f"symrun {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show symrun's version and exit.")) -> None:
    pass


@app.command("sweep", context_settings=HYDRA_COMMAND)
def sweep_cmd(ctx: typer.Context, outputs: Optional[Path] = OUTPUTS,
              plan: bool = typer.Option(False, "--plan", "--dry-run",
                                        help="List the runs, packs, steps and cost; write nothing.")) -> None:
    """Run a grid (Hydra overrides and sweep syntax), e.g. `symrun sweep experiment=rescaling_sparsity
    seed='range(0,4)'`; every Hydra flag works (`symrun sweep --help` lists them and the config groups).
    hydra.sweep.dir=DIR resumes or extends the sweep in DIR, skipping finished runs."""
    _hydra("sweep", list(ctx.args), outputs, plan)


@app.command(context_settings=HYDRA_COMMAND)
def run(ctx: typer.Context, outputs: Optional[Path] = OUTPUTS) -> None:
    """Run one configuration, e.g. `symrun run model=mlp data=digits optim.weight_decay=1e-3`; every
    Hydra flag works (`symrun run --cfg job` prints the config, `--help` lists the groups)."""
    _hydra("run", list(ctx.args), outputs, False)


@app.command()
def report(sweep_dir: Path = typer.Argument(..., help="A sweep folder (outputs/<name>/<id>), or a folder holding "
                                                      "sweeps (a suite's)."),
           formats: Optional[str] = typer.Option(None, "--formats", help="Files each figure is written as, "
                                                 "comma-separated: png, pdf, svg (default: the runs' report.formats).")) -> None:
    """Rebuild runs.csv/results.csv from the run folders, draw the figures and learning curves,
    write report.md, print a summary."""
    from symrun.config import REPORT_FORMATS, ConfigError
    from symrun.console import show_report
    from symrun.data import DataError
    from symrun.sweeping.folder import OutputError

    chosen = None
    if formats is not None:
        chosen = tuple(dict.fromkeys(f.strip().lower() for f in formats.split(",") if f.strip()))
        if not chosen or any(f not in REPORT_FORMATS for f in chosen):
            _fail(f"--formats takes some of {', '.join(REPORT_FORMATS)}, comma-separated; got '{formats}'")
    for d in _sweeps(sweep_dir):
        try:
            show_report(d, chosen)
        except (ConfigError, DataError, OutputError) as e:
            _fail(str(e))


SWEEPS = typer.Argument(..., help="A sweep folder, or a folder holding sweeps (e.g. outputs).")


def _sweeps(where: Path) -> list[Path]:
    from symrun.sweeping import tables

    found = tables.find_sweeps(where)
    if not found:
        _fail(f"no sweep folders (with sweep.json and runs/) in {where}")
    return found


@app.command()
def status(where: Path = SWEEPS) -> None:
    """How many runs of each sweep are finished, running, interrupted (running, but their sweep
    stopped), failed, diverged, pending or damaged (a file that cannot be read back), from each run's
    folder, and why. Read-only; works while a sweep runs elsewhere."""
    from symrun.sweeping import results, tables

    states = [tables.sweep_status(d) for d in _sweeps(where)]
    for st in states:
        counts = ", ".join(f"{n} {s}" for s, n in st.counts.items())   # every state, in results' order
        console.print(f"{st.sweep_dir}\n  {sum(st.counts.values())} runs: {counts}", highlight=False, soft_wrap=True)
        for reason, ids in st.reasons.items():
            shown = ", ".join(ids[:3]) + (f", +{len(ids) - 3} more" if len(ids) > 3 else "")
            console.print(f"  {len(ids)} {reason}  [{shown}]", highlight=False, markup=False, soft_wrap=True)
        warn_damaged(st.problems)
    if any(st.counts.get(s) for st in states for s in (results.FAILED, results.INTERRUPTED, results.PENDING)):
        console.print("To finish a sweep: rerun it with hydra.sweep.dir=<its folder> (finished runs are skipped, "
                      "checkpointed packs resume). Logs: launches/<k>/packs/<i>/ and .submitit/ of the sweep "
                      "(of the suite's folder, for a suite's members).",
                      highlight=False, soft_wrap=True)


@app.command()
def collect(where: Path = SWEEPS) -> None:
    """Rebuild runs.csv and results.csv of each sweep from its run folders (e.g. after a partly
    failed sweep or while one runs on a cluster)."""
    from symrun.sweeping import results, tables

    for d in _sweeps(where):
        try:
            runs, res = tables.write_tables(d)
        except results.OutputError as e:
            _fail(str(e))
        counts = runs["status"].value_counts().to_dict() if not runs.empty else {}
        line = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no runs started"
        console.print(f"{d}: {line}; {len(res)} result rows → runs.csv, results.csv", highlight=False, soft_wrap=True)
        warn_damaged(tables.problems(d, runs))


@app.command(context_settings=OVERRIDES)
def check(ctx: typer.Context, config_dir: Optional[Path] = CONFIG_DIR,
          json_out: bool = typer.Option(False, "--json", help="Print the result as JSON instead of a table."),
          mirrors: int = typer.Option(8, "--mirrors", min=1, help="Mirrors tried per symmetry (random ones)."),
          discover: bool = typer.Option(False, "--discover", help="Print the mirrors that hold (declared or found: sign "
                                        "flips and swaps of each layer's units, rotations of adjacent linear maps) as "
                                        "YAML to paste into model.mirrors.")) -> None:
    """Verify numerically that the composed model has the mirror symmetries it declares, e.g.
    `symrun check model=mlp model.activation=relu`: loss invariance, Oᵀ∇L = 0 and a block-diagonal
    Hessian on the constraint set, at random parameters on a real batch, in float64; also tries
    mirrors the model did not declare. Exit status 1 when a declared mirror fails."""
    from symrun.analysis import check as check_mod
    from symrun.sweeping import sweep
    from symrun.config import ConfigError
    from symrun.console import show_check, show_discovered
    from symrun.data import DataError

    if config_dir is not None and not config_dir.is_dir():
        _fail(f"config folder {config_dir} does not exist")
    try:
        result = check_mod.run(sweep.compose_one(list(ctx.args), config_dir), mirrors=mirrors)
    except (ConfigError, DataError) as e:
        _fail(str(e))
    if json_out:
        console.print_json(data={**result.to_dict(), **({"mirrors": result.holding()} if discover else {})})
    elif discover:
        show_discovered(result)
    else:
        show_check(result)
    if not result.ok:
        raise typer.Exit(1)


@app.command("list", context_settings=OVERRIDES)
def list_cmd(ctx: typer.Context, config_dir: Optional[Path] = CONFIG_DIR) -> None:
    """Config groups and their options, experiment presets, launchers — symrun's and those of your
    own config folders (`-cd DIR`, `hydra.searchpath=[file://DIR]`), marked by origin."""
    from rich.markup import escape
    from rich.table import Table

    from symrun.sweeping.catalogue import BUILT_IN, catalogue, config_folders
    from symrun.config import CONFIG_DIR as BUILT_IN_DIR
    from symrun.config import ConfigError

    try:
        found = catalogue(config_folders(str(config_dir) if config_dir else None, list(ctx.args)))
    except ConfigError as e:
        _fail(str(e))
    mark = lambda name, origin: escape(name) if origin == BUILT_IN else f"{escape(name)} [cyan]({escape(origin)})[/cyan]"  # noqa: E731
    table = Table(title="config groups (choose with GROUP=OPTION)", title_justify="left")
    table.add_column("group")
    table.add_column("options (from a folder of yours: in brackets)")
    for group, options in found.items():
        table.add_row(group, ", ".join(mark(name, origin) for name, origin in options))
    console.print(table)
    presets = Table(title="experiment presets (symrun sweep experiment=NAME)", title_justify="left")
    for col in ("name", "from", "what it shows"):
        presets.add_column(col)
    for name, origin in found["experiment"]:
        path = (BUILT_IN_DIR if origin == BUILT_IN else Path(origin)) / "experiment" / f"{name}.yaml"
        lines = [ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#") and "@package" not in ln]
        presets.add_row(escape(name), escape(origin), escape(lines[0]) if lines else "")
    console.print(presets)
    console.print("Other keys: optim.{name,lr,momentum,weight_decay}, noise.{label_std,label_flip,temperature}, "
                  "symmetry.{remove,remove_std}, constraint.{kind,params,per,path,enforce} (with constraint=dcs), "
                  "train.{steps,log_every,dtype,checkpoint_every}, tasks.{count,change,shrink,perturb}, metrics.*, "
                  "seed, device, name, pack_size. "
                  "`symrun run --cfg job` prints every key with its value.")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def bench(ctx: typer.Context) -> None:
    """Time `symrun sweep` against a plain loop and torch.func as whole processes, then the engine alone (`symrun bench --help`)."""
    from symrun import bench as bench_mod
    from symrun.config import ConfigError

    try:
        bench_mod.main(list(ctx.args))
    except ConfigError as e:
        _fail(str(e))


def _hydra(command: str, args: list[str], outputs: Optional[Path], plan: bool) -> None:
    from symrun.sweeping import hydra_app

    try:
        hydra_app.run(command, args, outputs, plan)
    except hydra_app.CommandError as e:
        if e.code == 130:         # interrupted: the line says so, and how to resume
            err.print(escape(" ".join(str(e).split())), highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        error(str(e))
        raise typer.Exit(e.code) from None


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(argv if argv is not None else sys.argv[1:])
    if argv[:1] in (["-sc"], ["--shell-completion"]):     # symrun -sc install=bash, or a completion query
        from symrun.sweeping import hydra_app

        try:
            hydra_app.complete(argv) if any(a.startswith("query=") for a in argv) else hydra_app.run("sweep", argv)
        except hydra_app.CommandError as e:
            error(str(e))
            raise SystemExit(2) from None
        return
    app(args=argv, prog_name="symrun")


def entry() -> None:
    """The `symrun` program (its console script and `python -m symrun`): `main`, with the garbage
    collector tuned for a process that imports torch, pandas and matplotlib, then trains.

    - A young collection every 10,000 allocations rather than 700: importing those libraries makes
      ~10⁶ long-lived objects and little garbage, and the default thresholds walked them in
      ~600 young and 5 full collections, ~0.3 s of a sweep's start-up (2.0 → 1.7 s).
    - When it is done (returned, or exited with a status), it ends the process (`_end`).

    Not in `main`, which tests call in-process many times."""
    gc.set_threshold(10_000, 20, 20)
    try:
        main()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            _end(e.code or 0)
        raise
    _end(0)


def _end(status: int) -> None:
    """Exit with `status` as the interpreter would, less its tear-down: the atexit handlers run
    (logging's, multiprocessing's, …) and stdout and stderr are flushed, then the process ends
    (os._exit) without tearing down every module of torch, pandas and matplotlib one by one and
    collecting what they hold, 0.2–0.3 s of every symrun command (measured at the end of a
    sweep: 0.24–0.36 s from `main`'s end to the process's, 0.06–0.11 s so), for memory the OS
    takes back anyway. Files symrun writes are closed when written (symrun.sweeping.folder).
    While a thread other than this one and daemons still runs, or a profiler or tracer watches
    (cProfile, coverage: they write their results as the interpreter ends), it ends as usual:
    only its last collections are skipped, the objects left frozen out of the collector."""
    gc.freeze()
    if sys.getprofile() is not None or sys.gettrace() is not None or any(
            t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):     # a closed or broken pipe: nothing more to say
            stream.flush()
    os._exit(status)
