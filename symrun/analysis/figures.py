"""A sweep's figures, drawn for a paper: a journal column wide, labelled in the paper's notation
(symrun.analysis.notation), the legend outside the data, series that coincide kept visible (a marker and a
small sideways offset each), categorical axes for booleans and names, diverged runs drawn as ✗
and grid points with a run that had not converged (symrun.analysis.curves) drawn hollow.

Every figure is written in each of `report.formats` (png, pdf, svg) beside the tables.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.mathtext import MathTextParser

from symrun.analysis import agreement, notation
from symrun.sweeping import results

COLUMN_WIDTH = 3.4     # inches: one column of a two-column journal page (7.0 for both columns)
DOUBLE_WIDTH = 7.0
DPI = 300              # PNG pixels per inch: a column is 1020 px wide
PAD = 0.03             # inches of margin around what is drawn
FORMATS = ("png", "pdf", "svg")
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "<"]
DODGE = 0.012          # sideways offset between series, as a fraction of the x axis' span
STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 7,
         "xtick.labelsize": 7, "ytick.labelsize": 7, "lines.linewidth": 1.2, "lines.markersize": 4,
         "svg.fonttype": "none", "pdf.fonttype": 42}   # text stays text in vector output


matplotlib.rcParams.update(STYLE)


class Canvas(FigureCanvasAgg):
    """Agg whose renderers share one mathtext parser. Agg makes a renderer per canvas size, and each
    renderer its own parser whose cache dies with it: save measures on one renderer and draws on
    another (at the cropped size), and every figure has its own canvas, so the same tick labels
    ($10^{-3}$ …) were laid out again each time (a quarter of a figure's save)."""

    _mathtext = MathTextParser("path")      # what RendererAgg makes for itself

    def get_renderer(self):
        renderer = super().get_renderer()
        renderer.mathtext_parser = self._mathtext
        return renderer


def _own_mathtext_after_fork() -> None:
    """A forked process (symrun.analysis.report.draw_all) lays out its text with a parser of its
    own. The parent's cached layouts hold its FreeType fonts, which cannot be used across a fork:
    two children drawing with them at once read each other's place in the shared font file
    ("FT_Load_Glyph … invalid outline"). matplotlib empties its own font cache at a fork for the
    same reason."""
    Canvas._mathtext = MathTextParser("path")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_own_mathtext_after_fork)


def canvas(figsize: tuple[float, float], dpi: Optional[float] = None) -> Figure:
    """A figure on a Canvas of its own, without pyplot (its list of open figures is not needed
    to write files): the figure is freed once nothing refers to it."""
    fig = Figure(figsize=figsize, dpi=dpi)
    Canvas(fig)
    return fig


def figure(width: float = COLUMN_WIDTH, aspect: float = 0.75, ncols: int = 1):
    """A figure `width` inches wide (a column); `ncols` panels share the y axis."""
    fig = canvas((width, width * aspect * (1 if ncols == 1 else 0.6)))
    axes = fig.subplots(1, ncols, squeeze=False, sharey=ncols > 1)
    return fig, axes[0]


def categorical(values: pd.Series) -> bool:
    """Booleans, names and anything non-numeric are categories, not a continuous axis."""
    return pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values)


def positions(values, categories: Optional[list]) -> np.ndarray:
    """x positions: the values themselves, or the index of each among `categories`."""
    if categories is None:
        return np.asarray(values, dtype=float)
    index = {c: i for i, c in enumerate(categories)}
    return np.array([index[v] for v in values], dtype=float)


def dodge(xs: np.ndarray, i: int, n: int, log: bool, span: tuple[float, float]) -> np.ndarray:
    """Series i of n moved sideways by DODGE of the axis (multiplicatively on a log axis), so
    series with equal values stay visible side by side."""
    shift = (i - (n - 1) / 2) * DODGE
    if n == 1:
        return xs
    if log:
        lo, hi = np.log10(span[0]), np.log10(span[1])
        return xs * 10 ** (shift * ((hi - lo) or 1.0))
    return xs + shift * ((span[1] - span[0]) or 1.0)


def log_scale(values: pd.Series) -> Optional[str]:
    positive = values[values > 0]
    if len(positive) and positive.max() / positive.min() > 50:
        return "symlog" if (values <= 0).any() else "log"
    return None


