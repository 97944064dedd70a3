"""The paper's notation for settings and metrics, defined once: every axis, legend entry, table
header and report line takes its label from here (docs/theory.md §1 for the symbols).

A setting without an entry keeps its key (`model.width`), so nothing is ever unlabelled.
"""

from __future__ import annotations

import math

# setting → (symbol, words). The symbol is what a legend or table header shows; the words name
# the axis ("weight decay λ").
SETTINGS: dict[str, tuple[str, str]] = {
    "optim.weight_decay": ("λ", "weight decay"),
    "optim.lr": ("η", "learning rate"),
    "optim.momentum": ("μ", "momentum"),
    "optim.schedule": ("schedule", "lr schedule"),
    "optim.gamma": ("γ", "lr drop factor"),
    "optim.milestones": ("drop after", "lr drop steps"),
    "optim.warmup": ("warm-up", "warm-up steps"),
    "optim.lr_min": ("η_min", "final learning rate"),
    "noise.label_std": ("σ", "label noise"),
    "noise.label_flip": ("p", "label flip probability"),
    "noise.temperature": ("T", "Langevin temperature"),
    "data.batch_size": ("B", "batch size"),
    "data.n": ("n", "training examples"),
    "symmetry.remove": ("offsets", "symmetry removal"),
    "tasks.shrink": ("shrink", "shrink"),
    "tasks.perturb": ("perturb", "perturb"),
    "model.name": ("model", "model"),
    "model.residual": ("residual", "residual"),
    "constraint.enforce": ("DCS", "DCS"),
    "model.dcs": ("DCS", "DCS"),           # sweeps made before constraint.enforce
    "model.activation": ("activation", "activation"),
    "train.steps": ("steps", "training steps"),
    "seed": ("seed", "seed"),
    "step": ("t", "step"),
    "task": ("task", "task"),
}

# metric → how an axis names it (the column itself is kept in tables and file names)
METRICS: dict[str, str] = {
    "sparsity": "sparsity (fraction of dead groups)",
    "rank": "rank",
    "effective_rank": "effective rank",
    "independent_fraction": "independent fraction",
    "member_independent_fraction": "independent members",
    "ensemble_spread": "ensemble spread",
    "ensemble_disagreement": "ensemble disagreement",
    "constraint_violation": "constraint violation ‖OᵀΘ‖",
    "dead_fraction": "dead channels",
    "dead_units": "dead units",
    "feature_effective_rank": "feature effective rank",
    "train_loss": "train loss",
    "test_loss": "test loss",
    "accuracy": "test accuracy",
    "train_accuracy": "train accuracy",
    "weight_norm": "‖θ‖",
    "nc1": "NC1",
    "nc3": "NC3",
    "lr": "learning rate η",
}


def column(metric: str, qualifier: str = "") -> str:
    """The column of a metric, qualified by what it was measured on when there are several: the
    plain name (`rank`, over all of them), or `<metric>.<qualifier>` — `rank.layer0`,
    `rank.layer1.head0`, `critical_wd_max.rescaling`, `constraint_fraction.rescaling`. Every
    metric column symrun writes is named here (symrun.analysis.metrics.column is this)."""
    return f"{metric}.{qualifier}" if qualifier else metric


def symbol(key: str) -> str:
    """λ for optim.weight_decay; the key itself when it has no symbol."""
    return SETTINGS.get(key, (key, key))[0]


def axis(key: str) -> str:
    """An axis label: 'weight decay λ'; a setting without notation keeps its key."""
    sym, words = SETTINGS.get(key, (key, key))
    return f"{words} {sym}" if len(sym) <= 2 else words      # a symbol (λ, B), not a word


def metric(name: str) -> str:
    return METRICS.get(name, name.replace("_", " "))


def value(v) -> str:
    """A setting's value as the user wrote it: null for None/NaN, 4 rather than 4.0, yes/no for
    booleans, three significant digits for other floats."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "null"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else f"{v:.3g}"
    return str(v)


def setting(key: str, v) -> str:
    """One setting at one value, as a legend entry: 'σ = 0.5', 'batch size B = null' reads
    'B = full batch', a boolean 'offsets: yes'."""
    if isinstance(v, (bool,)) or key == "symmetry.remove":
        return f"{symbol(key)}: {value(_bool(v))}"
    if key == "data.batch_size" and value(v) == "null":
        return f"{symbol(key)} = full batch"
    return f"{symbol(key)} = {value(v)}"


def _bool(v):
    if isinstance(v, str):
        return v.strip().lower() in ("true", "1", "yes")
    return bool(v) if v is not None and v == v else v


def settings(keys: list[str], values) -> str:
    """Several settings at once: 'σ = 1, B = 16'."""
    return ", ".join(setting(k, v) for k, v in zip(keys, values))


def plural(n: int, word: str) -> str:
    """'1 seed', '3 seeds'."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
