"""Phase diagrams and summaries from a sweep's tables (never from memory: from the folder).

A 1-D phase diagram plots a structure metric's final value against the one swept axis (seeds
averaged: mean ± std), with the closed-form prediction computed from the same data where one
exists (shared/science.md §5): the lasso for `hadamard`, singular-value soft-thresholding for
`factorization` on whitened inputs, the dead-neuron threshold λ_c for a tanh `mlp`.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from symrun import data as data_mod  # noqa: E402
from symrun.config import DATA_OPTIONS, EXECUTION_KEYS, ConfigError, default_values, model_options, to_config  # noqa: E402
from symrun.models import registry  # noqa: E402
from symrun.sweeping import folder, records, results, tables  # noqa: E402

FIT = ["train_loss", "test_loss", "accuracy"]


@dataclass
class Report:
    figures: list[Path]
    summary: pd.DataFrame          # one row per grid point (seeds pooled)
    status_counts: dict[str, int]
    problems: list[str] = field(default_factory=list)   # one line per file that cannot be read back


def axes_of(runs: pd.DataFrame, swept: list[str]) -> list[str]:
    """Settings that vary across the table's runs, seeds excluded (seeds are pooled): the swept
    keys first, then any other setting that differs, so runs that differ in anything but the
    seed are never pooled. Execution keys (pack_size, device, name, train.checkpoint_every) say
    how runs were trained, not what: they are never axes."""
    per_option = [set(default_values(model_options()[m], DATA_OPTIONS[d]))
                  for (m, d), _ in runs.groupby(["model.name", "data.name"])]
    settings, shared = set().union(*per_option), set.intersection(*per_option)
    # null is a value of a setting every run has (data.batch_size=null: full batch); a key only
    # some models have is empty for the others, which is not a difference.
    varying = [k for k in runs.columns if k in settings and k != "seed" and k not in EXECUTION_KEYS
               and runs[k].nunique(dropna=k not in shared) > 1]
    return [k for k in swept if k in varying] + [k for k in varying if k not in swept]


def metrics_of(runs: pd.DataFrame) -> list[str]:
    options = runs["model.name"].dropna().unique() if "model.name" in runs else []
    names = [m for model in options if model in registry.specs() for m in registry.spec(model).primary]
    names += ["constraint_violation"] + FIT
    return [m for m in dict.fromkeys(names) if m in runs and runs[m].notna().any()]


def summarize(runs: pd.DataFrame, swept: list[str]) -> pd.DataFrame:
    """Mean and std over seeds of each reported metric per grid point, and the run counts."""
    axes = axes_of(runs, swept)
    done = runs[runs["status"] == results.FINISHED]
    cols = metrics_of(runs)
    if done.empty or not cols:
        return pd.DataFrame()
    grouped = done.groupby(axes, dropna=False) if axes else done.assign(_all=0).groupby("_all")
    table = grouped[cols].agg(["mean", "std"])
    table.columns = [f"{m} {stat}" for m, stat in table.columns]
    table.insert(0, "runs", grouped.size())
    return table.reset_index().drop(columns=["_all"], errors="ignore")


SERIES_MAX = 4   # a second axis with at most this many values is drawn as one line per value


def build(sweep_dir: Path) -> Report:
    """Rebuild the tables, draw the phase diagrams, summarise. Figures go next to the tables;
    figures an earlier report drew that this one does not (another grid) are removed.

    One swept axis (seeds pooled): a line with mean ± std. Two: one line per value of the
    shorter axis when it has at most SERIES_MAX values, else a heatmap of the mean."""
    sweep_dir = Path(sweep_dir)
    runs, table = tables.write_tables(sweep_dir)
    counts = runs["status"].value_counts().to_dict()
    found = tables.problems(sweep_dir, runs)
    runs = runs[runs["status"] != results.DAMAGED]
    swept = records.read_sweep(sweep_dir)[0].get("swept", [])
    figures = run_figures(sweep_dir) + (_draw(sweep_dir, runs, table, swept) if not runs.empty else [])
    _forget_stale_figures(sweep_dir, figures)
    summary = summarize(runs, swept) if not runs.empty else pd.DataFrame()
    return Report(figures, summary, counts, found)


def _draw(sweep_dir: Path, runs: pd.DataFrame, table: pd.DataFrame, swept: list[str]) -> list[Path]:
    axes = sorted(axes_of(runs, swept), key=lambda k: runs[k].nunique())
    done = runs[runs["status"] == results.FINISHED]
    figures = []
    if "task" in table and not done.empty:      # a task sequence: per-task curves come first
        ends = task_ends(table, runs, axes)
        figures += [_task_curves(sweep_dir, ends, axes, m) for m in TASK_METRICS if m in ends and ends[m].notna().any()]
    if done.empty or not 1 <= len(axes) <= 2:   # more axes: the summary table, no figure
        return figures
    x, other = axes[-1], (axes[0] if len(axes) == 2 else None)
    for metric in metrics_of(runs):
        if other is not None and done[other].nunique() > SERIES_MAX:
            figures.append(_heatmap(sweep_dir, done, x, other, metric))
        else:
            figures.append(_phase_diagram(sweep_dir, done, x, metric, other))
    return figures


MANIFEST = "figures.json"     # the sweep-level figures the last report drew
DRAWN = re.compile(r"(phase|heatmap|tasks)_[^/]*\.png")   # what a report names them: anything else is not ours


def _forget_stale_figures(sweep_dir: Path, figures: list[Path]) -> None:
    """Remove the sweep-level figures the previous report listed and this one did not draw, and
    list this one's. Only names a report gives its figures are removed, and only in the folder
    itself (a manifest from elsewhere cannot name ../anything)."""
    drawn = sorted(p.name for p in figures if p.parent == sweep_dir)
    previous = results.read_json(sweep_dir / MANIFEST, sweep_dir)
    listed = previous.get("figures", []) if isinstance(previous, dict) else []
    for name in listed:
        if isinstance(name, str) and DRAWN.fullmatch(name) and name not in drawn:
            folder.remove(sweep_dir / name, sweep_dir)
    if drawn or listed:
        results.write_json(sweep_dir / MANIFEST, {"figures": drawn}, sweep_dir)


# Loss of plasticity: what each task ends with, task after task
TASK_METRICS = ["accuracy", "train_accuracy", "dead_units", "feature_effective_rank", "independent_fraction", "sparsity",
                "weight_norm"]


def task_ends(table: pd.DataFrame, runs: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """One row per finished run and task: the metrics logged at the task's last step, with the
    run's settings on `axes` (the per-task table a plasticity figure is drawn from)."""
    done = runs.loc[runs["status"] == results.FINISHED, ["run_id", "seed"] + [a for a in axes if a != "seed"]]
    rows = table[table["run_id"].isin(done["run_id"])].sort_values("step")
    ends = rows.groupby(["run_id", "task"], as_index=False).last()
    ends = ends.drop(columns=[c for c in ends.columns if c in axes or c == "seed"]).merge(done, on="run_id")
    return ends


