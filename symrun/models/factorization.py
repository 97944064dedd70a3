"""model=factorization: f(x) = UWx, rotation mirrors of the inner space → low rank
(docs/theory.md §5.2); `residual` is the symmetry-breaking control U(Wx + x)."""

from __future__ import annotations

from dataclasses import dataclass

from symrun.config import ModelConfig
from symrun.models.registry import ModelSpec


@dataclass
class FactorizationConfig(ModelConfig):
    """f(x) = U W x (or U(Wx + x) with `residual`): rotation symmetry → low rank."""

    name: str = "factorization"
    hidden: int = 16
    """Inner dimension h of U (d_out × h) and W (h × d_in)."""
    residual: bool = False
    """Symmetry-breaking control f(x) = U(Wx + x); needs hidden == input dimension."""


def checks(cfg):
    return [(cfg.model.hidden >= 1, f"model.hidden must be >= 1, got {cfg.model.hidden}")]


def theory(cfg, ds, metric: str, grid):
    """Singular-value soft-thresholding of the least-squares map, on whitened inputs."""
    from symrun.analysis import theory as closed

    if metric == "rank" and not cfg.model.residual and getattr(cfg.data, "whiten", False):
        return grid, closed.svt_rank(ds, grid, cfg.model.hidden), "singular-value soft-thresholding (closed form)"
    return None


def boundary(cfg, ds, metric: str):
    """σ₁(YᵀX/n) on whitened inputs: the map is rank 0 above it."""
    from symrun.analysis import theory as closed

    if metric == "rank" and not cfg.model.residual and getattr(cfg.data, "whiten", False):
        return float(closed.svt_singular_values(ds.x, ds.y, 0.0)[0]), "σ₁(YᵀX/n) (rank 0 above)"
    return None


SPEC = ModelSpec("factorization", FactorizationConfig, "symrun.models.nets.factorization:Factorization",
                 primary=("rank",), checks=checks, theory=theory, boundary=boundary)
