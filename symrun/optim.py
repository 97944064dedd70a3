"""Optimisers on stacked parameters with per-run hyperparameters.

`torch.optim` holds one lr / weight decay per parameter group, and a stacked (R, ...) tensor is a
single parameter, so symrun updates the stacked tensors itself with per-run tensors of shape (R,).
Conventions (shared/science.md §1): coupled L2 for sgd and adam (gradient + λθ, as torch.optim.SGD
/ Adam with weight_decay); decoupled for adamw (θ ← θ − lr·λ·θ, as torch.optim.AdamW).
"""

from __future__ import annotations

import torch

from symrun.config import OptimConfig


def per_run(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape (R,) so it broadcasts against a stacked (R, ...) tensor."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class PackedOptimizer:
    """SGD (heavy-ball momentum), Adam or AdamW over a dict of stacked parameters."""

    def __init__(self, cfg: OptimConfig, params: dict[str, torch.Tensor], lr, weight_decay, momentum):
        self.name, self.betas, self.eps = cfg.name, tuple(cfg.betas), cfg.eps
        self.lr, self.wd, self.mom = lr, weight_decay, momentum           # each (R,)
        self.has_momentum = bool((momentum > 0).any())
        self.state = {k: {} for k in params}
        self.t = 0

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        self.t += 1
        for k, p in params.items():
            g, lr, wd = grads[k], per_run(self.lr, p), per_run(self.wd, p)
            st = self.state[k]
            if self.name == "sgd":
                # One formula for every run, so a run's float path never depends on its pack-mates:
                # with μ = 0 the buffer is 0·buf + g exactly, i.e. plain SGD.
                g = torch.addcmul(g, wd, p)                   # g + λθ in one pass
                if self.has_momentum:
                    if "buf" in st:
                        st["buf"].mul_(per_run(self.mom, p)).add_(g)
                    else:
                        st["buf"] = g.clone()  # torch.optim.SGD: the first step's buffer is the gradient
                    g = st["buf"]
                p.addcmul_(lr, g, value=-1)                   # θ − lr·g in one pass
                continue
            if self.name == "adam":
                g = g + wd * p
            else:  # adamw: decoupled decay before the adaptive step
                p.mul_(1 - lr * wd)
            b1, b2 = self.betas
            m = st.setdefault("m", torch.zeros_like(p)).mul_(b1).add_(g, alpha=1 - b1)
            v = st.setdefault("v", torch.zeros_like(p)).mul_(b2).addcmul_(g, g, value=1 - b2)
            m_hat, v_hat = m / (1 - b1**self.t), v / (1 - b2**self.t)
            p.sub_(lr * m_hat / (v_hat.sqrt() + self.eps))
