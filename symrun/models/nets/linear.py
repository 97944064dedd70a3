"""The linear model f(x) = Θᵀx with an optional constraint OᵀΘ = 0, packed over runs."""

from __future__ import annotations

import math

import torch

from symrun.models.nets.base import PackedModel, Params
from symrun.config import ConfigError
from symrun.models.linear import LinearConfig
from symrun.training.reparam import Basis, dcs_theta
from symrun.analysis.symmetries import NeuronSet, SignFlip, Slot


class Linear(PackedModel):
    """f(x) = Θᵀx with Θ (R, d, o), and an optional linear constraint OᵀΘ = 0 (O: d × k,
    orthonormal columns). With `dcs` the constraint is enforced by DCS (docs/theory.md §6):
    Θ = (I − OOᵀ)w + O(u⊙v), w (R, d, o), u, v (R, k, o), weight decay on all three. Each pair
    (u_i, v_i) has a sign mirror whose constraint set is c_i = (OᵀΘ)_i = 0; by the L1 equivalence
    the penalty on c is λ‖c‖₁, so c is exactly 0 once λ ≥ |∂ℓ/∂c| at c = 0. Without `dcs`,
    Θ = w (the unconstrained baseline) and the constraint is only measured."""

    def __init__(self, cfg: LinearConfig, in_dim: int, out_dim: int):
        if cfg.constraint == "prefix" and not 1 <= cfg.constrained <= in_dim:
            raise ConfigError(f"model.constrained must be in [1, {in_dim}] (the input dimension), got {cfg.constrained}")
        self.cfg, self.d, self.o = cfg, in_dim, out_dim
        self.k = {"none": 0, "sum_to_zero": 1, "prefix": cfg.constrained}[cfg.constraint]

    def basis(self, like: torch.Tensor) -> torch.Tensor:
        """O (d, k) with orthonormal columns, in `like`'s dtype and device."""
        if self.cfg.constraint == "sum_to_zero":
            return torch.full((self.d, 1), 1 / math.sqrt(self.d), dtype=like.dtype, device=like.device)
        return torch.eye(self.d, self.k, dtype=like.dtype, device=like.device)

    def shapes(self):
        std = self.cfg.init_scale / math.sqrt(self.d)
        out = {"w": ((self.d, self.o), std)}
        if self.cfg.dcs:
            out.update(u=((self.k, self.o), std), v=((self.k, self.o), std))
        return out

    def theta(self, params: Params) -> torch.Tensor:
        """The effective coefficients Θ: (R, d, o)."""
        w = params["w"]
        if not self.cfg.dcs:
            return w
        o = self.basis(w)                                                # O acts on Θ's input axis
        return dcs_theta(w, params["u"], params["v"], Basis(self.k, lambda t: o.T @ t, lambda c: o @ c))

    def forward(self, params, x):
        return x @ self.theta(params)                                    # (R, B, o)

    def pairs(self) -> NeuronSet:
        return NeuronSet("constraint", (Slot("u", 1), Slot("v", 1)))

    def symmetries(self):
        return [SignFlip(self.pairs())] if self.cfg.dcs else []

    def constraint_violation(self, params):
        if self.k == 0:
            return None
        theta = self.theta({k: v.double() for k, v in params.items()})  # float64: no round-off floor at 1e-7
        return (self.basis(theta).T @ theta).flatten(1).norm(dim=-1)     # ‖OᵀΘ‖_F: (R,)

    def run_state(self, params, r):
        return {**super().run_state(params, r), "theta": self.theta(params)[r].detach().cpu().clone()}

