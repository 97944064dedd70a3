"""The factorization f(x) = UWx (or U(Wx + x)), packed over runs (docs/theory.md §5.2)."""

from __future__ import annotations

import math

import torch

from symrun.models.nets.base import PackedModel
from symrun.config import ConfigError
from symrun.models.factorization import FactorizationConfig
from symrun.analysis.symmetries import Rotation


class Factorization(PackedModel):
    """f(x) = U W x, or U(Wx + x) with `residual` (the symmetry-breaking control of the paper's
    Fig. 1); rotation mirrors in the inner space → low rank (docs/theory.md §5.2)."""

    def __init__(self, cfg: FactorizationConfig, in_dim: int, out_dim: int):
        if cfg.residual and cfg.hidden != in_dim:
            raise ConfigError(f"model.residual needs model.hidden == input dimension ({in_dim}), got {cfg.hidden}")
        self.cfg, self.d, self.o, self.h = cfg, in_dim, out_dim, cfg.hidden

    def shapes(self):
        s = self.cfg.init_scale
        return {"U": ((self.o, self.h), s / math.sqrt(self.h)), "W": ((self.h, self.d), s / math.sqrt(self.d))}

    def example_width(self):
        return self.d + self.h + self.o

    def forward(self, params, x):
        w, u = params["W"], params["U"]                      # (R, h, d), (R, o, h)
        if x.dim() == 2:        # a shared input (full batch): W x of every run as one GEMM, (R, h, B)
            r, h, d = w.shape
            z = (w.reshape(r * h, d) @ x.T).view(r, h, x.shape[0])
            if self.cfg.residual:
                z = z + x.T
            return (u @ z).mT                                # (R, B, o)
        z = x @ w.mT                                         # per-run minibatches (R, B, d) → (R, B, h)
        if self.cfg.residual:
            z = z + x
        return z @ u.mT                                      # (R, B, o)

    def symmetries(self):
        return [] if self.cfg.residual else [Rotation("U", "W")]

    def candidates(self):
        return [Rotation("U", "W")]

    def products(self, params):
        w = params["W"]
        if self.cfg.residual:
            w = w + torch.eye(self.d, dtype=w.dtype, device=w.device)
        return {"": params["U"] @ w}

    def balance_pair(self, params):
        return None if self.cfg.residual else (params["U"], params["W"])

