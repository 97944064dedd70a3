"""The model registry: every model option symrun knows, each declared in one place.

A model option is a `ModelSpec`, declared by its own module under symrun/models/ (`SPEC` or
`SPECS`): its config dataclass (defaults and their documentation), where its packed network is
(imported only when a model is built, so configs, `symrun list` and `--help` never import
torch), the metrics its phase diagrams show, whether runs can be stacked into packs, what data
it reads, its checks of its own settings and its closed-form theory line, if any. The rest of
symrun — config validation, the engine, the planner, `symrun check`, the report — asks this
module and never names a model.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# The modules that declare the built-in options, in the order `symrun list` shows them.
BUILT_IN = ("hadamard", "factorization", "mlp", "attention", "linear", "resnet", "transformer", "module")

Check = tuple[bool, str]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """The option's name: `model=<name>`, and the column model.name."""
    config: type
    """Its config dataclass (a ModelConfig): defaults and documentation of `model.*`."""
    network: str
    """"package.module:Class" of its PackedModel, built as Class(cfg, in_dim, out_dim)."""
    primary: tuple[str, ...] = ()
    """The structure metrics its phase diagrams show, first (those a run logs)."""
    packs: bool = True
    """False: each run is a pack of its own (a network too large to stack)."""
    run_figures: bool = False
    """True: each run saves arrays for figures of its own (PackedModel.run_arrays), which the
    report draws beside them (symrun.analysis.report.run_figures)."""
    reads: Optional[str] = None
    """The one data option it reads, which in turn needs this model (transformer: text)."""
    checks: Callable[[Any], list[Check]] = field(default=lambda cfg: [])
    """Its settings' checks on a Config: (ok, one-line message) each; run at validation."""
    theory: Optional[Callable] = None
    """(cfg, dataset, metric, grid) → (x, y, label) of a closed form, (λ, None, label) for a
    threshold, or None; drawn on weight-decay phase diagrams (symrun.analysis.report)."""
    boundary: Optional[Callable] = None
    """(cfg, dataset, metric) → (λ, label): the weight decay above which the closed form says the
    structure is complete, or None; drawn on heatmaps over λ (symrun.analysis.agreement)."""
    node: Optional[Callable[[], Any]] = None
    """What Hydra's ConfigStore holds for it, when not the config dataclass itself."""


@functools.lru_cache(maxsize=None)
def specs() -> dict[str, ModelSpec]:
    """Every model option by name."""
    out: dict[str, ModelSpec] = {}
    for module in BUILT_IN:
        declared = importlib.import_module(f"symrun.models.{module}")
        for spec in getattr(declared, "SPECS", None) or (declared.SPEC,):
            out[spec.name] = spec
    return out


def spec(name: str) -> ModelSpec:
    """The spec of option `name` (KeyError if there is none)."""
    return specs()[name]


def options() -> dict[str, type]:
    """{option name: its config dataclass}."""
    return {name: s.config for name, s in specs().items()}


def names() -> list[str]:
    return list(specs())


def build(cfg, in_dim: int, out_dim: int):
    """The packed model (a PackedModel) a model config names, for data of these sizes."""
    s = spec(cfg.name)
    module, _, cls = s.network.partition(":")
    return getattr(importlib.import_module(module), cls)(cfg, in_dim, out_dim)
