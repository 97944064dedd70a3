"""`symrun check`: does the composed model really have the mirrors it declares?

At random parameters, on a real batch of the configured data, in float64, for the trained
objective L(ρ) = loss + (λ/2)‖ρ‖² (ρ: what the optimiser trains, symrun.training.reparam), each mirror
R = I − 2OOᵀ of each symmetry is tested for the three parts of Theorem 1 (docs/theory.md §2):

1. invariance: |L(ρ) − L(Rρ)| ≤ tol · max(1, |L(ρ)|);
2. on the constraint set, at ρ₀ = (I − OOᵀ)ρ: ‖Oᵀ∇L(ρ₀)‖ ≤ tol · ‖∇L(ρ₀)‖;
3. there the Hessian is block-diagonal: ‖Oᵀ H (I − OOᵀ)v‖ ≤ tol · ‖H (I − OOᵀ)v‖ for a random v
   (one Hessian-vector product).

Besides the declared mirrors it tries *candidates* the model did not declare (a sign flip and a
swap of every neuron set, a rotation of a residual factorization, every mirror under symmetry
removal) and reports which hold: a ReLU or GELU net's neuron sign flips fail, a tanh net's hold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from symrun import data as data_mod
from symrun import models
from symrun.training import reparam
from symrun.config import Config
from symrun.analysis.critical import hvp_at
from symrun.models.nets.discover import as_declaration
from symrun.training.loss import loss_per_run
from symrun.seeds import generator
from symrun.analysis.symmetries import Rotation, SignFlip, Symmetry, kind, mirror_count, project, reflect, select

TOLERANCE = 1e-9     # relative, float64: round-off of these checks is ~1e-14 on the models symrun has
BATCH = 256          # examples in the batch the loss is evaluated on (fewer if the data has fewer)


@dataclass
class SymmetryCheck:
    symmetry: str                       # e.g. "flip layer0" (see describe)
    kind: str                           # rescaling | permutation | rotation
    declared: bool
    mirrors: int                        # how many of its mirrors were tried
    of: int                             # how many it has
    invariance: float                   # max |L(ρ) − L(Rρ)| / max(1, |L|)
    gradient: Optional[float] = None    # max ‖Oᵀ∇L(ρ₀)‖ / ‖∇L(ρ₀)‖
    hessian: Optional[float] = None     # max ‖OᵀH(I − OOᵀ)v‖ / ‖H(I − OOᵀ)v‖
    holds: bool = False
    declaration: dict = field(default_factory=dict)   # as model.mirrors declares it (symrun.models.module)


@dataclass
class CheckReport:
    model: str
    parameters: dict[str, list[int]]    # trained parameter → per-run shape
    batch: int
    tolerance: float
    checks: list[SymmetryCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every declared mirror holds."""
        return all(c.holds for c in self.checks if c.declared)

    def holding(self) -> list[dict]:
        """Every mirror that holds, declared or found, as model.mirrors declares it: what
        `symrun check --discover` proposes."""
        return [c.declaration for c in self.checks if c.holds]

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def describe(sym: Symmetry) -> str:
    """'flip layer0' (a sign flip per neuron), 'swap layer0' (per pair), 'rotate U·W'."""
    if isinstance(sym, Rotation):     # a shared prefix once: rotate layers.0.query·key
        prefix = sym.left.rpartition(".")[0] + "." if "." in sym.left else ""
        right = sym.right.removeprefix(prefix) if prefix and sym.right.startswith(prefix) else sym.right
        return f"rotate {sym.left}·{right}"
    return f"{'flip' if isinstance(sym, SignFlip) else 'swap'} {sym.neurons.name}"


def random_point(rp: reparam.Reparam, seed: int) -> dict[str, torch.Tensor]:
    """The run's initial ρ, moved by N(0, 0.3²) per entry so that no coordinate sits at a special
    value (zero biases, v = 1) that could hide a broken symmetry."""
    g = generator(seed, "check")
    start = rp.init([seed], torch.device("cpu"), torch.float64)
    return {k: v.detach() + 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in start.items()}


def real_batch(ds: data_mod.Dataset, cfg: Config, seed: int):
    """A random batch of the training set (data.batch_size examples, at most BATCH)."""
    size = min(cfg.data.batch_size or len(ds.x), BATCH, len(ds.x))
    idx = torch.randperm(len(ds.x), generator=generator(seed, "check-batch"))[:size]
    x = torch.as_tensor(ds.x, dtype=torch.float64)[idx]
    y = torch.as_tensor(ds.y, dtype=torch.long if ds.task == "classification" else torch.float64)[idx]
    return x, y


def check_symmetry(sym: Symmetry, declared: bool, objective, point, mirrors: int, seed: int) -> SymmetryCheck:
    total = mirror_count(sym, point)
    picks = torch.randperm(total, generator=generator(seed, "check-mirrors"))[:mirrors]
    base = objective(point)
    scale = max(1.0, abs(float(base)))
    inv, grad, hess = 0.0, 0.0, 0.0
    for j in picks.tolist():
        mirror = select(sym, point, torch.tensor([j]))
        inv = max(inv, abs(float(objective(reflect(mirror, point)) - base)) / scale)
    result = SymmetryCheck(describe(sym), kind(sym), declared, len(picks), total, inv, declaration=as_declaration(sym))
    if inv > TOLERANCE:
        return result
    g = generator(seed, "check-hvp")
    for j in picks.tolist():
        mirror = select(sym, point, torch.tensor([j]))
        on_set = project(mirror, point)
        leaves = {k: v.clone().requires_grad_() for k, v in on_set.items()}
        gradient = dict(zip(leaves, torch.autograd.grad(objective(leaves), list(leaves.values()))))
        grad = max(grad, _ratio(mirror.restrict(gradient), gradient))
        v = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in point.items()}
        hv = hvp_at(lambda p: objective(p).reshape(1), on_set)(project(mirror, v))
        hess = max(hess, _ratio(mirror.restrict(hv), hv))
    result.gradient, result.hessian = grad, hess
    result.holds = grad <= TOLERANCE and hess <= TOLERANCE
    return result


def _ratio(part: torch.Tensor, whole: dict[str, torch.Tensor]) -> float:
    norm = sum(float(t.pow(2).sum()) for t in whole.values()) ** 0.5
    return float(part.norm()) / max(norm, 1e-300)


def run(cfg: Config, mirrors: int = 8) -> CheckReport:
    """Check every declared mirror and every candidate of the model `cfg` composes."""
    ds = data_mod.load(cfg.data)
    model = models.build(cfg.model, ds.in_dim, ds.out_dim)
    rp = reparam.build(cfg, model)
    point = random_point(rp, cfg.seed)
    x, y = real_batch(ds, cfg, cfg.seed)
    lam = cfg.optim.weight_decay if cfg.optim.name != "adamw" else 0.0   # adamw's decay is not in the loss

    def objective(p):
        penalty = sum(t.pow(2).sum() for t in p.values())
        return loss_per_run(model.forward(rp.network(p), x), y, ds.task).sum() + lam / 2 * penalty

    report = CheckReport(cfg.model.name, {k: list(v.shape[1:]) for k, v in point.items()}, len(x), TOLERANCE)
    for declared, syms in ((True, rp.symmetries()), (False, rp.candidates())):
        for sym in syms:
            report.checks.append(check_symmetry(sym, declared, objective, point, mirrors, cfg.seed))
    return report
