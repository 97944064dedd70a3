"""What results.csv says over time: learning curves (a metric against the step, one line per grid
point), the per-task curves of a task sequence, and whether a run had converged when it stopped.

Not converged (docs/theory.md §4): a run whose train loss or a headline metric still moved, over
the last tenth of its logged steps (from the last row before that tenth on), by more than
CONVERGENCE_TOL of the smaller of its final magnitude and the range it spans over the whole run
(a loss still falling from 0.06 to 0.03 is moving, though it fell from 1 before). A run with too
few rows to tell (nothing logged between its start and its last tenth) is not judged; a run with
gradient noise is judged on its headline metrics alone (its loss fluctuates at stationarity).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from symrun.analysis import figures, notation
from symrun.sweeping import results

CONVERGENCE_TAIL = 0.1
CONVERGENCE_TOL = 0.05
CURVES_STEPS_MIN = 3        # logged steps a curve needs: with only the first and the last, it is a line between the
                            # numbers the phase diagrams already show (train.log_every = train.steps)
CURVES_MAX = 12            # more grid points than this in one panel: coloured by the x value, with a colour bar
PANELS_MAX = 4


def still_moving(rows: pd.DataFrame, quantities: list[str]) -> Optional[list[str]]:
    """The quantities of one run's rows (sorted by step) that moved in the last tenth: [] when
    converged, None when there are too few rows to tell. A task sequence is judged on its last task."""
    if "task" in rows and rows["task"].notna().any():
        rows = rows[rows["task"] == rows["task"].max()]
    steps = rows["step"].to_numpy()
    if len(steps) < 2:
        return None
    start = int(np.searchsorted(steps, steps[-1] - CONVERGENCE_TAIL * (steps[-1] - steps[0]))) - 1
    if start <= 0 and steps[0] == 0:         # the tail reaches back to the initialisation
        return None
    tail = rows.iloc[max(start, 0):]
    moving = []
    for q in quantities:
        whole, last = rows[q].dropna(), tail[q].dropna()
        if len(last) < 2:
            continue
        scale = min(whole.max() - whole.min(), abs(last.iloc[-1]))
        if last.max() - last.min() > CONVERGENCE_TOL * scale and whole.max() > whole.min():
            moving.append(q)
    return moving


NOISE = ("noise.label_std", "noise.label_flip", "noise.temperature")


def noisy(runs: pd.DataFrame) -> pd.Series:
    """Runs trained with gradient noise (minibatches, label noise, Langevin): their train loss
    fluctuates at stationarity, so only their headline metrics are judged."""
    flags = runs["data.batch_size"].notna() if "data.batch_size" in runs else pd.Series(False, index=runs.index)
    for key in NOISE:
        if key in runs:
            flags |= runs[key].fillna(0) > 0
    return flags


def unconverged(table: pd.DataFrame, runs: pd.DataFrame, metrics: list[str]) -> dict[str, list[str]]:
    """run_id → what still moved, for the finished runs that had not converged."""
    done = runs[runs["status"] == results.FINISHED]
    quiet = set(done.loc[~noisy(done), "run_id"])
    quantities = [q for q in dict.fromkeys(["train_loss", *metrics]) if q in table]
    out = {}
    for rid, rows in table[table["run_id"].isin(set(done["run_id"]))].groupby("run_id", sort=False):
        moving = still_moving(_by_step(rows), [q for q in quantities if q != "train_loss" or rid in quiet])
        if moving:
            out[rid] = moving
    return out


def _by_step(rows: pd.DataFrame) -> pd.DataFrame:
    """A run's rows sorted by step: as they are when their steps already increase, as results.csv
    holds them (a sort is ~0.1 ms a run, most of judging one)."""
    steps = rows["step"].to_numpy()
    return rows if steps.dtype.kind in "iuf" and (steps[1:] > steps[:-1]).all() else rows.sort_values("step")


def learning_curves(sweep_dir: Path, table: pd.DataFrame, runs: pd.DataFrame, axes: list[str], metric: str, *,
                    formats, title: str) -> list[Path]:
    """metric against step, mean over seeds per grid point; one panel per value of the shorter
    axis (two axes, at most PANELS_MAX values shown), lines coloured by the longer one. Task
    switches are drawn as vertical lines."""
    keep = runs.loc[runs["status"] == results.FINISHED, ["run_id", *axes]]
    rows = table[["run_id", "step", metric]].dropna().merge(keep, on="run_id")
    if rows.empty or rows["step"].nunique() < CURVES_STEPS_MIN:
        return []
    facet = axes[0] if len(axes) == 2 else None
    line = axes[-1] if axes else None
    panels = [(None, rows)] if facet is None else list(rows.groupby(facet, dropna=False))
    if len(panels) > PANELS_MAX:      # evenly spaced values of the facet, ends included
        panels = [panels[i] for i in np.linspace(0, len(panels) - 1, PANELS_MAX).round().astype(int)]
    fig, grid = figures.figure(figures.DOUBLE_WIDTH if len(panels) > 1 else figures.COLUMN_WIDTH, ncols=len(panels))
    values = sorted(rows[line].dropna().unique().tolist()) if line else []
    colour = _colours(values, line, rows)
    for ax, (fv, part) in zip(grid, panels):
        for key, g in (part.groupby(line, dropna=False) if line else [(None, part)]):
            mean = g.groupby("step")[metric].mean()
            ax.plot(mean.index, mean.to_numpy(), color=colour(key), lw=1.0)
        _task_switches(ax, table)
        _drops(ax, runs[runs["run_id"].isin(part["run_id"])])
        ax.set_xlabel(notation.axis("step"))
        ax.set_title(notation.setting(facet, fv) if facet else title)
        ax.grid(alpha=0.3)
        if metric.endswith("loss") and (part[metric] > 0).all() and part[metric].max() / part[metric].min() > 100:
            ax.set_yscale("log")
    grid[0].set_ylabel(notation.metric(metric))
    if facet:
        fig.suptitle(title, fontsize=8)
    _key(fig, grid, line, values, rows)
    return figures.save(fig, sweep_dir / f"curves_{metric}", sweep_dir, formats)


def _colours(values: list, line: Optional[str], rows: pd.DataFrame):
    """A grid point's colour: one of the cycle for few values, viridis along the axis for many."""
    if len(values) <= CURVES_MAX or line is None:
        index = {v: i for i, v in enumerate(values)}
        return lambda v: f"C{index.get(v, 0) % 10}"
    cmap, norm = _scale(values, rows[line])
    return lambda v: cmap(norm(v))


