"""Critical weight decay of declared mirrors (shared/science.md §2, derived).

At θ₀ = (I − OOᵀ)θ, the nearest point of a mirror's constraint set, the gradient has no
O-component (Theorem 1.1) and the Hessian is block-diagonal, so with weight decay λ the set is
a local minimum in the O-directions iff Oᵀ∇²L(θ₀)O + λI ⪰ 0, i.e. λ ≥ λ_c with

    λ_c = −λ_min(Oᵀ ∇²L(θ₀) O),    L the loss without weight decay.

Closed forms it reproduces (tests/test_critical.py): a dead tanh neuron, λ_c = ‖E[x̃(y − f₋ᵢ)ᵀ]‖₂
(x̃ = x, plus a 1 with a bias); a Hadamard coordinate, λ_c = |Xᵀr/n|ᵢ — the thresholds of
symrun.theory in the same λ convention (half-MSE, penalty (λ/2)‖θ‖²).

Oᵀ∇²L O is built from Hessian-vector products (double backward through one retained graph per
θ₀) and solved exactly with eigh when its size k ≤ `block`; larger blocks get `block` steps of
Lanczos with full reorthogonalisation, whose smallest Ritz value converges to λ_min from above.
Everything is batched over the runs of a pack: the pack's loss is a sum of per-run losses, so
the Hessian is block-diagonal across runs and one product serves every run.
"""

from __future__ import annotations

from typing import Callable

import torch

from symrun.config import MetricsConfig
from symrun.metrics import finite_runs, zero_runs
from symrun.symmetries import Mirror, Symmetry, constraint_norms, kind, project, select

Params = dict[str, torch.Tensor]
CHUNK = 4096          # runs × examples per Hessian pass at the end of a run (bounds its memory)
LossFn = Callable[[Params], torch.Tensor]           # ρ → per-run loss (R,)


def hvp_at(loss_fn: LossFn, point: Params) -> Callable[[Params], Params]:
    """v ↦ ∇²L(point) v for every run at once (one graph, reused for each product)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in point.items()}
    grads = torch.autograd.grad(loss_fn(leaves).sum(), list(leaves.values()), create_graph=True, allow_unused=True)
    pairs = [(k, g) for k, g in zip(leaves, grads) if g is not None]

    def hvp(v: Params) -> Params:
        dot = sum((g * v[k]).sum() for k, g in pairs)
        out = torch.autograd.grad(dot, [leaves[k] for k, _ in pairs], retain_graph=True, allow_unused=True)
        full = {k: torch.zeros_like(t) for k, t in leaves.items()}
        full.update({k: h for (k, _), h in zip(pairs, out) if h is not None})
        return full

    return hvp


def restricted_matvec(mirror: Mirror, hvp) -> Callable[[torch.Tensor], torch.Tensor]:
    """c ↦ Oᵀ H O c, (R, k) → (R, k)."""
    return lambda c: mirror.restrict(hvp(mirror.embed(c)))


def block(matvec, runs: int, k: int, dtype, device) -> torch.Tensor:
    """Oᵀ H O as (R, k, k), column by column, symmetrised."""
    eye = torch.eye(k, dtype=dtype, device=device)
    cols = torch.stack([matvec(eye[c].expand(runs, k)) for c in range(k)], dim=-1)
    return (cols + cols.mT) / 2


def lanczos_min(matvec, runs: int, k: int, steps: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """Smallest eigenvalue of a symmetric (R, k, k) operator given as a batched matvec, by `steps`
    Lanczos steps with full reorthogonalisation (a vanished residual restarts from a random vector
    orthogonal to the Krylov basis, so the Ritz values stay eigenvalues of the operator)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    # One start vector for every run: a run's value must not depend on its place in the pack.
    rand = lambda: torch.randn(k, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).expand(runs, k)  # noqa: E731
    basis, alphas, betas = [], [], []
    q = rand()
    for step in range(min(steps, k)):
        for b in basis:                                   # orthogonalise (also the restart vectors)
            q = q - (q * b).sum(-1, keepdim=True) * b
        q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        basis.append(q)
        z = matvec(q)
        alphas.append((q * z).sum(-1))
        for b in basis:
            z = z - (z * b).sum(-1, keepdim=True) * b
        beta = z.norm(dim=-1)
        if step + 1 < min(steps, k):
            betas.append(beta)
            dead = beta <= 1e-12 * alphas[-1].abs().clamp_min(1.0)
            q = torch.where(dead.unsqueeze(-1), rand(), z)
            betas[-1] = torch.where(dead, torch.zeros_like(beta), beta)
    t = torch.diag_embed(torch.stack(alphas, -1))
    if betas:
        off = torch.diag_embed(torch.stack(betas, -1), offset=1)
        t = t + off + off.mT
    return torch.linalg.eigvalsh(t)[..., 0]


