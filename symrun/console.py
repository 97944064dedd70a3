"""What the symrun command shows, with rich: the plan of a sweep (and its dry run), a progress
bar, a sweep's summary. symrun.sweeping.launch and symrun.sweeping.job call it through launch.Display; the
library below returns data and prints nothing.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

if TYPE_CHECKING:
    from symrun.analysis.report import Report

console = Console()
err = Console(stderr=True)
SHOWN_RUNS = 12          # a dry run lists this many runs of each sweep, then counts the rest


def error(message: str) -> None:
    """One line on stderr (library messages may quote multi-line errors: they are folded)."""
    # escaped: a message may hold brackets (pip install 'symrun[vision]') that rich reads as markup
    err.print(f"[bold red]error:[/bold red] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True)


class Shown:
    """launch.Display on the terminal."""

    def note(self, text: str) -> None:
        err.print(f"note: {escape(text)}", highlight=False, soft_wrap=True)

    def planned(self, plans) -> None:
        if len(plans) > 1:
            console.print(f"suite of {len(plans)} sweeps → {plans[0].sweep_dir.parent}", highlight=False)
        for p in plans:
            console.print(f"[bold]{escape(p.name)}[/bold]: {len(p.configs)} runs in {len(p.packs)} pack(s)"
                          + (f", {len(p.finished)} already finished" if p.finished else "")
                          + f" → {escape(str(p.sweep_dir))}", highlight=False, soft_wrap=True)

    def dry_run(self, plans) -> None:
        for p in plans:
            _show_plan(p)
        console.print("dry run: nothing was written", highlight=False)

    @contextlib.contextmanager
    def training(self, total: int, unit: str) -> Iterator[Callable[[int], None]]:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn()]
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(unit, total=total)
            yield lambda n: progress.advance(task, n)

    def report(self, sweep_dir: Path) -> dict[str, str]:
        from symrun.sweeping import tables

        return tables.statuses(show_report(sweep_dir).runs)


def _show_plan(p) -> None:
    """A sweep's plan: where, the grid, its packs, its runs, what is already done, what it costs."""
    from symrun.config import total_steps

    state = "resumes" if (p.sweep_dir / "sweep.json").is_file() else "new folder"
    console.print(f"[bold]{escape(p.name)}[/bold] → {escape(str(p.sweep_dir))} ({state})", highlight=False, soft_wrap=True)
    console.print(f"  {len(p.configs)} runs over {', '.join(p.swept) or 'no swept keys'}; {len(p.finished)} already "
                  f"finished, {len(p.configs) - len(p.finished)} to train in {len(p.packs)} pack(s)", highlight=False)
    packs = Table(box=None, padding=(0, 2), title_justify="left")
    for col in ("pack", "runs", "steps", "parameters/run", "state"):
        packs.add_column(col, justify="right")
    pack_steps = run_steps = 0
    for i, pack in enumerate(p.packs):
        cfg = p.configs[pack[0]]
        steps, size = total_steps(cfg), p.parameters.get(p.groups.get(pack[0], ""), 0)
        # parameters, gradients and up to two optimizer buffers per run, at the run's dtype
        state = 4 * size * len(pack) * (8 if cfg.train.dtype == "float64" else 4)
        packs.add_row(str(i), str(len(pack)), str(steps), f"{size:,}", _bytes(state))
        pack_steps, run_steps = pack_steps + steps, run_steps + steps * len(pack)
    if p.packs:
        console.print(packs)
    console.print(f"  cost: {pack_steps:,} pack-steps (a pack's runs step together), {run_steps:,} run-steps; "
                  "state = parameters, gradients and optimizer buffers", highlight=False, soft_wrap=True)
    runs = Table(box=None, padding=(0, 2))
    for col in ("run", *p.swept, "state"):
        runs.add_column(col)
    pack_of = {rid: i for i, pack in enumerate(p.packs) for rid in pack}
    done = set(p.finished)
    for rid in list(p.configs)[:SHOWN_RUNS]:
        values = _flat(p.configs[rid])
        runs.add_row(rid, *(str(values.get(k, "")) for k in p.swept),
                     "finished" if rid in done else f"pack {pack_of.get(rid, '?')}")
    console.print(runs)
    if len(p.configs) > SHOWN_RUNS:
        console.print(f"  … and {len(p.configs) - SHOWN_RUNS} more runs", highlight=False)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _flat(cfg) -> dict:
    from symrun.config import flatten, to_dict

    return flatten(to_dict(cfg))


def show_report(sweep_dir: Path, formats=None) -> "Report":
    """Rebuild a sweep's tables, figures and report.md, show its summary, and return the report."""
    from symrun.analysis import report as report_mod
    from symrun.sweeping import results

    rep = report_mod.build(sweep_dir, formats)
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
    console.print(f"report: {sweep_dir / 'report.md'}", highlight=False)
    if rep.unconverged:
        err.print(f"[yellow]warning:[/yellow] {len(rep.unconverged)} finished run(s) had not converged "
                  "(report.md lists them): train longer", highlight=False)
    warn_damaged(rep.problems)
    failed = {s: n for s, n in rep.status_counts.items() if s not in (results.FINISHED, results.DAMAGED)}
    if failed:
        err.print(f"[yellow]warning:[/yellow] {report_mod.status_line(failed)} (see runs/<run_id>/status.json)")
    return rep


def warn_damaged(problems: list[str]) -> None:
    """One line per file that cannot be read back (it names the file and what to do)."""
    for line in problems:
        err.print(f"[yellow]warning:[/yellow] {escape(' '.join(line.split()))}", highlight=False, soft_wrap=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "" if v != v else f"{v:.4g}"
    return str(v)


def show_check(result) -> None:
    """`symrun check`'s table of mirrors and verdicts."""
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


def show_discovered(result) -> None:
    """`symrun check --discover`: the mirrors that hold, as YAML for model.mirrors (on stdout,
    plain, so that it can be redirected into a config file); the failures as comments."""
    import yaml

    failed = [c.symmetry for c in result.checks if not c.holds]
    lines = [f"# mirrors of model={result.model} that hold to {result.tolerance:g} (symrun check --discover)"]
    lines += [f"# does not hold: {', '.join(failed)}"] if failed else []
    flow = [yaml.safe_dump(m, default_flow_style=True, sort_keys=False, width=10_000).strip() for m in result.holding()]
    lines += ["mirrors:" if flow else "mirrors: []"] + [f"- {m}" for m in flow]
    print("\n".join(lines))