def _task_curves(sweep_dir: Path, ends: pd.DataFrame, axes: list[str], metric: str) -> Path:
    """metric at the end of each task vs task index, one line per grid point (mean ± std over
    seeds); one panel per value of the first axis when there are more than SERIES_MAX lines."""
    facet = axes[0] if len(axes) > 1 and ends.groupby(axes, dropna=False).ngroups > SERIES_MAX else None
    panels = [(None, ends)] if facet is None else list(ends.groupby(facet, dropna=False))
    lines = [a for a in axes if a != facet]
    fig, grid = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.5, 4.0), dpi=120, squeeze=False, sharey=True)
    for ax, (value, part) in zip(grid[0], panels):
        groups = list(part.groupby(lines, dropna=False)) if lines else [((), part)]
        for key, g in groups:
            key = key if isinstance(key, tuple) else (key,)
            stats = g.groupby("task")[metric].agg(["mean", "std"]).reset_index()
            label = ", ".join(f"{k.split('.')[-1]}={_value(v)}" for k, v in zip(lines, key)) or "symrun"
            ax.errorbar(stats["task"], stats["mean"], yerr=stats["std"].fillna(0), fmt="o-", capsize=2, ms=3, label=label)
        ax.set_xlabel("task")
        ax.set_title(f"{facet}={_value(value)}" if facet else f"{metric} at the end of each task", fontsize=9)
        ax.grid(alpha=0.3)
    grid[0][0].set_ylabel(f"{metric} (end of task)")
    grid[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(_headline(f"{metric} task after task", sweep_dir), fontsize=10)
    return _save(fig, sweep_dir / f"tasks_{metric}.png", sweep_dir)


def _phase_diagram(sweep_dir: Path, done: pd.DataFrame, axis: str, metric: str, series: Optional[str]) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    numeric = pd.api.types.is_numeric_dtype(done[axis])
    groups = [(None, done)] if series is None else list(done.groupby(series, dropna=False))
    drawn: list[np.ndarray] = []
    for value, part in groups:
        stats = part.groupby(axis)[metric].agg(["mean", "std", "count"]).reset_index().sort_values(axis)
        xs = stats[axis] if numeric else np.arange(len(stats))
        label = f"{series}={_value(value)}" if series else "symrun"
        ax.errorbar(xs, stats["mean"], yerr=stats["std"].fillna(0), fmt="o-" if numeric else "o", capsize=3,
                    label=f"{label} (mean ± std, {int(stats['count'].max())} seeds)")
        if not numeric:
            ax.set_xticks(xs, stats[axis].astype(str))
        line = _theory_line(sweep_dir, part, axis, metric) if numeric else None
        if line is not None:   # the closed form of this series' own config, once per distinct line
            lx, ly, text = line
            key = np.atleast_1d(lx if ly is None else ly)
            if not any(np.array_equal(key, d) for d in drawn):
                text += f" ({series}={_value(value)})" if drawn else ""
                if ly is None:
                    ax.axvline(lx, color="k", ls="--", label=text)
                else:
                    ax.plot(lx, ly, "k--", label=text)
                drawn.append(key)
        measured = _critical_line(part, axis, metric) if numeric else None
        if measured is not None:
            mx, text = measured
            ax.axvline(mx, color="C3", ls=":", label=text + (f" ({series}={_value(value)})" if series else ""))
    if numeric:
        _log_scale_if_wide(ax.set_xscale, done[axis])
    ax.set_xlabel(axis)
    ax.set_ylabel(f"final {metric}")
    ax.set_title(_headline(f"{metric} vs {axis}", sweep_dir), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    suffix = f"_by_{series}" if series else ""
    return _save(fig, sweep_dir / f"phase_{metric}_vs_{axis}{suffix}.png", sweep_dir)


CORRELATION_FIGSIZE, CORRELATION_DPI = (5.6, 4.8), 120   # a run's correlation figure: 672 × 576 pixels


def run_figures(sweep_dir: Path) -> list[Path]:
    """Each run's own figures, drawn from the arrays it saved (redrawn when the array is newer):
    runs/<id>/penultimate_correlation.png for model=resnet18. Run folders that are links are
    not entered."""
    figures = []
    for rid in results.run_ids(sweep_dir):
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
    fig, ax = plt.subplots(figsize=CORRELATION_FIGSIZE, dpi=CORRELATION_DPI)
    if len(ordered):
        image = ax.imshow(np.nan_to_num(ordered), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        fig.colorbar(image, ax=ax, label="correlation over the probe set")
    else:
        ax.text(0.5, 0.5, "no feature varies on the probe set", ha="center", va="center")
    ax.set_xlabel("feature (clustering order)")
    ax.set_title(f"penultimate features: {alive.sum()} of {len(corr)} vary on the probe\n{run}", fontsize=9)
    return _save(fig, path, sweep_dir)


# The mirror kind whose constraint a structure metric counts (symrun.analysis.critical logs λ_c per kind).
KIND_OF = {"sparsity": "rescaling", "rank": "rotation", "independent_fraction": "permutation",
           "constraint_violation": "rescaling"}


def _critical_line(runs: pd.DataFrame, axis: str, metric: str):
    """(λ_c, label): the measured critical weight decay (symrun.analysis.critical) of the metric's mirror
    kind — the largest over its mirrors, median over seeds — at the series' largest weight decay,
    where the structure is most complete. At a fully symmetric point it is the closed-form
    threshold (e.g. ‖Xᵀy/n‖∞ for the Hadamard model), so the two lines should meet there."""
    column = f"critical_wd_max.{KIND_OF.get(metric, '')}"
    if axis != "optim.weight_decay" or column not in runs:
        return None
    at = runs[axis].max()
    value = runs.loc[runs[axis] == at, column].median()
    if not np.isfinite(value):
        return None
    return float(value), f"λ_c measured (max over {KIND_OF[metric]} mirrors at λ = {at:.3g})"


def _title(sweep_dir: Path) -> str:
    """The sweep's name (a suite member's is suite/preset), for figure titles."""
    return records.read_sweep(sweep_dir)[0].get("name") or Path(sweep_dir).parent.name


def _headline(what: str, sweep_dir: Path) -> str:
    """"what — sweep name", on two lines when one would not fit a figure's width."""
    name = _title(sweep_dir)
    return f"{what} — {name}" if len(what) + len(name) <= 60 else f"{what}\n{name}"


def _value(v) -> str:
    """A setting's value as the user wrote it: null for None/NaN, 4 rather than 4.0."""
    if v is None or (isinstance(v, float) and v != v):
        return "null"
    return str(int(v)) if isinstance(v, float) and v.is_integer() and abs(v) >= 1 else str(v)


def _heatmap(sweep_dir: Path, done: pd.DataFrame, x: str, y: str, metric: str) -> Path:
    grid = done.pivot_table(index=y, columns=x, values=metric, aggfunc="mean").sort_index().sort_index(axis=1)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    image = ax.imshow(grid.to_numpy(), origin="lower", aspect="auto", cmap="viridis")
    ax.set_xticks(range(grid.shape[1]), [f"{v:.2g}" if isinstance(v, float) else str(v) for v in grid.columns],
                  rotation=60, fontsize=7)
    ax.set_yticks(range(grid.shape[0]), [f"{v:.2g}" if isinstance(v, float) else str(v) for v in grid.index], fontsize=7)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    fig.colorbar(image, ax=ax, label=f"final {metric} (mean over seeds)")
    ax.set_title(_headline(metric, sweep_dir), fontsize=10)
    return _save(fig, sweep_dir / f"heatmap_{metric}_{x}_vs_{y}.png", sweep_dir)


def _log_scale_if_wide(set_scale, values: pd.Series) -> None:
    positive = values[values > 0]
    if len(positive) and positive.max() / positive.min() > 50:
        if (values <= 0).any():
            set_scale("symlog", linthresh=positive.min())
        else:
            set_scale("log")


def _save(fig, path: Path, sweep_dir: Path) -> Path:
    """Render to memory, then write it into the sweep folder like every other file (symrun.sweeping.folder)."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    results.write_atomic(path, buf.getvalue(), sweep_dir)
    return path


def _theory_line(sweep_dir: Path, runs: pd.DataFrame, axis: str, metric: str, grid=None):
    """(x, y, label) of the closed form for this model/metric over the axis (at `grid`, default a
    fine grid over the axis' range), or None. A threshold comes back as (λ_c, None, label)."""
    if axis != "optim.weight_decay" or runs["optim.name"].iloc[0] == "adamw":
        return None
    spec = registry.specs().get(runs["model.name"].iloc[0])
    if spec is None or spec.theory is None:     # the models with a closed form (and small data)
        return None
    try:   # a received folder's data may not be on this machine: then there is no line to draw
        cfg = to_config(results.load_config_dict(sweep_dir, runs["run_id"].iloc[0]))
        if cfg.symmetry.remove or cfg.constraint.name != "none":   # other objectives: the closed forms do not apply
            return None
        ds = data_mod.load(cfg.data)
    except (ConfigError, data_mod.DataError, OSError):
        return None
    if ds.task != "regression":
        return None
    lo, hi = runs[axis].min(), runs[axis].max()
    if grid is None:
        grid = np.geomspace(max(lo, hi * 1e-4), hi, 200) if hi > 0 else np.array([0.0])
    return spec.theory(cfg, ds, metric, grid)


def _tables(sweep_dir: Path) -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    """(runs.csv, its axes shortest first as `build` orders them, the finished runs)."""
    runs = results.read_csv(io.StringIO(folder.read_text(Path(sweep_dir) / "runs.csv")))
    runs = runs[runs["status"] != results.DAMAGED]
    swept = records.read_sweep(sweep_dir)[0].get("swept", [])
    if runs.empty:
        return runs, [], runs
    axes = sorted(axes_of(runs, swept), key=lambda k: runs[k].nunique())
    return runs, axes, runs[runs["status"] == results.FINISHED]


# Half a step of the metric: a mean within it of the closed form counts as landing on it.
AGREEMENT_TOL = {"sparsity": 0.025, "rank": 0.5}


def theory_agreement(sweep_dir: Path) -> list[str]:
    """For each series of a weight-decay sweep with a closed form: how many grid points land on
    it, e.g. "sparsity: 16 of 16 weight decays on the lasso solution (|mean − theory| ≤ 0.025)"."""
    sweep_dir = Path(sweep_dir)
    _, axes, done = _tables(sweep_dir)
    if not axes or axes[-1] != "optim.weight_decay" or len(axes) > 2 or done.empty:
        return []
    series = axes[0] if len(axes) == 2 else None
    lines = []
    for value, part in ([(None, done)] if series is None else list(done.groupby(series, dropna=False))):
        for metric in [m for m in AGREEMENT_TOL if m in part]:
            means = part.groupby("optim.weight_decay")[metric].mean()
            line = _theory_line(sweep_dir, part, "optim.weight_decay", metric, grid=means.index.to_numpy())
            if line is None:
                continue
            xs, ys, label = line
            label, where = label.split(" (")[0], (f" ({series}={_value(value)})" if series else "")
            if ys is None:       # a threshold: all dead above it, not all dead below
                hits = int(((means == 1.0) == (means.index > xs)).sum())
                lines.append(f"{metric}{where}: {hits} of {len(means)} weight decays on the side of {label} it predicts")
            else:
                hits = int((np.abs(means.to_numpy() - ys) <= AGREEMENT_TOL[metric]).sum())
                lines.append(f"{metric}{where}: {hits} of {len(means)} weight decays on the {label} "
                             f"(|mean − theory| ≤ {AGREEMENT_TOL[metric]})")
    return lines


def removal_contrast(sweep_dir: Path) -> list[str]:
    """For a sweep with `symmetry.remove` and one other axis: each structure metric's range over
    that axis without and with the offsets (means over seeds), e.g. "rank: 0–10 without offsets,
    9.5–10 with (14 values of optim.weight_decay)" — what symmetry removal changed, computed."""
    _, axes, done = _tables(sweep_dir)
    key = "symmetry.remove"
    if done.empty or key not in done or done[key].nunique() != 2:
        return []
    others = [a for a in axes if a != key]
    if len(others) != 1:
        return []
    x = others[0]
    lines = []
    for metric in [m for m in metrics_of(done) if m not in FIT]:      # the structure metrics
        means = done.groupby([key, x])[metric].mean()
        ranges = [f"{means.loc[flag].min():.3g}–{means.loc[flag].max():.3g} {label}"
                  for flag, label in ((False, "without offsets"), (True, "with"))]
        lines.append(f"{metric}: {', '.join(ranges)} ({done[x].nunique()} values of {x})")
    return lines


def status_line(counts: dict[str, int]) -> Optional[str]:
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) if counts else None