def _scale(values: list, column: pd.Series):
    import matplotlib
    from matplotlib.colors import LogNorm, Normalize

    positive = [v for v in values if v > 0]
    log = figures.log_scale(column) == "log" and len(positive) == len(values)
    norm = (LogNorm if log else Normalize)(min(values), max(values))
    return matplotlib.colormaps["viridis"], norm


def _key(fig, grid, line: Optional[str], values: list, rows: pd.DataFrame) -> None:
    """A legend of the line axis' values below the panels, or a colour bar when there are many."""
    if line is None:
        return
    if len(values) > CURVES_MAX:
        from matplotlib.cm import ScalarMappable

        cmap, norm = _scale(values, rows[line])
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(grid), label=notation.axis(line), pad=0.02)
        return
    handles = [Line2D([], [], color=f"C{i % 10}", label=notation.setting(line, v)) for i, v in enumerate(values)]
    if len(grid) == 1:
        figures.legend(grid[0], handles)
    else:            # below every panel, centred on the figure
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 5),
                   frameon=False)


def _drops(ax, runs: pd.DataFrame) -> None:
    """A dotted line at each step after which a step schedule drops the learning rate."""
    if "optim.schedule" not in runs or "optim.milestones" not in runs:
        return
    dropping = (runs["optim.schedule"] == "step") & (runs["optim.gamma"] != 1 if "optim.gamma" in runs else True)
    steps = set()
    for cell in runs.loc[dropping, "optim.milestones"].dropna().unique():
        steps |= {int(m) for m in str(cell).strip("[]").split(",") if m.strip()}
    for step in sorted(steps):
        ax.axvline(step, color="0.3", lw=0.8, ls=":")
    if steps:
        ax.text(min(steps), 1.0, " lr drop", transform=ax.get_xaxis_transform(), va="top", fontsize=6, color="0.3")


