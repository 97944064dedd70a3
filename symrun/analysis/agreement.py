"""A sweep against theory: the closed-form lines a phase diagram draws, the boundary a heatmap
draws, the measured λ_c, and how many grid points land on the closed form. The figures, report.md
and the gallery all read them from here, so their numbers are the same numbers.

Closed forms (docs/theory.md §5), declared by each model (its registry entry's `theory` and
`boundary`) and computed on the sweep's own data: the lasso for `hadamard`,
singular-value soft-thresholding for `factorization` on whitened inputs, the dead-neuron
threshold for a tanh `mlp`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from symrun import data as data_mod
from symrun.analysis import notation
from symrun.sweeping import folder, records, results
from symrun.config import ConfigError, to_config
from symrun.models import registry

WD = "optim.weight_decay"
# The mirror kind whose constraint a structure metric counts (symrun.analysis.critical logs λ_c per kind).
KIND_OF = {"sparsity": "rescaling", "rank": "rotation", "independent_fraction": "permutation",
           "constraint_violation": "rescaling"}
# Half a step of the metric: a mean within it of the closed form counts as landing on it.
AGREEMENT_TOL = {"sparsity": 0.025, "rank": 0.5}


def _closed_form_setup(sweep_dir: Path, runs: pd.DataFrame):
    """(cfg, dataset) of the runs' first config when a closed form can apply to it, else None.
    A received folder's data may not be on this machine, or not be what its runs were trained on
    (`unverified_data`): then there is no line to draw."""
    if runs.empty or runs["optim.name"].iloc[0] == "adamw":    # decoupled decay: the thresholds do not apply
        return None
    spec = registry.specs().get(runs["model.name"].iloc[0])
    if spec is None or spec.theory is None:     # the models with a closed form
        return None
    try:
        tree, recorded, key = _setup_key(sweep_dir, runs)
        if key not in _SETUPS:          # one report asks once per figure: the data is built once
            cfg = to_config(tree)
            if cfg.symmetry.remove or cfg.constraint.name != "none" or _classification(cfg.data):
                _SETUPS[key] = None      # other objectives, or data the regression closed forms do not cover
            elif (why := unverified_data(cfg, recorded)) is not None:
                _SETUPS[key], _REFUSED[key] = None, why
            else:
                ds = data_mod.load(cfg.data)
                _SETUPS[key] = (cfg, ds) if ds.task == "regression" else None
    except (ConfigError, data_mod.DataError, OSError):
        return None
    return _SETUPS[key]


def _setup_key(sweep_dir: Path, runs: pd.DataFrame) -> tuple[dict, tuple[str, ...], str]:
    """(the runs' first config, the data digests the runs recorded, the two as a cache key)."""
    recorded = tuple(sorted(map(str, runs["data_sha256"].dropna().unique()))) if "data_sha256" in runs else ()
    tree = results.load_config_dict(sweep_dir, runs["run_id"].iloc[0])
    return tree, recorded, repr((tree, recorded))


# (config, recorded digests) → _closed_form_setup's answer; the data a config names is the same data
_SETUPS: dict[str, Optional[tuple]] = {}
# …and, where it refused a config's data file, why
_REFUSED: dict[str, str] = {}


def _classification(data) -> bool:
    """Whether a data config is a classification task before it is loaded (digits, CIFAR-10 and
    text always are; a file when it says so): its data is then never read for a closed form."""
    return data.name in ("digits", "cifar10", "text") or (data.name == "file" and data.task == "classification")


def refusal(sweep_dir: Path, runs: pd.DataFrame) -> Optional[str]:
    """Why these runs have no closed form drawn although their model has one: their data file is
    not known to be what they were trained on (`unverified_data`); else None."""
    if runs.empty or _closed_form_setup(sweep_dir, runs) is not None:
        return None
    try:
        return _REFUSED.get(_setup_key(sweep_dir, runs)[2])
    except (ConfigError, OSError):
        return None


def unverified_data(cfg, recorded: tuple[str, ...]) -> Optional[str]:
    """Why the data file a run's config names must not be read for its closed form, or None when
    it may (the config reads no file, or the file holds what the runs were trained on).

    config.yaml says which file the runs were trained on, but a folder received from someone else
    could name any file on this machine (a private data set, whose closed form would then be drawn
    into the report they get back). So the file is read only when its SHA-256 is the one the runs
    recorded when they trained (status.json's data_sha256): a folder can then only make symrun
    read a file whose exact content its author already knew. The same check keeps a line from
    being drawn from a file that changed since the runs were trained."""
    path = data_mod.source_file(cfg.data)
    if path is None:
        return None
    if not recorded:
        return (f"no closed form drawn: the runs recorded no digest of data.path {path} "
                "(trained before symrun recorded one), so it is not known to be their data; rerun the sweep to draw it")
    if len(recorded) > 1:
        return f"no closed form drawn: the runs were trained on {len(recorded)} different versions of data.path {path}"
    if data_mod.digest(cfg.data) != recorded[0]:
        return (f"no closed form drawn: data.path {path} is not the file these runs were trained on "
                "(missing, or its SHA-256 differs from the one their status.json records)")
    return None


def theory_line(sweep_dir: Path, runs: pd.DataFrame, axis: str, metric: str, grid=None):
    """(x, y, label) of the closed form for this model/metric over the axis (at `grid`, default a
    fine grid over the axis' range), or None. A threshold comes back as (λ_c, None, label)."""
    if axis != WD or (setup := _closed_form_setup(sweep_dir, runs)) is None:
        return None
    cfg, ds = setup
    lo, hi = runs[axis].min(), runs[axis].max()
    if grid is None:
        grid = np.geomspace(max(lo, hi * 1e-4), hi, 200) if hi > 0 else np.array([0.0])
    return registry.spec(cfg.model.name).theory(cfg, ds, metric, grid)     # the model declares its closed form


def boundary(sweep_dir: Path, runs: pd.DataFrame, metric: str) -> Optional[tuple[float, str]]:
    """(λ, label): the weight decay above which the closed form says the structure is complete
    (every coefficient, direction or neuron at its constraint), for a heatmap over λ: the lasso's
    λ_max = ‖Xᵀy/n‖∞, σ₁(YᵀX/n) for soft-thresholding, ‖E[xyᵀ]‖ for the tanh net (§5)."""
    if (setup := _closed_form_setup(sweep_dir, runs)) is None:
        return None
    cfg, ds = setup
    declared = registry.spec(cfg.model.name).boundary          # the model declares its closed form
    return declared(cfg, ds, metric) if declared is not None else None


def critical_line(runs: pd.DataFrame, axis: str, metric: str) -> Optional[tuple[float, str]]:
    """(λ_c, label): the measured critical weight decay (symrun.analysis.critical) of the metric's mirror
    kind — the largest over its mirrors, median over seeds — at the runs' largest weight decay,
    where the structure is most complete. At a fully symmetric point it is the closed-form
    threshold (e.g. ‖Xᵀy/n‖∞ for the Hadamard model), so the two lines should meet there."""
    if metric not in KIND_OF:
        return None
    column = notation.column("critical_wd_max", KIND_OF[metric])
    if axis != WD or column not in runs:
        return None
    at = runs[axis].max()
    value = runs.loc[runs[axis] == at, column].median()
    if not np.isfinite(value):
        return None
    return float(value), f"λ_c measured ({KIND_OF[metric]} mirrors, at λ = {at:.3g})"


def finished_tables(sweep_dir: Path, order) -> tuple[pd.DataFrame, list[str], pd.DataFrame]:
    """(runs.csv without damaged runs, its axes in a figure's order, the finished runs); `order`
    is report.ordered_axes (passed in: report imports this module)."""
    runs = results.read_csv(io.StringIO(folder.read_text(Path(sweep_dir) / "runs.csv")))
    runs = runs[runs["status"] != results.DAMAGED]
    swept = records.read_sweep(sweep_dir)[0].get("swept", [])
    if runs.empty:
        return runs, [], runs
    axes = order(runs, swept)
    return runs, axes, runs[runs["status"] == results.FINISHED]


def theory_agreement(sweep_dir: Path, axes: list[str], done: pd.DataFrame) -> list[str]:
    """For each series of a weight-decay sweep with a closed form: how many grid points land on
    it, e.g. "sparsity: 16 of 16 weight decays on the lasso solution (|mean − theory| ≤ 0.025)"."""
    if not axes or axes[-1] != WD or len(axes) > 2 or done.empty:
        return []
    series = axes[0] if len(axes) == 2 else None
    lines: list[str] = []
    for value, part in ([(None, done)] if series is None else list(done.groupby(series, dropna=False))):
        for metric in [m for m in AGREEMENT_TOL if m in part]:
            means = part.groupby(WD)[metric].mean()
            line = theory_line(sweep_dir, part, WD, metric, grid=means.index.to_numpy())
            if line is None:
                continue
            xs, ys, label = line
            label = label.split(" (")[0]
            where = f" ({notation.setting(series, value)})" if series else ""
            if ys is None:       # a threshold: all dead above it, not all dead below
                hits = int(((means == 1.0) == (means.index > xs)).sum())
                lines.append(f"{metric}{where}: {hits} of {len(means)} weight decays on the side of {label} it predicts")
            else:
                hits = int((np.abs(means.to_numpy() - ys) <= AGREEMENT_TOL[metric]).sum())
                lines.append(f"{metric}{where}: {hits} of {len(means)} weight decays on the {label} "
                             f"(|mean − theory| ≤ {AGREEMENT_TOL[metric]})")
        if (why := refusal(sweep_dir, part)) is not None:
            lines.append(why)
    return list(dict.fromkeys(lines))


def removal_contrast(axes: list[str], done: pd.DataFrame, structure: list[str]) -> list[str]:
    """For a sweep with `symmetry.remove` and one other axis: each structure metric's range over
    that axis without and with the offsets (means over seeds), e.g. "rank: 0–10 without offsets,
    9.5–10 with (14 values of optim.weight_decay)" — what symmetry removal changed, computed."""
    key = "symmetry.remove"
    if done.empty or key not in done or done[key].nunique() != 2:
        return []
    others = [a for a in axes if a != key]
    if len(others) != 1:
        return []
    x = others[0]
    lines = []
    for metric in structure:
        means = done.groupby([key, x])[metric].mean()
        ranges = [f"{means.loc[flag].min():.3g}–{means.loc[flag].max():.3g} {label}"
                  for flag, label in ((False, "without offsets"), (True, "with"))]
        lines.append(f"{metric}: {', '.join(ranges)} ({done[x].nunique()} values of {x})")
    return lines
