"""model=mlp and model=ensemble: fully connected nets. Permutation mirrors of each hidden layer's
neurons → identical neurons; with tanh (odd) also a sign mirror per neuron → dead neurons, with the
closed-form threshold λ_c = ‖E[xyᵀ]‖ (docs/theory.md §5.3). An ensemble's members can be swapped."""

from __future__ import annotations

from dataclasses import dataclass

from symrun.config import ModelConfig
from symrun.models.registry import ModelSpec

ACTIVATIONS = ("tanh", "relu", "gelu")


@dataclass
class MLPConfig(ModelConfig):
    """Fully connected net: permutation symmetry of neurons; tanh adds a sign mirror per neuron."""

    name: str = "mlp"
    width: int = 32
    depth: int = 1
    """Number of hidden layers."""
    activation: str = "tanh"
    """tanh | relu | gelu."""
    bias: bool = True


@dataclass
class EnsembleConfig(MLPConfig):
    """`members` MLPs whose outputs are averaged: permutation symmetry of whole members."""

    name: str = "ensemble"
    members: int = 4


def checks(cfg):
    m = cfg.model
    return [
        (m.width >= 1, f"model.width must be >= 1, got {m.width}"),
        (m.depth >= 1, f"model.depth must be >= 1, got {m.depth}"),
        (m.activation in ACTIVATIONS, f"model.activation must be one of {', '.join(ACTIVATIONS)}, got '{m.activation}'"),
    ]


def ensemble_checks(cfg):
    return checks(cfg) + [(cfg.model.members >= 2, f"model.members must be >= 2, got {cfg.model.members}")]


def theory(cfg, ds, metric: str, grid):
    """A tanh net's dead-neuron threshold: above λ_c = ‖E[xyᵀ]‖ every neuron is dead."""
    from symrun.analysis import theory as closed

    if metric == "sparsity" and cfg.model.activation == "tanh":
        return closed.dead_neuron_threshold(ds), None, "λ_c = ‖E[xyᵀ]‖ (all neurons dead above)"
    return None


def boundary(cfg, ds, metric: str):
    """‖E[xyᵀ]‖ for a tanh net: every neuron is dead above it."""
    line = theory(cfg, ds, metric, None)
    return (line[0], "‖E[xyᵀ]‖ (all dead above)") if line is not None else None


SPECS = (
    ModelSpec("mlp", MLPConfig, "symrun.models.nets.mlp:MLP", primary=("sparsity", "independent_fraction", "nc1", "nc3"),
              checks=checks, theory=theory, boundary=boundary),
    ModelSpec("ensemble", EnsembleConfig, "symrun.models.nets.mlp:MLP",
              primary=("independent_fraction", "ensemble_disagreement", "ensemble_spread"), checks=ensemble_checks),
)
