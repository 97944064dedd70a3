"""A sweep's report, rebuilt from its folder (never from memory): the tables, the figures
(symrun.analysis.figures, symrun.analysis.curves), the summary over seeds, which runs had not converged, and
report.md (symrun.analysis.document).

A 1-D phase diagram plots a structure metric's final value against the one swept axis (seeds
averaged: mean ± std), with the closed-form prediction computed from the same data where one
exists (docs/theory.md §5, symrun.analysis.agreement).
"""

from __future__ import annotations

import ast
import ctypes
import io
import multiprocessing
import os
import re
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from symrun.analysis import agreement, curves, figures
from symrun.config import DATA_OPTIONS, EXECUTION_KEYS, default_values, model_options
from symrun.models import registry
from symrun.sweeping import folder, records, results, tables

FIT = ["train_loss", "test_loss", "accuracy"]


def primary_metrics(model: str) -> list[str]:
    """The structure metrics a model is about, headline first, as its registry entry declares."""
    return list(registry.spec(model).primary) if model in registry.specs() else []


@dataclass
class Report:
    figures: list[Path]
    summary: pd.DataFrame          # one row per grid point (seeds pooled)
    status_counts: dict[str, int]
    problems: list[str] = field(default_factory=list)   # one line per file that cannot be read back
    unconverged: dict[str, list[str]] = field(default_factory=dict)   # run_id → what still moved
    axes: list[str] = field(default_factory=list)       # the grid's axes, shortest first
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)   # runs.csv, damaged runs left out


def axes_of(runs: pd.DataFrame, swept: list[str]) -> list[str]:
    """Settings that vary across the table's runs, seeds excluded (seeds are pooled): the swept
    keys first, then any other setting that differs, so runs that differ in anything but the
    seed are never pooled. Execution keys (pack_size, device, name, train.checkpoint_every,
    report.formats) say how runs were trained or drawn, not what: they are never axes."""
    per_option = [set(default_values(model_options()[m], DATA_OPTIONS[d]))
                  for (m, d), _ in runs.groupby(["model.name", "data.name"])]
    settings, shared = set().union(*per_option), set.intersection(*per_option)
    # null is a value of a setting every run has (data.batch_size=null: full batch); a key only
    # some models have is empty for the others, which is not a difference.
    varying = [k for k in runs.columns if k in settings and k != "seed" and k not in EXECUTION_KEYS
               and runs[k].nunique(dropna=k not in shared) > 1]
    return [k for k in swept if k in varying] + [k for k in varying if k not in swept]


# On a tie in length, the axis a figure puts on x: the theory's control parameters first.
X_PREFERENCE = ("optim.weight_decay", "optim.lr", "data.batch_size", "noise.label_std", "noise.temperature")


def ordered_axes(runs: pd.DataFrame, swept: list[str]) -> list[str]:
    """axes_of, shortest first: the last is a figure's x axis, the first its series. On a tie,
    categories (booleans, names) become series and weight decay, then lr, … the x axis."""
    def key(k: str):
        preference = len(X_PREFERENCE) - X_PREFERENCE.index(k) if k in X_PREFERENCE else 0
        return runs[k].nunique(), not figures.categorical(runs[k]), preference
    return sorted(axes_of(runs, swept), key=key)


def metrics_of(runs: pd.DataFrame) -> list[str]:
    models = runs["model.name"].dropna().unique() if "model.name" in runs else []
    names = [m for model in models for m in primary_metrics(model)] + ["constraint_violation"] + FIT
    return [m for m in dict.fromkeys(names) if m in runs and runs[m].notna().any()]


def structure_metrics(runs: pd.DataFrame) -> list[str]:
    return [m for m in metrics_of(runs) if m not in FIT]


