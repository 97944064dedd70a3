"""Structure metrics as small pure functions (tensors in, tensors out), batched over leading axes.

Definitions follow docs/theory.md §4; each docstring gives the formula and its source.
`measure` at the bottom assembles them for one model (the engine calls it at log steps).
"""

from __future__ import annotations

import torch

from symrun.analysis import linalg
from symrun.config import MetricsConfig
from symrun.analysis.symmetries import constraint_norms, gather, kind
from symrun.analysis.notation import column  # noqa: F401 — re-exported: callers name columns as metrics.column


def dead_groups(groups: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    """Group g is dead iff ‖θ_g‖ ≤ atol or ‖θ_g‖ ≤ rtol · max_g ‖θ_g‖ (Chen et al. 2023 use
    rtol = 0.1, no atol). groups: (..., n, g) → bool (..., n). All-zero groups are all dead."""
    norms = groups.norm(dim=-1)
    return (norms <= atol) | (norms <= rtol * norms.amax(dim=-1, keepdim=True))


def sparsity(groups: torch.Tensor, atol: float, rtol: float) -> torch.Tensor:
    """Fraction of dead groups (see `dead_groups`): (..., n, g) → (...)."""
    return dead_groups(groups, atol, rtol).double().mean(dim=-1)


def numerical_rank(s: torch.Tensor, rtol: float, atol: float = 0.0) -> torch.Tensor:
    """#{σᵢ > max(rtol · σ₁, atol)} from descending singular values s: (..., k) → (...)."""
    return ((s > rtol * s[..., :1]) & (s > atol)).sum(dim=-1).to(s.dtype)


def effective_rank(s: torch.Tensor) -> torch.Tensor:
    """exp(−Σ pᵢ ln pᵢ), pᵢ = σᵢ/Σσ (Roy & Vetterli 2007); 0 for the zero matrix."""
    total = s.sum(dim=-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(dim=-1)
    return torch.where(total[..., 0] > 0, entropy.exp(), torch.zeros_like(entropy))


def stable_rank(s: torch.Tensor) -> torch.Tensor:
    """‖A‖_F² / ‖A‖₂² = Σσᵢ² / σ₁²; 0 for the zero matrix."""
    top = s[..., 0] ** 2
    return torch.where(top > 0, (s**2).sum(dim=-1) / top.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(top))


def normalized_distance(groups: torch.Tensor) -> torch.Tensor:
    """Pairwise 2‖θᵢ − θⱼ‖² / (‖θᵢ‖² + ‖θⱼ‖²) (Chen et al. 2023): (..., n, g) → (..., n, n)."""
    sq = (groups**2).sum(dim=-1)
    diff = torch.cdist(groups, groups) ** 2
    denom = (sq[..., :, None] + sq[..., None, :]).clamp_min(torch.finfo(groups.dtype).tiny)
    return 2 * diff / denom


def independent_fraction(groups: torch.Tensor, threshold: float, dead: torch.Tensor) -> torch.Tensor:
    """#groups of identical neurons / width. Neurons i, j are identical iff their normalised
    distance < threshold; groups are connected components (transitive closure); dead neurons
    (mask (..., n)) belong to no group. groups: (..., n, g) → (...)."""
    n = groups.shape[-2]
    alive = ~dead
    adj = (normalized_distance(groups) < threshold) & alive[..., :, None] & alive[..., None, :]
    adj = adj | torch.diag_embed(alive)
    # Connected components by label propagation: every alive neuron takes the smallest index among
    # its neighbours until nothing changes (at most the component's diameter rounds, each O(n²)).
    index = torch.arange(n, device=groups.device).expand(adj.shape[:-1])
    labels = index
    while True:
        new = torch.where(adj, labels.unsqueeze(-2), n).amin(dim=-1)        # dead rows → n
        if torch.equal(new, labels):
            break
        labels = new
    n_groups = ((labels == index) & alive).sum(dim=-1).double()     # one root per component
    return n_groups / n


def mean_pairwise_distance(vectors: torch.Tensor) -> torch.Tensor:
    """Mean normalised distance over pairs i < j of (..., m, p) → (...): the ensemble spread."""
    m = vectors.shape[-2]
    i, j = torch.triu_indices(m, m, offset=1, device=vectors.device)
    return normalized_distance(vectors)[..., i, j].mean(dim=-1)


def finite_runs(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """(R,) bool: the runs every one of whose parameters is finite."""
    return torch.stack([p.flatten(1).isfinite().all(-1) for p in params.values()]).all(0)


def zero_runs(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """t (R, ...) with the runs not in `keep` ((R,) bool) set to 0: a diverged run measured at 0
    cannot make svd, eigh or a Hessian product raise for the whole pack."""
    return torch.where(keep.view(-1, *[1] * (t.dim() - 1)), t, 0.0)


def dead_units(h: torch.Tensor, atol: float) -> torch.Tensor:
    """Fraction of units whose activation is ≤ atol in magnitude on every input (with atol = 0: a
    ReLU unit that never fires, so no gradient reaches it; Lyle et al. 2023, Sokar et al. 2023).
    h: activations (..., B, n) → (...)."""
    return (h.abs() <= atol).all(dim=-2).double().mean(dim=-1)


def top(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(-1), the first maximum as argmax takes it, through max(-1): on the CPU
    torch's argmax over a strided last axis (a feature-major output's classes) is ~4× slower."""
    return scores.max(-1).indices


def balance(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """‖u‖² − ‖w‖² summed over a run's rescaling pairs (conserved by gradient flow; multiplied by
    (1 − lr·λ)² per GD step with weight decay λ, docs/theory.md §5.5). (R, ...) → (R,)."""
    return u.pow(2).flatten(1).sum(-1) - w.pow(2).flatten(1).sum(-1)


def weight_norm(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """√Σ‖θ‖² per run: (R,)."""
    return torch.stack([p.pow(2).flatten(1).sum(-1) for p in params.values()]).sum(0).sqrt()


def singular_values(a: torch.Tensor) -> torch.Tensor:
    """Descending singular values of (..., m, n), as √eig of the smaller Gram matrix in float64.

    Batched LAPACK SVD is ~100× slower on CPU for the (R, 128, 64) stacks symrun measures. The
    Gram route resolves σᵢ/σ₁ down to ~1e-7 (√ of float64 eps, with margin); values below that
    are round-off of an exact zero and are returned as 0 — far below any rank_rtol in use."""
    a = a.double()
    gram = a @ a.mT if a.shape[-2] <= a.shape[-1] else a.mT @ a
    s = linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(-1)
    return torch.where(s > GRAM_RESOLUTION * s[..., :1], s, torch.zeros_like(s))


GRAM_RESOLUTION = 1e-7


def rank_metrics(matrix: torch.Tensor, rtol: float, qualifier: str = "", atol: float = 0.0) -> dict[str, torch.Tensor]:
    """rank, effective_rank, stable_rank of (R, ..., a, b), averaged over any middle axes, in the
    columns of `qualifier` (`column`)."""
    s = singular_values(matrix)
    out = {"rank": numerical_rank(s, rtol, atol), "effective_rank": effective_rank(s), "stable_rank": stable_rank(s)}
    return {column(k, qualifier): v.reshape(v.shape[0], -1).mean(-1) for k, v in out.items()}


COLLAPSE_BLOCK_BYTES = 8 * 2**20    # float64 features of a block of runs in neural_collapse


def neural_collapse(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, n_classes: int) -> dict[str, torch.Tensor]:
    """NC1–NC4 of each run (`_collapse`), on a CPU in blocks of runs whose float64 features take
    at most COLLAPSE_BLOCK_BYTES: runs are independent, and a block's copy stays in cache (W1's
    28-run evaluation chunk, 1,438 examples × 128 features: 41 MB at once, each allocation fresh
    pages; the chunk's neural collapse took 60 ms, in blocks 31). On a GPU, whole. Each (R,)."""
    step = max(1, COLLAPSE_BLOCK_BYTES // max(1, h.shape[-2] * h.shape[-1] * 8))    # runs a block
    if h.device.type != "cpu" or len(h) <= step:
        return _collapse(h, y, w, n_classes)
    blocks = [_collapse(h[i:i + step], y, w[i:i + step], n_classes) for i in range(0, len(h), step)]
    return {k: torch.cat([b[k] for b in blocks]) for k in blocks[0]}


def _collapse(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor, n_classes: int) -> dict[str, torch.Tensor]:
    """NC1–NC4 of Papyan, Han & Donoho (2020, PNAS) from penultimate features h (R, N, p),
    labels y (N,) and classifier weights w (R, C, p); each (R,). Conventions (public code differs
    by factors of C):
      nc1 = tr(Σ_W Σ_B⁺)/C, Σ_W = mean over samples of (h − μ_y)(h − μ_y)ᵀ,
            Σ_B = mean over classes of (μ_c − μ_G)(μ_c − μ_G)ᵀ, μ_G the mean of the class means;
      nc2_equinorm = std/mean over classes of ‖μ_c − μ_G‖;
      nc2_equiangle = mean over pairs c ≠ c' of |cos(μ_c − μ_G, μ_c' − μ_G) + 1/(C − 1)|;
      nc3 = ‖Wᵀ/‖W‖_F − M/‖M‖_F‖_F², M = [μ_c − μ_G] (p × C);
      nc4 = fraction of samples where the nearest class mean and the classifier disagree."""
    h, w = h.double(), w.double()
    p = h.shape[-1]
    onehot = torch.nn.functional.one_hot(y, n_classes).double()                  # (N, C)
    means = (onehot.T @ h) / onehot.sum(0).clamp_min(1)[:, None]                  # (R, C, p)
    centred = means - means.mean(dim=-2, keepdim=True)                           # (R, C, p)
    # Σ_B = MᵀM/C (M = centred) has rank < C, so tr(Σ_W Σ_B⁺) needs Σ_W only along Σ_B's
    # eigenvectors: with the C × C Gram MMᵀ = U Λ Uᵀ, they are v_k = Mᵀu_k/√λ_k (eigenvalue λ_k/C),
    # and v_kᵀ Σ_W v_k is the variance of the within-class deviations projected on v_k. This never
    # forms the (R, N, p) deviations or a p × p pseudo-inverse (the old route cost seconds per log
    # step at 256 runs × 1797 samples). Directions with λ_k ≤ p·eps·max λ are dropped, as pinv does.
    lam, u = linalg.eigh(centred @ centred.mT)                             # (R, C), (R, C, C)
    keep = lam > p * torch.finfo(lam.dtype).eps * lam.amax(dim=-1, keepdim=True)
    dirs = centred.mT @ u / lam.clamp_min(torch.finfo(lam.dtype).tiny).sqrt()[:, None, :]   # (R, p, C)
    # the three projections of h (on Σ_B's directions, the class means, the classifier) as one
    # GEMM, its long side the examples: on features stored feature-major (an MLP's, h a
    # transposed view), as (targetsᵀ hᵀ)ᵀ, 1.5× faster than h @ targets there
    targets = torch.cat([dirs, means.mT, w.mT], dim=-1)                          # (R, p, 3C)
    projected = (targets.mT @ h.mT).mT if h.mT.is_contiguous() else h @ targets
    h_dirs, h_means, logits = projected.split(n_classes, dim=-1)
    deviation = h_dirs - (means @ dirs)[:, y]                                    # (R, N, C)
    spread = deviation.pow(2).mean(dim=-2)                                       # v_kᵀ Σ_W v_k
    nc1 = torch.where(keep, spread * n_classes / lam.clamp_min(torch.finfo(lam.dtype).tiny), 0.0).sum(-1) / n_classes
    norms = centred.norm(dim=-1)                                                 # (R, C)
    unit = centred / norms.clamp_min(1e-30)[..., None]
    cos = unit @ unit.mT
    off = ~torch.eye(n_classes, dtype=torch.bool, device=h.device)
    nc2_angle = (cos + 1 / (n_classes - 1)).abs()[:, off].mean(-1)
    nc3 = (w / w.flatten(1).norm(dim=-1)[:, None, None] - centred / centred.flatten(1).norm(dim=-1)[:, None, None]
           ).pow(2).flatten(1).sum(-1)
    # nearest class mean: argmin_c ‖h − μ_c‖² = argmin_c ‖μ_c‖² − 2 h·μ_c
    nearest = (means.pow(2).sum(-1)[:, None, :] - 2 * h_means).min(-1).indices  # (R, N)
    nc4 = (nearest != top(logits)).double().mean(-1)
    return {"nc1": nc1, "nc2_equinorm": norms.std(-1) / norms.mean(-1), "nc2_equiangle": nc2_angle,
            "nc3": nc3, "nc4": nc4}


def constraint_summary(symmetries, params, atol: float) -> dict[str, torch.Tensor]:
    """From the declared mirrors alone: constraint_distance = mean ‖Oᵀθ‖ over them;
    constraint_fraction = fraction with ‖Oᵀθ‖ ≤ atol, overall and per kind
    (constraint_fraction.rescaling / .rotation / .permutation; docs/theory.md §4). Each (R,)."""
    per_kind: dict[str, list[torch.Tensor]] = {}
    for sym in symmetries:
        per_kind.setdefault(kind(sym), []).append(constraint_norms(sym, params))   # (R, n_mirrors)
    if not per_kind:
        return {}
    held = lambda norms: (norms <= atol).double().mean(dim=1)  # noqa: E731
    everything = torch.cat([n for norms in per_kind.values() for n in norms], dim=1)
    out = {"constraint_distance": everything.mean(dim=1), "constraint_fraction": held(everything)}
    for name, norms in sorted(per_kind.items()):
        out[column("constraint_fraction", name)] = held(torch.cat(norms, dim=1))
    return out


def measure(model, params, cfg: MetricsConfig, probe: torch.Tensor,
            labelled: tuple[torch.Tensor, torch.Tensor, int] | None = None,
            given: dict | None = None) -> dict[str, torch.Tensor]:
    """Every structure metric that applies to `model`, each (R,). Inapplicable ones are absent.
    `probe` (B, d): inputs on which ensemble members' outputs are compared and real networks'
    activations are read (`model.probe_metrics`); `labelled`
    (x, y, n_classes): the training set, for neural collapse of classifiers. `given`: the
    model's penultimate(params, ·) on the probe ("probe") and the training set ("train") where
    the caller already has them."""
    given = given or {}
    out: dict[str, torch.Tensor] = {"weight_norm": weight_norm(params)}
    groups = {ns: gather(ns, params) for ns in [*model.neuron_sets(), *model.permutation_sets()]}   # (R, [M,] n, g)
    dead = {ns: dead_groups(g, cfg.sparsity_atol, cfg.sparsity_rtol) for ns, g in groups.items()}
    if model.neuron_sets():
        out["sparsity"] = torch.cat([dead[ns].reshape(len(dead[ns]), -1) for ns in model.neuron_sets()], dim=1).double().mean(dim=1)
    if model.permutation_sets():
        frac, width = [], 0
        for ns in model.permutation_sets():
            f = independent_fraction(groups[ns], cfg.homogeneity_threshold, dead[ns])
            frac.append(f.reshape(f.shape[0], -1).mean(-1) * groups[ns].shape[-2])
            width += groups[ns].shape[-2]
        out["independent_fraction"] = torch.stack(frac).sum(0) / width
    for qualifier, matrix in model.products(params).items():
        out.update(rank_metrics(matrix, cfg.rank_rtol, qualifier, cfg.rank_atol))
    members = model.member_vectors(params)                                     # (R, M, P) or None
    if members is not None:
        dead = dead_groups(members, cfg.sparsity_atol, cfg.sparsity_rtol)
        out["member_independent_fraction"] = independent_fraction(members, cfg.homogeneity_threshold, dead)
        # A dead member is measured as the zero it lies within tolerance of (docs/theory.md §4):
        # two dead members are identical (distance 0), a dead and a live one at distance 2. Else
        # the rounding left in members weight decay has killed reads as spread (1.6–2.2).
        alive = ~dead[..., None]                                                # (R, M, 1)
        out["ensemble_spread"] = mean_pairwise_distance(members * alive)
        outputs = model.member_outputs(params, probe)                          # (R, M, B, o)
        out["ensemble_disagreement"] = mean_pairwise_distance(outputs.flatten(2) * alive)
    out.update(constraint_summary(model.symmetries(), params, cfg.constraint_atol))
    pair = model.balance_pair(params)
    if pair is not None:
        out["balance"] = balance(*pair)
    representation = given["probe"] if "probe" in given else model.penultimate(params, probe)
    if representation is not None:                     # the last hidden layer on the probe inputs
        features = representation[0]                                           # (R, B, width)
        out["dead_units"] = dead_units(features, cfg.activation_atol)
        s = singular_values(features)
        out["feature_rank"] = numerical_rank(s, cfg.rank_rtol, cfg.rank_atol)
        out["feature_effective_rank"] = effective_rank(s)
    penultimate = None
    if labelled is not None:
        penultimate = given["train"] if "train" in given else model.penultimate(params, labelled[0])
    if penultimate is not None:
        features, classifier = penultimate
        out.update(neural_collapse(features, labelled[1], classifier, labelled[2]))
    out.update(model.probe_metrics(params, probe, cfg))
    return out
