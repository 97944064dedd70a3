"""report.md: a sweep's report as a document — the commands that made it, the grid, the agreement
with theory, the figures, the summary over seeds, and the runs that failed, diverged or had not
converged. `symrun report DIR` rewrites it with the figures; the gallery (docs/results.md) is
these documents put together (`render` with its own links), never a second way of writing them.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from symrun.analysis import curves, notation
from symrun.sweeping import records, results

NAME = "report.md"
SECTIONS = ("Commands", "Grid", "Agreement with theory", "Figures", "Summary", "Runs to look at")


def write(sweep_dir: Path, rep) -> Path:
    """Write report.md into the sweep folder (through symrun.sweeping.folder, like every other file)."""
    path = Path(sweep_dir) / NAME
    results.write_atomic(path, render(sweep_dir, rep) + "\n", sweep_dir)
    return path


def render(sweep_dir: Path, rep, link: Optional[Callable[[Path], Optional[str]]] = None, level: int = 1) -> str:
    """The document, headings from `level` (# for 1). `link(figure)`: the path a figure is linked
    by, None to name it without a link (default: relative to the sweep folder)."""
    from symrun.analysis import report

    link = link or (lambda p: p.relative_to(sweep_dir).as_posix())
    h = "#" * level
    info = records.read_sweep(sweep_dir)[0]
    out = [f"{h} {info.get('name') or Path(sweep_dir).parent.name}", ""]
    out += [f"{h}# Commands", "", "```bash"]
    out += [_command(launch) for launch in info.get("launches", []) if isinstance(launch, dict)] or ["# (not recorded)"]
    out += ["```", "", f"{h}# Grid", "", *_grid(rep), ""]
    agreement = [f"- {line}" for line in report.theory_agreement(sweep_dir)]
    contrast = report.removal_contrast(sweep_dir)
    if contrast:
        agreement.append("- Symmetry removal, the final value's range over the grid (means over seeds): "
                         + "; ".join(contrast) + ".")
    out += [f"{h}# Agreement with theory", ""]
    out += agreement or ["No closed form applies to this grid (docs/theory.md §5)."]
    out += ["", f"{h}# Figures", "", *_figures(rep, link), f"{h}# Summary", "",
            "Final values, mean ± s.d. over seeds per grid point"
            + (" (`not converged`: runs still moving at the end, see below)." if rep.unconverged else "."), "",
            markdown_table(rep.summary), "", f"{h}# Runs to look at", "", *_problems(rep)]
    return "\n".join(out).rstrip()


def _command(launch: dict) -> str:
    args = " ".join(shlex.quote(str(o)) for o in launch.get("overrides", []))
    return f"symrun sweep {args}".rstrip() + f"    # {launch.get('at', '')}: {launch.get('runs', '?')} runs"


def _grid(rep) -> list[str]:
    runs = rep.runs
    lines = [f"{len(runs)} runs ({_counts(rep.status_counts)})."]
    for key in reversed(rep.axes):             # the x axis first
        values = sorted(runs[key].dropna().unique().tolist(), key=str if runs[key].dtype == object else None)
        shown = ", ".join(notation.value(v) for v in values) + (", null" if runs[key].isna().any() else "")
        lines.append(f"- {notation.axis(key)} (`{key}`): {shown}")
    if "seed" in runs and not runs.empty:
        lines.append(f"- seeds (pooled: mean ± s.d.): {', '.join(map(str, sorted(runs['seed'].unique())))}")
    return lines


def _counts(counts: dict) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"


def _figures(rep, link) -> list[str]:
    """Images inline (a format a browser shows), the same figure's other formats linked after it;
    figures `link` leaves out are named at the end."""
    out, by_stem, unlinked = [], {}, []
    for f in rep.figures:
        by_stem.setdefault(f.with_suffix("").as_posix(), []).append(f)
    for files in by_stem.values():
        shown = next((f for f in files if f.suffix in (".png", ".svg")), None)
        target = link(shown) if shown is not None else None
        if target is not None:
            out += [f"![{shown.stem}]({target})", ""]
        others = [f"[{f.suffix[1:]}]({link(f)})" for f in files if f is not shown and link(f) is not None]
        if others:
            out += [f"{files[0].stem}: " + " · ".join(others), ""]
        elif target is None:
            unlinked.append(f"`{files[0].name}`")
    if unlinked:
        out += ["Also drawn, in the sweep folder: " + ", ".join(unlinked) + ".", ""]
    return out or ["No figure: the grid has no finished run, or more than two axes (see the summary).", ""]


def _problems(rep) -> list[str]:
    runs, out = rep.runs, []
    listed = ((results.FAILED, "failed"), (results.DIVERGED, "diverged"), (results.RUNNING, "interrupted"))
    where = {}
    if "run_id" in runs:         # the settings of the runs listed below only: a row at a time is slow over thousands
        named = set(rep.unconverged)
        if "status" in runs:
            named |= set(runs.loc[runs["status"].isin([status for status, _ in listed]), "run_id"])
        keys = [*rep.axes, "seed"]
        where = {row["run_id"]: " (" + notation.settings(keys, [row.get(k) for k in keys]) + ")"
                 for _, row in runs[runs["run_id"].isin(named)].iterrows()}
    for status, what in listed:
        part = runs[runs["status"] == status] if "status" in runs else runs.iloc[:0]
        for _, row in part.iterrows():
            why = ""
            if status == results.DIVERGED and pd.notna(row.get("diverged_at")):
                why = f" at step {int(row['diverged_at'])}"
            elif pd.notna(row.get("error")) and str(row.get("error")):
                why = ": " + " ".join(str(row["error"]).split())[:200]
            out.append(f"- `{row['run_id']}`{where.get(row['run_id'], '')} {what}{why}")
    for rid, moving in rep.unconverged.items():
        out.append(f"- `{rid}`{where.get(rid, '')} had not converged: {', '.join(moving)} still moved by more than "
                   f"{curves.CONVERGENCE_TOL:.0%} (of its final value or of its range over the run) in the last "
                   f"{curves.CONVERGENCE_TAIL:.0%} of its steps (docs/theory.md §4): train longer, or see in "
                   f"curves_{moving[0]} whether it is noise fluctuating at stationarity")
    out += [f"- {line}" for line in rep.problems]
    return out or ["None: every run finished, and every run judged had converged."]


def markdown_table(summary: pd.DataFrame) -> str:
    """mean ± std columns as one markdown table, settings headed by their symbol (λ, σ, …)."""
    if summary.empty:
        return ""
    cols = [c for c in summary.columns if not c.endswith(" std")]
    head = [notation.symbol(c) if c in notation.SETTINGS else c.removesuffix(" mean") for c in cols]
    rows = []
    for _, row in summary.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if c.endswith(" mean"):
                std = row.get(c.replace(" mean", " std"))
                cell = "" if v != v else f"{v:.4g}" + (f" ± {std:.1g}" if std is not None and std == std else "")
            else:
                cell = notation.value(v)
            cells.append(cell)
        rows.append(cells)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