def threshold(loss_fn: LossFn, mirror: Mirror, params: Params, block_size: int) -> torch.Tensor:
    """λ_c of one mirror per run at its projected point: (R,)."""
    point = project(mirror, params)
    ref = next(iter(params.values()))
    runs = ref.shape[0]
    matvec = restricted_matvec(mirror, hvp_at(loss_fn, point))
    if mirror.size <= block_size:
        lam_min = torch.linalg.eigvalsh(block(matvec, runs, mirror.size, ref.dtype, ref.device))[..., 0]
    else:
        lam_min = lanczos_min(matvec, runs, mirror.size, block_size, ref.dtype, ref.device)
    return -lam_min.detach()


def thresholds(loss_fn: LossFn, symmetries: list[Symmetry], params: Params, limit: int,
               block_size: int) -> dict[str, torch.Tensor]:
    """λ_c per kind (rescaling / permutation / rotation): (R, n) over up to `limit` mirrors of
    each declared symmetry, those nearest their constraint (smallest ‖Oᵀθ‖) in each run."""
    out: dict[str, list[torch.Tensor]] = {}
    params = {k: v.detach() for k, v in params.items()}
    for sym in symmetries:
        order = constraint_norms(sym, params).argsort(dim=1)[:, :limit]     # (R, n)
        for slot in range(order.shape[1]):
            mirror = select(sym, params, order[:, slot])
            out.setdefault(kind(sym), []).append(threshold(loss_fn, mirror, params, block_size))
    return {name: torch.stack(values, dim=1) for name, values in out.items()}


def summarize(per_kind: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Columns critical_wd_{min,median,max}.<kind>, each (R,)."""
    out = {}
    for name, values in sorted(per_kind.items()):
        out[f"critical_wd_min.{name}"] = values.min(dim=1).values
        out[f"critical_wd_median.{name}"] = values.median(dim=1).values
        out[f"critical_wd_max.{name}"] = values.max(dim=1).values
    return out


def at_end(model, rp, raw: Params, x, y, task: str, cfg: MetricsConfig, alive: torch.Tensor) -> dict[str, torch.Tensor]:
    """The end-of-run columns, in float64 on the training set (no noise); runs that diverged
    (`alive` false) or whose parameters are not finite get NaN, and are measured at 0 so that
    they cannot stop the others. Empty when `metrics.critical_mirrors` = 0 or nothing is declared."""
    from symrun.engine import loss_per_run      # the engine imports this module

    symmetries = rp.symmetries()
    if cfg.critical_mirrors == 0 or not symmetries or not model.second_order:
        return {}
    x, y = x[: cfg.critical_examples], y[: cfg.critical_examples]
    raw = {k: v.detach().double() for k, v in raw.items()}
    finite = finite_runs(raw) & alive                                                         # (R,)
    safe = {k: zero_runs(p, finite) for k, p in raw.items()}
    xd, yd = x.double(), (y if task == "classification" else y.double())
    loss_fn = lambda p: loss_per_run(model.forward(rp.network(p), xd), yd, task)  # noqa: E731
    # Runs are independent (a block-diagonal Hessian), so they go in chunks that bound memory.
    runs, chunk = len(finite), max(1, CHUNK // max(1, len(xd)))
    parts = [summarize(thresholds(loss_fn, symmetries, {k: v[i:i + chunk] for k, v in safe.items()},
                                  cfg.critical_mirrors, cfg.critical_block)) for i in range(0, runs, chunk)]
    cols = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return {k: torch.where(finite, v, torch.full_like(v, float("nan"))) for k, v in cols.items()}
