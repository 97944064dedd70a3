"""model=hadamard: f(x) = (u ⊙ w)ᵀx, a sign mirror per coordinate → sparsity; with weight decay λ,
u ⊙ w solves the lasso with penalty λ‖·‖₁ (docs/theory.md §5.1)."""

from __future__ import annotations

from dataclasses import dataclass

from symrun.config import ModelConfig
from symrun.models.registry import ModelSpec


@dataclass
class HadamardConfig(ModelConfig):
    """f(x) = (u ⊙ w)ᵀx: rescaling (sign) symmetry per coordinate → sparsity (lasso)."""

    name: str = "hadamard"


def theory(cfg, ds, metric: str, grid):
    """The lasso's sparsity on the same data (the Hadamard model *is* a lasso solver)."""
    from symrun.analysis import theory as closed

    if metric == "sparsity":
        return grid, closed.lasso_sparsity(ds, grid), "lasso solution (closed form)"
    return None


def boundary(cfg, ds, metric: str):
    """The lasso's λ_max = ‖Xᵀy/n‖∞: every coefficient is zero above it."""
    from symrun.analysis import theory as closed

    return (closed.lasso_threshold(ds.x, ds.y), "lasso λ_max (all zero above)") if metric == "sparsity" else None


SPEC = ModelSpec("hadamard", HadamardConfig, "symrun.models.nets.hadamard:Hadamard", primary=("sparsity",),
                 theory=theory, boundary=boundary)
