"""model=linear: f(x) = Θᵀx. A linear constraint OᵀΘ = 0 on it is `constraint=dcs` on its
parameter `w`, measured and (`constraint.enforce`) made exact by DCS (docs/theory.md §6)."""

from __future__ import annotations

from dataclasses import dataclass

from symrun.config import ModelConfig
from symrun.models.registry import ModelSpec


@dataclass
class LinearConfig(ModelConfig):
    """f(x) = Θᵀx (d → o), Θ stored as w (o, d) like torch.nn.Linear's weight, so a constraint's
    `per=output` is each output's coefficients (`constraint=dcs constraint.kind=sum_zero
    'constraint.params=[w]'`: Σᵢ Θᵢⱼ = 0 per output j)."""

    name: str = "linear"


SPEC = ModelSpec("linear", LinearConfig, "symrun.models.nets.linear:Linear", primary=("constraint_violation",))
