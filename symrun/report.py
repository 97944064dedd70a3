"""Phase diagrams and summaries from a sweep's tables (never from memory: from the folder).

A 1-D phase diagram plots a structure metric's final value against the one swept axis (seeds
averaged: mean ± std), with the closed-form prediction computed from the same data where one
exists (shared/science.md §5): the lasso for `hadamard`, singular-value soft-thresholding for
`factorization` on whitened inputs, the dead-neuron threshold λ_c for a tanh `mlp`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from symrun import data as data_mod  # noqa: E402
from symrun import results, theory  # noqa: E402
from symrun.config import to_config  # noqa: E402

# The structure each model family is about, first; then how well it fits.
PRIMARY = {
    "hadamard": ["sparsity"],
    "factorization": ["rank"],
    "mlp": ["sparsity", "independent_fraction"],
    "ensemble": ["ensemble_spread", "independent_fraction"],
}
FIT = ["train_loss", "test_loss", "accuracy"]


@dataclass
class Report:
    figures: list[Path]
    summary: pd.DataFrame          # one row per grid point (seeds pooled)
    status_counts: dict[str, int]


def axes_of(runs: pd.DataFrame, swept: list[str]) -> list[str]:
    """Swept keys that vary in the table, seeds excluded (seeds are pooled)."""
    return [k for k in swept if k != "seed" and k in runs and runs[k].nunique(dropna=False) > 1]


def metrics_of(runs: pd.DataFrame) -> list[str]:
    models = runs["model.name"].dropna().unique() if "model.name" in runs else []
    names = [m for model in models for m in PRIMARY.get(model, [])] + FIT
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


def build(sweep_dir: Path) -> Report:
    """Rebuild the tables, draw the phase diagrams, summarise. Figures go next to the tables."""
    sweep_dir = Path(sweep_dir)
    runs, _ = results.write_tables(sweep_dir)
    if runs.empty:
        return Report([], pd.DataFrame(), {})
    swept = (results.read_json(sweep_dir / "sweep.json") or {}).get("swept", [])
    axes = axes_of(runs, swept)
    figures = []
    if len(axes) == 1:
        for metric in metrics_of(runs):
            figures.append(_phase_diagram(sweep_dir, runs, axes[0], metric))
    return Report(figures, summarize(runs, swept), runs["status"].value_counts().to_dict())


def _phase_diagram(sweep_dir: Path, runs: pd.DataFrame, axis: str, metric: str) -> Path:
    done = runs[runs["status"] == results.FINISHED]
    stats = done.groupby(axis)[metric].agg(["mean", "std", "count"]).reset_index().sort_values(axis)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    numeric = pd.api.types.is_numeric_dtype(stats[axis])
    xs = stats[axis] if numeric else np.arange(len(stats))
    ax.errorbar(xs, stats["mean"], yerr=stats["std"].fillna(0), fmt="o-" if numeric else "o", capsize=3,
                label=f"symrun (mean ± std over {int(stats['count'].max())} seeds)")
    if not numeric:
        ax.set_xticks(xs, stats[axis].astype(str))
    line = _theory_line(sweep_dir, runs, axis, metric)
    if line is not None:
        lx, ly, label = line
        if ly is None:
            ax.axvline(lx, color="k", ls="--", label=label)
        else:
            ax.plot(lx, ly, "k--", label=label)
    positive = stats[axis][stats[axis] > 0] if numeric else []
    if len(positive) and positive.max() / positive.min() > 50:
        ax.set_xscale("symlog", linthresh=positive.min()) if (stats[axis] <= 0).any() else ax.set_xscale("log")
    ax.set_xlabel(axis)
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"{metric} vs {axis} — {sweep_dir.parent.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = sweep_dir / f"phase_{metric}_vs_{axis}.png"
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def _theory_line(sweep_dir: Path, runs: pd.DataFrame, axis: str, metric: str):
    """(x, y, label) of the closed form for this model/metric over the axis, or None."""
    if axis != "optim.weight_decay" or runs["optim.name"].iloc[0] == "adamw":
        return None
    model = runs["model.name"].iloc[0]
    cfg = to_config(results.load_config_dict(sweep_dir, runs["run_id"].iloc[0]))
    ds = data_mod.load(cfg.data)
    if ds.task != "regression":
        return None
    lo, hi = runs[axis].min(), runs[axis].max()
    grid = np.geomspace(max(lo, hi * 1e-4), hi, 200) if hi > 0 else np.array([0.0])
    if model == "hadamard" and metric == "sparsity":
        return grid, theory.lasso_sparsity(ds, grid), "lasso solution (closed form, same data)"
    if model == "factorization" and metric == "rank" and not cfg.model.residual and getattr(cfg.data, "whiten", False):
        return grid, theory.svt_rank(ds, grid, cfg.model.hidden), "singular-value soft-thresholding (closed form)"
    if model == "mlp" and metric == "sparsity" and cfg.model.activation == "tanh":
        return theory.dead_neuron_threshold(ds), None, "λ_c = ‖E[xyᵀ]‖ (all neurons dead above)"
    return None


def status_line(counts: dict[str, int]) -> Optional[str]:
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) if counts else None