def summarize(runs: pd.DataFrame, swept: list[str], unconverged: Optional[dict] = None) -> pd.DataFrame:
    """Mean and std over seeds of each reported metric per grid point, the run counts, and how
    many of them had not converged (symrun.analysis.curves) when any had not."""
    axes = axes_of(runs, swept)
    done = runs[runs["status"] == results.FINISHED]
    cols = metrics_of(runs)
    if done.empty or not cols:
        return pd.DataFrame()
    done = done.assign(_late=done["run_id"].isin(unconverged or {}))
    grouped = done.groupby(axes, dropna=False) if axes else done.assign(_all=0).groupby("_all")
    table = grouped[cols].agg(["mean", "std"])
    table.columns = [f"{m} {stat}" for m, stat in table.columns]
    table.insert(0, "runs", grouped.size())
    if unconverged:
        table.insert(1, "not converged", grouped["_late"].sum().astype(int))
    return table.reset_index().drop(columns=["_all"], errors="ignore")


SERIES_MAX = 4   # a second axis with at most this many values is drawn as one line per value


def formats_of(runs: pd.DataFrame) -> tuple[str, ...]:
    """The runs' `report.formats` (the last run's, as runs.csv holds it), else png."""
    cell = runs["report.formats"].dropna().iloc[-1] if "report.formats" in runs and runs["report.formats"].notna().any() else None
    try:
        listed = ast.literal_eval(cell) if isinstance(cell, str) else None
    except (ValueError, SyntaxError):
        listed = None
    kept = [f for f in listed if f in figures.FORMATS] if isinstance(listed, list) else []
    return tuple(dict.fromkeys(kept)) or ("png",)


def build(sweep_dir: Path, formats: Optional[tuple[str, ...]] = None) -> Report:
    """Rebuild the tables, draw the figures (in `formats`, default the runs' report.formats),
    summarise, and write report.md. Figures an earlier report drew that this one does not
    (another grid, another format) are removed.

    One swept axis (seeds pooled): a line with mean ± std. Two: one line per value of the
    shorter axis when it has at most SERIES_MAX values, else a heatmap of the mean. Learning
    curves of the headline metrics and the train loss, whatever the grid's shape."""
    from symrun.analysis import document

    sweep_dir = Path(sweep_dir)
    runs, table = tables.write_tables(sweep_dir)
    counts = runs["status"].value_counts().to_dict()
    models = set(runs["model.name"]) if "model.name" in runs else {None}     # a damaged run's is NaN
    found = tables.problems(sweep_dir, runs)
    runs = runs[runs["status"] != results.DAMAGED]
    swept = records.read_sweep(sweep_dir)[0].get("swept", [])
    formats = tuple(formats) if formats else formats_of(runs)
    late = curves.unconverged(table, runs, structure_metrics(runs)) if not runs.empty and not table.empty else {}
    axes = ordered_axes(runs, swept) if not runs.empty else []
    drawn = _draw(sweep_dir, runs, table, axes, late, formats) if not runs.empty else []
    figs = run_figures(sweep_dir, models) + drawn
    _forget_stale_figures(sweep_dir, figs)
    summary = summarize(runs, swept, late) if not runs.empty else pd.DataFrame()
    rep = Report(figs, summary, counts, found, late, axes, runs)
    document.write(sweep_dir, rep)
    return rep


def _draw(sweep_dir: Path, runs: pd.DataFrame, table: pd.DataFrame, axes: list[str], late: dict,
          formats) -> list[Path]:
    done = runs[runs["status"] == results.FINISHED]
    diverged = runs[runs["status"] == results.DIVERGED]
    title = _title(sweep_dir)
    jobs: list[Callable[[], list[Path]]] = []      # one figure each, drawn by draw_all
    if done.empty:
        return []
    if "task" in table:      # a task sequence: per-task curves come first
        ends = curves.task_ends(table, runs, axes)
        for m in curves.TASK_METRICS:
            if m in ends and ends[m].notna().any():
                jobs.append(partial(curves.task_curves, sweep_dir, ends, axes, m, formats=formats, title=title))
    if len(axes) <= 2:
        for metric in [m for m in ["train_loss", *structure_metrics(runs)] if m in table]:
            jobs.append(partial(curves.learning_curves, sweep_dir, table, runs, axes, metric, formats=formats, title=title))
    if 1 <= len(axes) <= 2:   # more axes: the summary table, no phase diagram
        x, other = axes[-1], (axes[0] if len(axes) == 2 else None)
        for metric in metrics_of(runs):
            if other is not None and done[other].nunique() > SERIES_MAX:
                jobs.append(partial(figures.heatmap, sweep_dir, done, x, other, metric, formats=formats, title=title))
            else:
                jobs.append(partial(figures.phase_diagram, sweep_dir, done, x, metric, other, diverged=diverged,
                                    unconverged=set(late), formats=formats, title=title))
    return draw_all(jobs)


