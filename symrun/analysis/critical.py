"""Critical weight decay of declared mirrors (docs/theory.md §2, derived).

At θ₀ = (I − OOᵀ)θ, the nearest point of a mirror's constraint set, the gradient has no
O-component (Theorem 1.1) and the Hessian is block-diagonal, so with weight decay λ the set is
a local minimum in the O-directions iff Oᵀ∇²L(θ₀)O + λI ⪰ 0, i.e. λ ≥ λ_c with

    λ_c = −λ_min(Oᵀ ∇²L(θ₀) O),    L the loss without weight decay.

Closed forms it reproduces (tests/test_critical.py): a dead tanh neuron, λ_c = ‖E[x̃(y − f₋ᵢ)ᵀ]‖₂
(x̃ = x, plus a 1 with a bias); a Hadamard coordinate, λ_c = |Xᵀr/n|ᵢ — the thresholds of
symrun.analysis.theory in the same λ convention (half-MSE, penalty (λ/2)‖θ‖²).

Where the model gives Oᵀ∇²L O in closed form (`mirror_blocks`: the hidden neurons of an MLP,
symrun.models.nets.curvature), it is solved whole with eigh. Otherwise it is built from Hessian-vector
products (double backward through one retained graph) and solved exactly with eigh when its size
k ≤ `block`; larger blocks get `block` steps of Lanczos with full reorthogonalisation, whose
smallest Ritz value converges to λ_min from above. Everything is batched: the pack's loss is a
sum of per-run losses, so the Hessian is block-diagonal across runs, and the M mirrors measured
per run are M virtual runs of one pack (`batched`), so one product serves every run and mirror.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from symrun.analysis import linalg
from symrun.training import memory
from symrun.config import MetricsConfig
from symrun.analysis.metrics import column, finite_runs, zero_runs
from symrun.training.loss import RunLoss
from symrun.analysis.symmetries import Mirror, Symmetry, constraint_norms, kind, mirror_size, project, select

Params = dict[str, torch.Tensor]
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
    return linalg.eigvalsh(t)[..., 0]


def threshold(loss_fn: LossFn, mirror: Mirror, params: Params, block_size: int) -> torch.Tensor:
    """λ_c of one mirror per run at its projected point: (R,)."""
    point = project(mirror, params)
    ref = next(iter(params.values()))
    runs = ref.shape[0]
    matvec = restricted_matvec(mirror, hvp_at(loss_fn, point))
    if mirror.size <= block_size:
        lam_min = linalg.eigvalsh(block(matvec, runs, mirror.size, ref.dtype, ref.device))[..., 0]
    else:
        lam_min = lanczos_min(matvec, runs, mirror.size, block_size, ref.dtype, ref.device)
    return -lam_min.detach()


def nearest(sym: Symmetry, params: Params, limit: int) -> torch.Tensor:
    """Each run's `limit` mirrors of `sym` nearest their constraint (smallest ‖Oᵀθ‖), as the
    mirror numbers of `constraint_norms`: (R, M), nearest first, and of mirrors equally near
    the lower number first (a stable sort's first M).

    Not by sorting every mirror (a layer of 128 neurons has 8,128 swaps a run): the M-th nearest
    distance comes from topk, and only the mirrors at most that far (M of them, more where
    several are equally far) are sorted."""
    norms = constraint_norms(sym, params)
    count = norms.shape[1]
    k = min(limit, count)
    kth = norms.topk(k, dim=1, largest=False).values[:, -1:]                       # (R, 1)
    number = torch.arange(count, device=norms.device, dtype=norms.dtype)
    near = norms <= kth
    width = int(near.sum(1).max())
    # the candidates' numbers in ascending order (padded with +inf where a row has fewer), then a
    # stable sort of their distances
    cand = torch.where(near, number, float("inf")).topk(width, dim=1, largest=False).values
    pad = torch.isinf(cand)
    cand = torch.where(pad, 0.0, cand).long()
    dist = torch.where(pad, float("inf"), norms.gather(1, cand))
    return cand.gather(1, dist.sort(dim=1, stable=True).indices[:, :k])


def batched(loss_fn: LossFn, sym: Symmetry, params: Params, order: torch.Tensor, block_size: int) -> torch.Tensor:
    """λ_c of mirror order[r, m] of run r, for every run and m at once: (R, M).

    The M mirrors of a run are M *virtual runs* at M projected points: run r's parameters are
    repeated M times along the run axis (row m·R + r), each row gets its own mirror, and the pack's
    loss stays a sum of independent per-row losses. So each column of the block (or Lanczos step)
    is one Hessian-vector product over all R·M rows instead of M products over R."""
    runs, m = order.shape
    virtual = {k: v.repeat(m, *[1] * (v.dim() - 1)) for k, v in params.items()}        # (M·R, ...)
    mirror = select(sym, virtual, order.T.reshape(-1))
    return threshold(loss_fn, mirror, virtual, block_size).view(m, runs).T


BlocksFn = Callable[[Symmetry, Params, torch.Tensor], Optional[torch.Tensor]]


def thresholds(loss_fn: LossFn, symmetries: list[Symmetry], params: Params, limit: int,
               block_size: int, closed_form: Optional[BlocksFn] = None) -> dict[str, torch.Tensor]:
    """λ_c per kind (rescaling / permutation / rotation): (R, n) over up to `limit` mirrors of
    each declared symmetry, those nearest their constraint in each run. `closed_form(sym, params,
    order)` gives the blocks Oᵀ∇²L O (R, M, k, k) where a model has them in closed form (else
    None): they are solved exactly, whatever their size; the rest go by Hessian-vector products."""
    out: dict[str, list[torch.Tensor]] = {}
    params = {k: v.detach() for k, v in params.items()}
    for sym in symmetries:
        order = nearest(sym, params, limit)
        blocks = closed_form(sym, params, order) if closed_form is not None else None
        lam = -linalg.eigvalsh(blocks)[..., 0] if blocks is not None else batched(loss_fn, sym, params, order, block_size)
        out.setdefault(kind(sym), []).append(lam)
    return {name: torch.cat(values, dim=1) for name, values in out.items()}


def summarize(per_kind: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Columns critical_wd_{min,median,max}.<kind>, each (R,)."""
    out = {}
    for name, values in sorted(per_kind.items()):
        out[column("critical_wd_min", name)] = values.min(dim=1).values
        out[column("critical_wd_median", name)] = values.median(dim=1).values
        out[column("critical_wd_max", name)] = values.max(dim=1).values
    return out


def runs_per_pass(loss_fn: LossFn, params: Params, limit: int) -> int:
    """Real runs per batched pass (each `limit` virtual runs) within memory.EVAL_BYTES, from the
    bytes one run's double-backward graph saves; the Hessian-vector product allocates about as
    much again. The closed-form blocks need less than this graph."""
    one = {k: v[:1] for k, v in params.items()}
    graph = memory.saved_bytes(lambda: hvp_at(loss_fn, one))
    return max(1, memory.EVAL_BYTES // (2 * graph * max(1, limit)))


def at_end(model, rp, raw: Params, x, y, task: str, cfg: MetricsConfig, alive: torch.Tensor,
           share: Callable[[list[Callable[[], dict]]], list[dict]] = lambda pieces: [p() for p in pieces]
           ) -> dict[str, torch.Tensor]:
    """The end-of-run columns, in float64 on the training set (no noise); runs that diverged
    (`alive` false) or whose parameters are not finite get NaN, and are measured at 0 so that
    they cannot stop the others. Empty when `metrics.critical_mirrors` = 0 or nothing is declared.
    The runs go in chunks, each a call of its own, which `share` runs (in order, or some on other
    threads: symrun.training.shards.Split.share).

    The loss is on every training example when there are at most `metrics.critical_examples`,
    else on the first that many. `critical_wd_examples` says how many; `critical_wd_exact` is 1
    when that was all of them and every block was solved whole (closed form, or at most
    `metrics.critical_block` Hessian-vector products), 0 when λ_c is an estimate."""
    symmetries = rp.symmetries()
    if cfg.critical_mirrors == 0 or not symmetries or not model.second_order:
        return {}
    n = len(x) if cfg.critical_examples is None else min(len(x), cfg.critical_examples)
    raw = {k: v.detach().double() for k, v in raw.items()}
    finite = finite_runs(raw) & alive                                                         # (R,)
    safe = {k: zero_runs(p, finite) for k, p in raw.items()}
    xd, yd = x[:n].double(), (y[:n] if task == "classification" else y[:n].double())
    loss_of = RunLoss(yd, task)
    loss_fn = lambda p: loss_of(model.forward(rp.network(p), xd))  # noqa: E731
    # A model's own mirrors on parameters that DCS leaves alone are mirrors of θ as well as of ρ
    # (rp.symmetries() drops the rest), so its closed form applies at θ = rp.network(ρ).
    solved_whole: set = set()          # the symmetries whose blocks came in closed form

    def closed(sym: Symmetry, p: Params, order: torch.Tensor) -> Optional[torch.Tensor]:
        blocks = model.mirror_blocks(sym, rp.network(p), order, xd, loss_of)
        if blocks is not None:
            solved_whole.add(sym)
        return blocks

    # Runs are independent (a block-diagonal Hessian), so they go in chunks that bound memory.
    runs = len(finite)
    chunk = runs_per_pass(loss_fn, safe, cfg.critical_mirrors)

    def measured(i: int) -> dict[str, torch.Tensor]:
        with torch.enable_grad():      # on whichever thread runs it: grad mode is a thread's own
            return summarize(thresholds(loss_fn, symmetries, {k: v[i:i + chunk] for k, v in safe.items()},
                                        cfg.critical_mirrors, cfg.critical_block, closed))

    parts = share([functools.partial(measured, i) for i in range(0, runs, chunk)])
    cols = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    cols = {k: torch.where(finite, v, torch.full_like(v, float("nan"))) for k, v in cols.items()}
    whole = all(s in solved_whole or mirror_size(s, safe) <= cfg.critical_block for s in symmetries)
    ref = next(iter(cols.values()))
    return {**cols, "critical_wd_examples": torch.full_like(ref, n),
            "critical_wd_exact": torch.full_like(ref, float(n == len(x) and whole))}