def _task_switches(ax, table: pd.DataFrame) -> None:
    if "task" not in table or table["task"].nunique() < 2:
        return
    for step in table.groupby("task")["step"].max().iloc[:-1]:
        ax.axvline(step, color="0.6", lw=0.6, ls="--")


# Loss of plasticity: what each task ends with, task after task
TASK_METRICS = ["accuracy", "train_accuracy", "dead_units", "feature_effective_rank", "independent_fraction", "sparsity",
                "weight_norm"]


def task_ends(table: pd.DataFrame, runs: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """One row per finished run and task: the metrics logged at the task's last step, with the
    run's settings on `axes` (the per-task table a plasticity figure is drawn from)."""
    done = runs.loc[runs["status"] == results.FINISHED, ["run_id", "seed"] + [a for a in axes if a != "seed"]]
    rows = table[table["run_id"].isin(done["run_id"])].sort_values("step")
    ends = rows.groupby(["run_id", "task"], as_index=False).last()
    return ends.drop(columns=[c for c in ends.columns if c in axes or c == "seed"]).merge(done, on="run_id")


def task_curves(sweep_dir: Path, ends: pd.DataFrame, axes: list[str], metric: str, *, formats, title: str) -> list[Path]:
    """metric at the end of each task vs task index (integer ticks), one line per grid point
    (mean ± std over seeds); one panel per value of the first axis when there are more than
    PANELS_MAX lines."""
    facet = axes[0] if len(axes) > 1 and ends.groupby(axes, dropna=False).ngroups > PANELS_MAX else None
    panels = [(None, ends)] if facet is None else list(ends.groupby(facet, dropna=False))
    lines = [a for a in axes if a != facet]
    fig, grid = figures.figure(figures.DOUBLE_WIDTH if len(panels) > 1 else figures.COLUMN_WIDTH, ncols=len(panels))
    handles = {}
    tasks = sorted(ends["task"].dropna().unique().astype(int).tolist())
    for ax, (value, part) in zip(grid, panels):
        groups = list(part.groupby(lines, dropna=False)) if lines else [((), part)]
        for i, (key, g) in enumerate(groups):
            key = key if isinstance(key, tuple) else (key,)
            stats = g.groupby("task")[metric].agg(["mean", "std"]).reset_index()
            style = dict(color=f"C{i % 10}", marker=figures.MARKERS[i % len(figures.MARKERS)])
            xs = figures.dodge(stats["task"].to_numpy(float), i, len(groups), False, (0, max(tasks[-1], 1)))
            ax.errorbar(xs, stats["mean"], yerr=stats["std"].fillna(0), capsize=2, ms=3, **style)
            label = notation.settings(lines, key) or "mean ± s.d. over seeds"
            handles.setdefault(label, Line2D([], [], **style, label=label))
        ax.set_xticks(tasks)                  # tasks are integers: no tick at 0.5
        ax.set_xlabel(notation.axis("task"))
        ax.set_title(notation.setting(facet, value) if facet else title)
        ax.grid(alpha=0.3)
    grid[0].set_ylabel(f"{notation.metric(metric)} (end of task)")
    if facet:
        fig.suptitle(title, fontsize=8)
    figures.legend(grid[len(grid) // 2], list(handles.values()))
    return figures.save(fig, sweep_dir / f"tasks_{metric}", sweep_dir, formats)