DRAW_PROCESSES: Optional[int] = None    # processes drawing a report's figures; None: one per core


def draw_all(jobs: list[Callable[[], list[Path]]]) -> list[Path]:
    """The paths each job drew, in the jobs' order.

    Figures are independent of one another and drawing one is Python-bound (matplotlib's layout
    and Agg), so one process draws them one after another while the machine's other cores sit
    idle. On Linux (where forking a process that has loaded these libraries is sound; macOS
    forbids it to some system frameworks), with more than one core and more than two figures, this
    process draws the first (which warms matplotlib's font and text caches, ~0.1 s), then the
    rest are shared out over forked processes, one per core: a child starts with the tables and
    the warm caches in its memory and sends back only the paths it wrote. Every file is the one
    this process would have drawn (tests/test_report.py compares them byte for byte); an error
    in a child is raised here, and a child that dies breaks the pool (BrokenProcessPool) rather
    than leaving this process waiting. Not in a daemonic process (a pool's worker may not fork
    its own); where a process pool cannot be made (no working semaphores), here, one by one."""
    processes = min(len(jobs) - 1, DRAW_PROCESSES or folder.cores())
    if processes < 2 or not sys.platform.startswith("linux") or multiprocessing.current_process().daemon:
        return [path for job in jobs for path in job()]
    global _JOBS
    first, _JOBS = jobs[0](), jobs
    try:
        try:
            pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                                       initializer=_die_with, initargs=(os.getpid(),))
        except (OSError, NotImplementedError, ImportError):   # no working semaphores (a container without /dev/shm)
            return first + [path for job in jobs[1:] for path in job()]
        with pool:
            drawn = list(pool.map(_run_job, range(1, len(jobs))))
    finally:
        _JOBS = []
    return first + [path for paths in drawn for path in paths]


_JOBS: list[Callable[[], list[Path]]] = []       # draw_all's jobs, inherited by its forked processes


def _run_job(i: int) -> list[Path]:
    return _JOBS[i]()


PR_SET_PDEATHSIG = 1      # linux/prctl.h


