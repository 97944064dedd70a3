"""The linear model f(x) = Θᵀx, packed over runs."""

from __future__ import annotations

import math

import torch

from symrun.models.nets.base import PackedModel, Params
from symrun.models.linear import LinearConfig


class Linear(PackedModel):
    """f(x) = Θᵀx with w = Θᵀ (R, o, d), torch.nn.Linear's layout. It has no mirror of its own: a
    constraint OᵀΘ = 0 is `constraint=dcs` on w (symrun.training.reparam), which measures it and,
    enforced, adds the DCS sign mirrors (docs/theory.md §6)."""

    def __init__(self, cfg: LinearConfig, in_dim: int, out_dim: int):
        self.cfg, self.d, self.o = cfg, in_dim, out_dim

    def shapes(self):
        return {"w": ((self.o, self.d), self.cfg.init_scale / math.sqrt(self.d))}

    def example_width(self):
        return self.d + self.o

    def forward(self, params, x):
        return x @ params["w"].mT                                        # (R, B, o)

    def run_state(self, params: Params, r: int) -> dict[str, torch.Tensor]:
        """Also Θ itself, (d, o)."""
        return {**super().run_state(params, r), "theta": params["w"][r].mT.detach().cpu().clone()}
