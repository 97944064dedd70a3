"""The Hadamard model f(x) = (u ⊙ w)ᵀx, packed over runs (docs/theory.md §5.1)."""

from __future__ import annotations

import math

from symrun.models.nets.base import PackedModel
from symrun.training.loss import loss_and_grad_t
from symrun.config import ConfigError
from symrun.models.hadamard import HadamardConfig
from symrun.analysis.symmetries import NeuronSet, SignFlip, Slot


class Hadamard(PackedModel):
    """f(x) = (u ⊙ w)ᵀx; each pair (uᵢ, wᵢ) has a sign mirror, and with weight decay λ the
    product u ⊙ w solves the lasso with penalty λ‖·‖₁ (docs/theory.md §5.1)."""

    def __init__(self, cfg: HadamardConfig, in_dim: int, out_dim: int):
        if out_dim != 1:
            raise ConfigError(f"model=hadamard needs a single regression target, the data has {out_dim} outputs")
        self.d, self.std = in_dim, cfg.init_scale / math.sqrt(in_dim)

    def shapes(self):
        return {"u": ((self.d,), self.std), "w": ((self.d,), self.std)}

    def example_width(self):
        return self.d + 1

    def forward(self, params, x):
        s = params["u"] * params["w"]                        # (R, d)
        if x.dim() == 2:        # a shared input (full batch): one GEMM for every run, not R broadcast ones
            return (s @ x.T).unsqueeze(-1)                   # (R, B, 1)
        return x @ s.unsqueeze(-1)                           # per-run minibatches (R, B, d) → (R, B, 1)

    def loss_and_grads(self, params, x, y, task):
        """∂L/∂u = w ⊙ g and ∂L/∂w = u ⊙ g, g = Xᵀ(f − y)/B the gradient in s = u ⊙ w."""
        u, w = params["u"], params["w"]
        loss, delta = loss_and_grad_t(self.forward(params, x).mT, y, task)               # δ: (R, 1, B)
        g = (delta @ x).squeeze(1)                                                       # (R, d)
        return loss, {"u": g * w, "w": g.mul_(u)}

    def coefficients(self) -> NeuronSet:
        return NeuronSet("coef", (Slot("u", 1), Slot("w", 1)))

    def symmetries(self):
        return [SignFlip(self.coefficients())]

    def neuron_sets(self):
        return [self.coefficients()]

    def balance_pair(self, params):
        return params["u"], params["w"]