def _die_with(parent: int) -> None:
    """A figure process is killed when the process that forked it dies (a sweep's report is built
    by a child that the sweep kills when it is interrupted: symrun.sweeping.reporter), instead of
    waiting for work forever: it holds the user's stdout open, so a shell pipe would never end."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:     # it died before the line above
        os._exit(1)


MANIFEST = "figures.json"     # the sweep-level figures the last report drew
DRAWN = re.compile(r"(phase|heatmap|tasks|curves)_[^/]*\.(png|pdf|svg)")   # what a report names them: anything else is not ours


def _forget_stale_figures(sweep_dir: Path, figures_: list[Path]) -> None:
    """Remove the sweep-level figures the previous report listed and this one did not draw, and
    list this one's. Only names a report gives its figures are removed, and only in the folder
    itself (a manifest from elsewhere cannot name ../anything)."""
    drawn = sorted(p.name for p in figures_ if p.parent == sweep_dir)
    previous = results.read_json(sweep_dir / MANIFEST, sweep_dir)
    listed = previous.get("figures", []) if isinstance(previous, dict) else []
    for name in listed:
        if isinstance(name, str) and DRAWN.fullmatch(name) and name not in drawn:
            folder.remove(sweep_dir / name, sweep_dir)
    if drawn or listed:
        results.write_json(sweep_dir / MANIFEST, {"figures": drawn}, sweep_dir)


def _title(sweep_dir: Path) -> str:
    """The sweep's name (a suite member's is suite/preset), for figure titles."""
    return records.read_sweep(sweep_dir)[0].get("name") or Path(sweep_dir).parent.name


CORRELATION_FIGSIZE, CORRELATION_DPI = (5.6, 4.8), 120   # a run's correlation figure: 672 × 576 pixels


def run_figures(sweep_dir: Path, models: Optional[set] = None) -> list[Path]:
    """Each run's own figures, drawn from the arrays it saved (redrawn when the array is newer):
    runs/<id>/penultimate_correlation.png for model=resnet18. Run folders that are links are
    not entered (the tables report them as damaged). `models`: the runs' model names, when known;
    a sweep none of whose models saves arrays for its runs (ModelSpec.run_figures) has none to
    look for (a look in each of 4,352 run folders was 0.26 s)."""
    figures = []
    known = registry.specs()
    if models is not None and all(m in known and not known[m].run_figures for m in models):
        return figures
    try:            # what each entry of runs/ is, from one listing (not a walk from the root a run)
        found = folder.entries(Path(sweep_dir) / "runs", sweep_dir)
    except results.OutputError:
        return figures
    for rid in sorted(name for name, what in found.items() if what == "dir"):
        array = results.run_dir(sweep_dir, rid) / "penultimate_correlation.npy"
        png = array.with_suffix(".png")
        if folder.kind(array, sweep_dir) != "file":
            continue
        if folder.kind(png, sweep_dir) != "file" or png.stat().st_mtime_ns < array.stat().st_mtime_ns:
            corr = np.load(io.BytesIO(folder.read_bytes(array, sweep_dir)), allow_pickle=False)
            _correlation_figure(corr, png, rid, sweep_dir)
        figures.append(png)
    return figures


def cluster_order(corr: np.ndarray) -> np.ndarray:
    """Leaf order of average-linkage hierarchical clustering (scipy) on the distance 1 − corr:
    strongly correlated features end up next to each other, so groups show as blocks."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if len(corr) < 3:
        return np.arange(len(corr))
    dist = np.clip(1 - (corr + corr.T) / 2, 0, 2)
    np.fill_diagonal(dist, 0)
    return leaves_list(linkage(squareform(dist, checks=False), method="average"))


def _correlation_figure(corr: np.ndarray, path: Path, run: str, sweep_dir: Path) -> Path:
    """The correlation matrix of the penultimate features over the probe set, ordered by
    clustering (the paper's Fig. 1, right); features constant on the probe (NaN) are left out."""
    alive = ~np.isnan(np.diag(corr))
    kept = corr[np.ix_(alive, alive)]
    order = cluster_order(kept)
    ordered = kept[np.ix_(order, order)]
    fig = figures.canvas(CORRELATION_FIGSIZE, dpi=CORRELATION_DPI)
    ax = fig.subplots()
    if len(ordered):
        image = ax.imshow(np.nan_to_num(ordered), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        fig.colorbar(image, ax=ax, label="correlation over the probe set")
    else:
        ax.text(0.5, 0.5, "no feature varies on the probe set", ha="center", va="center")
    ax.set_xlabel("feature (clustering order)")
    ax.set_title(f"penultimate features: {alive.sum()} of {len(corr)} vary on the probe\n{run}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")      # fixed size: a run's own figure, not a paper panel
    results.write_atomic(path, buf.getvalue(), sweep_dir)
    return path


def _tables(sweep_dir: Path):
    return agreement.finished_tables(sweep_dir, ordered_axes)


def theory_agreement(sweep_dir: Path) -> list[str]:
    """How many grid points of each series land on the closed form (symrun.analysis.agreement): the
    lines report.md and the gallery both print."""
    _, axes, done = _tables(Path(sweep_dir))
    return agreement.theory_agreement(Path(sweep_dir), axes, done)


def removal_contrast(sweep_dir: Path) -> list[str]:
    _, axes, done = _tables(Path(sweep_dir))
    return agreement.removal_contrast(axes, done, structure_metrics(done)) if not done.empty else []


def status_line(counts: dict[str, int]) -> Optional[str]:
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) if counts else None
