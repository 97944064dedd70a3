"""Optimisers on stacked parameters with per-run hyperparameters.

`torch.optim` holds one lr / weight decay per parameter group, and a stacked (R, ...) tensor is a
single parameter, so symrun updates the stacked tensors itself with per-run tensors of shape (R,).
Conventions (docs/theory.md §1): coupled L2 for sgd and adam (gradient + λθ, as torch.optim.SGD
/ Adam with weight_decay); decoupled for adamw (θ ← θ − lr·λ·θ, as torch.optim.AdamW).
"""

from __future__ import annotations

import math
from typing import Optional

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

    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], live: torch.Tensor) -> torch.Tensor:
        """One update of every run: `advance`, then `update` over the whole pack."""
        self.advance(params)
        return self.update(params, grads, live)

    @torch.no_grad()
    def advance(self, params: dict[str, torch.Tensor]) -> None:
        """Start a step: count it, and give every run its state buffers, so that the step's
        updates may then go in shards of runs side by side (symrun.training.shards). Buffers start
        at zero: momentum's 0·μ + g is g exactly, torch.optim.SGD's first buffer."""
        self.t += 1
        names = ("buf",) if self.name == "sgd" and self.has_momentum else () if self.name == "sgd" else ("m", "v")
        for k, p in params.items():
            for name in names:
                if name not in self.state[k]:
                    self.state[k][name] = torch.zeros_like(p, memory_format=torch.contiguous_format)

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], live: torch.Tensor,
               runs: slice = slice(None)) -> torch.Tensor:
        """The update of the runs in `live` whose step is finite; every other run keeps its
        parameters exactly (a diverging run stays at its last finite point, and nothing of it
        reaches a neighbour's slice). `params` are the pack's runs `runs` (all, or a shard's views),
        `grads` and `live` ((R,) bool) theirs. Returns the runs updated, (R,) bool.

        A step is finite when the per-run sum of its direction is (one read of each direction;
        a sum overflows only for steps of ~1e38, which diverge anyway). The common case, every run
        finite, is read back as one bool per step and then costs nothing more."""
        # Gradients autograd returned in storage of their own are scratch: the decay term is
        # added to them in place (a pass and an allocation saved). Two that share storage (a
        # parameter reached through another's add or cat) are left alone.
        owned = len({g.untyped_storage().data_ptr() for g in grads.values()}) == len(grads)
        steps = {k: self._direction(k, p, grads[k], owned, runs) for k, p in params.items()}
        updated = live.clone()
        for _, d in steps.values():
            updated &= d.flatten(1).sum(-1).isfinite()
        if not bool(updated.all()):
            for _, d in steps.values():
                d[~updated] = 0.0               # a frozen run's direction may be NaN: 0·NaN ≠ 0
        if self.name == "adamw":                # decoupled decay, of the updated runs only
            lr = self.lr[runs] * updated
            for p in params.values():
                p.mul_(1 - per_run(lr, p) * per_run(self.wd[runs], p))
        for k, p in params.items():
            scale, d = steps[k]
            if scale is None:
                p.sub_(d)
            else:
                p.addcmul_(scale, d, value=-1)   # θ − lr·d in one pass
        return updated

    def _direction(self, k: str, p: torch.Tensor, g: torch.Tensor, owned: bool = False,
                   runs: slice = slice(None)) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(scale, d) with this step's θ_new = θ − scale·d (scale None: θ − d), advancing the
        optimiser's state (its runs `runs`). `owned`: g may be overwritten."""
        lr, wd = per_run(self.lr[runs], p), per_run(self.wd[runs], p)
        st = {name: buffer[runs] for name, buffer in self.state[k].items()}
        if self.name == "sgd":
            # One formula for every run, so a run's float path never depends on its pack-mates:
            # with μ = 0 the buffer is 0·buf + g exactly, i.e. plain SGD.
            g = g.addcmul_(wd, p) if owned else torch.addcmul(g, wd, p)     # g + λθ in one pass
            if self.has_momentum:
                g = st["buf"].mul_(per_run(self.mom[runs], p)).add_(g)
            return lr, g
        if self.name == "adam":
            g = g + wd * p
        b1, b2 = self.betas
        m = st["m"].mul_(b1).add_(g, alpha=1 - b1)
        v = st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat, v_hat = m / (1 - b1**self.t), v / (1 - b2**self.t)
        return None, lr * m_hat / (v_hat.sqrt() + self.eps)


def warmup_factor(o: OptimConfig, t: int) -> float:
    """min(1, t / warmup) for step t = 1, 2, …; 1 without warm-up."""
    return min(1.0, t / o.warmup) if o.warmup > 0 else 1.0


def decay_terms(o: OptimConfig, t: int, total: int) -> tuple[float, float]:
    """(a, b) with the learning rate of step t = warm-up × (a·η + b·lr_min) (docs/theory.md §1):
    constant (1, 0); step (gamma^k, 0), k = #{m ∈ milestones : t > m}; cosine (c, 1 − c) with
    c = (1 + cos(π·p))/2, p = (t − warmup)/(total − warmup) clipped to [0, 1]."""
    if o.schedule == "step":
        return o.gamma ** sum(t > m for m in o.milestones), 0.0
    if o.schedule == "cosine":
        p = min(1.0, max(0.0, (t - o.warmup) / max(1, total - o.warmup)))
        c = (1 + math.cos(math.pi * p)) / 2
        return c, 1.0 - c
    return 1.0, 0.0


def lr_at(o: OptimConfig, t: int, total: int) -> float:
    """The learning rate of step t of a run that trains `total` steps."""
    a, b = decay_terms(o, t, total)
    return warmup_factor(o, t) * (a * o.lr + b * o.lr_min)


class Schedule:
    """Each run's learning rate, step by step, written into the optimiser's (R,) lr tensor: the
    engine's one place where the lr of a step is set. Runs share a term per distinct schedule,
    so a step costs a few Python floats, whatever the pack's size."""

    def __init__(self, cfgs: list[OptimConfig], total: int, like: torch.Tensor):
        kinds = [(o.schedule, o.warmup, tuple(o.milestones), o.gamma) for o in cfgs]
        self.distinct = list(dict.fromkeys(kinds))
        self.first = [cfgs[kinds.index(k)] for k in self.distinct]
        self.index = torch.tensor([self.distinct.index(k) for k in kinds], device=like.device)
        self.base = like.clone()                                                           # η, (R,)
        self.floor = torch.tensor([o.lr_min for o in cfgs], device=like.device, dtype=like.dtype)
        self.total = total
        self.constant = all(k[0] == "constant" and k[1] == 0 for k in self.distinct)

    def set(self, lr: torch.Tensor, t: int, alive: torch.Tensor) -> None:
        """lr ← the learning rate of step t for the live runs, 0 for the frozen ones. A constant
        schedule leaves lr as it is (η, and 0 where the engine froze a run): no cost per step."""
        if self.constant:
            return
        terms = [(warmup_factor(o, t), *decay_terms(o, t, self.total)) for o in self.first]
        w, a, b = torch.tensor(terms, device=lr.device, dtype=lr.dtype)[self.index].unbind(-1)
        lr.copy_(w * (a * self.base + b * self.floor))
        lr.masked_fill_(~alive, 0.0)