def phase_diagram(sweep_dir: Path, done: pd.DataFrame, axis: str, metric: str, series: Optional[str], *,
                  diverged: pd.DataFrame, unconverged: set, formats, title: str) -> list[Path]:
    """Final metric vs one axis, mean ± std over seeds, one line per value of `series`; the closed
    form and the measured λ_c (one legend entry per distinct line), ✗ for diverged runs."""
    fig, (ax,) = figure()
    cats = sorted(done[axis].dropna().unique().tolist()) if categorical(done[axis]) else None
    scale = None if cats is not None else log_scale(done[axis])
    if cats is not None:         # names on the axis: series are dodged in units of its positions
        span = (0, max(len(cats) - 1, 1))
    else:
        span = (done[axis][done[axis] > 0].min() if scale else done[axis].min(), done[axis].max())
    groups = [(None, done)] if series is None else list(done.groupby(series, dropna=False))
    handles, seeds = [], int(done.groupby([axis] + ([series] if series else []), dropna=False).size().max())
    for i, (value, part) in enumerate(groups):
        stats = part.groupby(axis)[metric].agg(["mean", "std"]).reset_index().sort_values(axis)
        xs = dodge(positions(stats[axis], cats), i, len(groups), scale == "log", span)
        late = part[part["run_id"].isin(unconverged)][axis].unique()
        colour, marker = f"C{i % 10}", MARKERS[i % len(MARKERS)]
        ax.errorbar(xs, stats["mean"], yerr=stats["std"].fillna(0), color=colour, marker=marker, capsize=2,
                    ls="-" if cats is None else "none", mfc=colour, zorder=3)
        hollow = stats[axis].isin(late).to_numpy()
        if hollow.any():     # a grid point with a run still moving: hollow marker over the filled one
            ax.plot(xs[hollow], stats["mean"].to_numpy()[hollow], ls="none", marker=marker, mfc="white",
                    mec=colour, zorder=4)
        handles.append(Line2D([], [], color=colour, marker=marker, label=notation.setting(series, value) if series
                              else f"mean ± s.d. ({notation.plural(seeds, 'seed')})"))
    handles += _theory(ax, sweep_dir, done, axis, metric, series, groups, cats)
    if any(done["run_id"].isin(unconverged)):
        handles.append(Line2D([], [], ls="none", marker="o", mfc="white", mec="k", label="not converged (a run)"))
    handles += _diverged(ax, diverged, axis, cats)
    if cats is not None:
        ax.set_xticks(range(len(cats)), [notation.value(c) for c in cats])
        ax.set_xlim(-0.5, len(cats) - 0.5)
    elif scale:
        ax.set_xscale(scale, **({"linthresh": span[0]} if scale == "symlog" else {}))
    ax.set_xlabel(notation.axis(axis))
    ax.set_ylabel(f"final {notation.metric(metric)}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    legend(ax, handles, f"mean ± s.d. over {notation.plural(seeds, 'seed')}" if series else None)
    suffix = f"_by_{series}" if series else ""
    return save(fig, sweep_dir / f"phase_{metric}_vs_{axis}{suffix}", sweep_dir, formats)


def _theory(ax, sweep_dir, done, axis, metric, series, groups, cats) -> list:
    """The closed form of each series' own config and the measured λ_c, each distinct line
    drawn once with one legend entry (series that share data share the line)."""
    if cats is not None:
        return []
    handles, drawn, critical = [], [], []
    for i, (value, part) in enumerate(groups):
        line = agreement.theory_line(sweep_dir, part, axis, metric)
        if line is not None:
            lx, ly, text = line
            key = np.atleast_1d(lx if ly is None else ly)
            if not any(np.array_equal(key, d) for d in drawn):
                drawn.append(key)
                style = dict(color="k", ls=["--", "-.", (0, (5, 1, 1, 1))][len(drawn) % 3 - 1], lw=1.0, zorder=2)
                ax.axvline(lx, **style) if ly is None else ax.plot(lx, ly, **style)
                handles.append(Line2D([], [], **style, label=text))
        measured = agreement.critical_line(part, axis, metric)
        if measured is not None:
            critical.append((measured[0], measured[1], f"C{i % 10}", value))
    distinct = {round(c[0], 6) for c in critical}
    for x, text, colour, value in critical:
        if len(distinct) == 1:          # every series measures the same λ_c: one line, one entry
            ax.axvline(x, color="0.35", ls=":", lw=1.2, zorder=2)
            handles.append(Line2D([], [], color="0.35", ls=":", label=text))
            break
        ax.axvline(x, color=colour, ls=":", lw=1.2, zorder=2)
        handles.append(Line2D([], [], color=colour, ls=":", label=f"λ_c measured, {notation.setting(series, value)}"))
    return handles


def _diverged(ax, diverged: pd.DataFrame, axis: str, cats) -> list:
    """A ✗ at the bottom of the axes at each diverged run's x (its metric is not a result)."""
    if diverged.empty or axis not in diverged:
        return []
    known = diverged[diverged[axis].isin(cats)] if cats is not None else diverged
    if known.empty:
        return []
    xs = positions(known[axis], cats)
    ax.plot(xs, np.full(len(xs), 0.03), ls="none", marker="x", color="C3", ms=6, mew=1.5,
            transform=ax.get_xaxis_transform(), clip_on=False, zorder=5)
    return [Line2D([], [], ls="none", marker="x", color="C3", mew=1.5,
                   label=f"diverged ({notation.plural(len(known), 'run')})")]


def legend(ax, handles: list, title: Optional[str] = None) -> None:
    """Below the axes, outside the data, in as many columns as fit a column's width."""
    if not handles:
        return
    for h in handles:      # λ_c as the paper writes it
        h.set_label(h.get_label().replace("λ_c", r"$\lambda_c$"))
    narrow = max(len(h.get_label()) for h in handles) <= 26
    ax.legend(handles=handles, title=title, loc="upper center", bbox_to_anchor=(0.5, -0.2),
              ncol=2 if len(handles) > 3 and narrow else 1, frameon=False, fontsize=7, title_fontsize=7)


def heatmap(sweep_dir: Path, done: pd.DataFrame, x: str, y: str, metric: str, *, formats, title: str) -> list[Path]:
    """Mean over seeds on the (x, y) grid, ticks thinned to stay readable, and the closed-form
    boundary in λ where one exists (else the measured λ_c per row) drawn over it."""
    grid = done.pivot_table(index=y, columns=x, values=metric, aggfunc="mean").sort_index().sort_index(axis=1)
    fig, (ax,) = figure(aspect=0.8)
    image = ax.imshow(grid.to_numpy(), origin="lower", aspect="auto", cmap="viridis", interpolation="nearest")
    for set_ticks, labels, limit in ((ax.set_xticks, grid.columns, 8), (ax.set_yticks, grid.index, 10)):
        every = max(1, int(np.ceil(len(labels) / limit)))
        ticks = list(range(0, len(labels), every))
        set_ticks(ticks, [notation.value(labels[i]) for i in ticks])
    handles = []
    if x == agreement.WD:
        handles = _boundary(ax, sweep_dir, done, grid, y, metric)
    ax.set_xlabel(notation.axis(x))
    ax.set_ylabel(notation.axis(y))
    fig.colorbar(image, ax=ax, label=f"final {notation.metric(metric)}", fraction=0.08, pad=0.03)
    ax.set_title(title)
    legend(ax, handles)
    return save(fig, sweep_dir / f"heatmap_{metric}_{x}_vs_{y}", sweep_dir, formats)


def _boundary(ax, sweep_dir, done, grid, y, metric) -> list:
    columns = np.asarray(grid.columns, dtype=float)

    def where(lam: float) -> float:   # λ → a position between the category columns (log-linear)
        logs = np.log10(np.clip(columns, columns[columns > 0].min() if (columns > 0).any() else 1e-12, None))
        return float(np.interp(np.log10(max(lam, 1e-12)), logs, np.arange(len(columns))))

    found = agreement.boundary(sweep_dir, done, metric)
    if found is not None:
        lam, text = found
        ax.axvline(where(lam), color="w", ls="--", lw=1.2)
        return [Line2D([], [], color="k", ls="--", label=text)]
    rows = [(i, agreement.critical_line(done[done[y] == v], agreement.WD, metric)) for i, v in enumerate(grid.index)]
    rows = [(i, c[0]) for i, c in rows if c is not None]
    if not rows:
        return []
    ax.plot([where(c) for _, c in rows], [i for i, _ in rows], "w:", marker="o", ms=3, mfc="w")
    return [Line2D([], [], color="k", ls=":", marker="o", ms=3, label="λ_c measured (per row)")]


def save(fig, stem: Path, sweep_dir: Path, formats) -> list[Path]:
    """Render each format to memory, then write it into the sweep folder like every other file
    (symrun.sweeping.folder). The saved area is the figure's tight box (the legend below the axes
    kept inside it) plus PAD, measured once at DPI for every format: bbox_inches="tight" would
    draw the whole figure once more per format just to measure it (the same PNG bytes, a
    quarter less time)."""
    fig.set_dpi(DPI)
    box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(PAD)
    paths = []
    for fmt in formats:
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=DPI, bbox_inches=box)
        path = stem.with_name(f"{stem.name}.{fmt}")
        results.write_atomic(path, buf.getvalue(), sweep_dir)
        paths.append(path)
    return paths
