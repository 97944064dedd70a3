"""model=linear: f(x) = Θᵀx with an optional linear constraint OᵀΘ = 0, measured as
constraint_violation and enforced by DCS with `model.dcs` (docs/theory.md §6)."""

from __future__ import annotations

from dataclasses import dataclass

from symrun.config import ModelConfig
from symrun.models.registry import ModelSpec

CONSTRAINTS = ("none", "sum_to_zero", "prefix")


@dataclass
class LinearConfig(ModelConfig):
    """f(x) = Θᵀx (d → o), optionally with a linear constraint OᵀΘ = 0 enforced by DCS
    (docs/theory.md §6): Θ = (I − OOᵀ)w + O(u⊙v), whose (uᵢ, vᵢ) sign mirrors make c = OᵀΘ
    exactly 0 once the weight decay λ ≥ |∂ℓ/∂c| at c = 0."""

    name: str = "linear"
    constraint: str = "none"
    """none | sum_to_zero (O = 1/√d: Σᵢ Θᵢⱼ = 0 per output) | prefix (O = e₁…e_k: the first
    `constrained` coefficients are 0). Its violation ‖OᵀΘ‖ is reported as constraint_violation."""
    constrained: int = 1
    """prefix: k, the number of leading input coefficients constrained to 0 (1 ≤ k ≤ d)."""
    dcs: bool = False
    """Enforce the constraint by DCS; false = plain Θ = w (the unconstrained baseline)."""


def checks(cfg):
    m = cfg.model
    return [
        (m.constraint in CONSTRAINTS, f"model.constraint must be one of {', '.join(CONSTRAINTS)}, got '{m.constraint}'"),
        (m.constraint != "prefix" or m.constrained >= 1, f"model.constrained must be >= 1, got {m.constrained}"),
        (not m.dcs or m.constraint != "none", "model.dcs=true needs a model.constraint (sum_to_zero or prefix)"),
        (cfg.constraint.name == "none" or m.constraint == "none",
         "model=linear has its own model.constraint; use it or constraint=dcs, not both"),
    ]


SPEC = ModelSpec("linear", LinearConfig, "symrun.models.nets.linear:Linear", primary=("constraint_violation",),
                 checks=checks)
