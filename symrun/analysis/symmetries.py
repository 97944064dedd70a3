"""Mirror symmetries as data, plus small pure functions that apply them and measure ‖Oᵀθ‖.

A mirror (docs/theory.md §2) is R = I − 2OOᵀ with L(θ) = L(Rθ); its constraint set is
Oᵀθ = 0. Models declare theirs as the specs below, naming parameter blocks by their key in the
parameter dict. Every tensor carries leading batch axes (the run axis R, and for ensembles the
member axis M); a spec's `lead` says how many.

- SignFlip(neurons): one mirror per neuron k, θ_k → −θ_k (O spans the neuron's whole block);
  constraint θ_k = 0: a dead neuron / a zero coefficient (rescaling symmetry → sparsity).
- Swap(neurons): one mirror per pair (i, j), O = (e_i − e_j)/√2 on their blocks;
  constraint θ_i = θ_j: identical neurons or members (permutation symmetry → homogeneity).
- Rotation(left, right): for a unit n, (U, W) → (U(I−2nnᵀ), (I−2nnᵀ)W), Oᵀθ = (Un, nᵀW);
  constraint Un = 0, nᵀW = 0: the product UW loses rank (rotation symmetry → low rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch

from symrun.analysis import linalg
Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Slot:
    """The axis of parameter `param` that indexes the neurons (incl. the leading batch axes)."""

    param: str
    axis: int


@dataclass(frozen=True)
class NeuronSet:
    """Neurons whose parameters are spread over several tensors, e.g. a hidden layer's rows of
    W_in, entries of b and columns of W_out. `lead` = number of leading batch axes."""

    name: str
    slots: tuple[Slot, ...]
    lead: int = 1


@dataclass(frozen=True)
class SignFlip:
    neurons: NeuronSet


@dataclass(frozen=True)
class Swap:
    neurons: NeuronSet


@dataclass(frozen=True)
class Rotation:
    left: str    # U: (R, a, h)
    right: str   # W: (R, h, b)


Symmetry = Union[SignFlip, Swap, Rotation]


def gather(neurons: NeuronSet, params: Params) -> torch.Tensor:
    """Each neuron's parameter vector: (*lead, n_neurons, group_size)."""
    parts = []
    for slot in neurons.slots:
        t = params[slot.param].movedim(slot.axis, neurons.lead)     # (*lead, n, ...)
        parts.append(t.reshape(*t.shape[: neurons.lead + 1], -1))
    return torch.cat(parts, dim=-1)


def apply_mirror(sym: Symmetry, params: Params, index) -> Params:
    """R θ for one mirror of `sym` (index: neuron k, pair (i, j), or unit vector n). Allocates."""
    out = dict(params)
    if isinstance(sym, SignFlip):
        for slot in sym.neurons.slots:
            t = params[slot.param].clone()
            t.select(slot.axis, index).neg_()
            out[slot.param] = t
    elif isinstance(sym, Swap):
        i, j = index
        for slot in sym.neurons.slots:
            perm = torch.arange(params[slot.param].shape[slot.axis])
            perm[i], perm[j] = j, i
            out[slot.param] = params[slot.param].index_select(slot.axis, perm.to(params[slot.param].device))
    else:
        n = index / index.norm()
        reflect = torch.eye(len(n), dtype=n.dtype, device=n.device) - 2 * torch.outer(n, n)
        out[sym.left] = params[sym.left] @ reflect
        out[sym.right] = reflect @ params[sym.right]
    return out


def constraint_norms(sym: Symmetry, params: Params) -> torch.Tensor:
    """‖Oᵀθ‖ for every mirror `sym` declares, flattened per run: (R, n_mirrors).

    Rotation declares h mirrors, along the eigenvectors n of UᵀU + WWᵀ (the directions closest to
    their constraint), so ‖Oᵀθ‖² = nᵀ(UᵀU + WWᵀ)n is an eigenvalue.
    """
    if isinstance(sym, Rotation):
        u, w = params[sym.left].double(), params[sym.right].double()   # float32 eigh is off by ~1e-3 here
        gram = u.mT @ u + w @ w.mT                                       # (*lead, h, h)
        norms = linalg.eigvalsh(gram).clamp_min(0).sqrt()
        return norms.reshape(norms.shape[0], -1)
    groups = gather(sym.neurons, params)                                   # (*lead, n, g)
    if isinstance(sym, SignFlip):
        norms = groups.norm(dim=-1)
    else:
        n = groups.shape[-2]
        i, j = torch.triu_indices(n, n, offset=1, device=groups.device)
        # ‖θᵢ − θⱼ‖ through cdist's matmul form: no (…, n(n−1)/2, g) tensor of differences.
        norms = torch.cdist(groups, groups)[..., i, j] / math.sqrt(2)
    return norms.reshape(norms.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# Concrete mirrors: one O per run, as the pair of linear maps θ ↦ Oᵀθ and c ↦ Oc


KINDS = {SignFlip: "rescaling", Swap: "permutation", Rotation: "rotation"}


def kind(sym: Symmetry) -> str:
    """The symmetry family of docs/theory.md §3: rescaling | permutation | rotation."""
    return KINDS[type(sym)]


def scatter(neurons: NeuronSet, groups: torch.Tensor, like: Params) -> Params:
    """Inverse of `gather`: (*lead, n, group_size) → the slot tensors (shaped as in `like`)."""
    out, start = {}, 0
    for slot in neurons.slots:
        moved = like[slot.param].movedim(slot.axis, neurons.lead).shape      # (*lead, n, ...)
        size = math.prod(moved[neurons.lead + 1:])
        part = groups[..., start:start + size].reshape(moved)
        out[slot.param] = part.movedim(neurons.lead, slot.axis)
        start += size
    return out


@dataclass(frozen=True)
class Mirror:
    """One mirror per run of a pack, O (P × k per run, orthonormal columns), given as maps:
    `restrict(θ)` = Oᵀθ, (R, k); `embed(c)` = Oc, a full parameter dict (zeros off the block)."""

    sym: Symmetry
    restrict: callable
    embed: callable
    size: int                                     # k


def reflect(mirror: Mirror, params: Params) -> Params:
    """Rθ = θ − 2OOᵀθ. Allocates."""
    moved = mirror.embed(mirror.restrict(params))
    return {k: v - 2 * moved[k] for k, v in params.items()}


def project(mirror: Mirror, params: Params) -> Params:
    """(I − OOᵀ)θ: the nearest point of the mirror's constraint set Oᵀθ = 0. Allocates."""
    moved = mirror.embed(mirror.restrict(params))
    return {k: v - moved[k] for k, v in params.items()}


def mirror_count(sym: Symmetry, params: Params) -> int:
    """Number of mirrors `sym` declares per run (the columns of `constraint_norms`)."""
    if isinstance(sym, Rotation):
        return math.prod(params[sym.left].shape[1:-2]) * params[sym.left].shape[-1]
    groups = gather(sym.neurons, params)
    mid, n = math.prod(groups.shape[1:-2]), groups.shape[-2]
    return mid * (n if isinstance(sym, SignFlip) else n * (n - 1) // 2)


def mirror_size(sym: Symmetry, params: Params) -> int:
    """k, the columns of each of `sym`'s mirrors O: a neuron's group size; a + b for a rotation of
    U (a × h) and W (h × b)."""
    if isinstance(sym, Rotation):
        return params[sym.left].shape[-2] + params[sym.right].shape[-1]
    return gather(sym.neurons, params).shape[-1]


def select(sym: Symmetry, params: Params, index: torch.Tensor) -> Mirror:
    """Run r's mirror number index[r] of `sym`, numbered as the columns of `constraint_norms`:
    neurons (and members) in order; pairs i < j in row-major order; for a rotation, per block the
    eigenvectors n of UᵀU + WWᵀ in ascending order of eigenvalue (the directions nearest to
    their constraint). index: (R,) long."""
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    runs = torch.arange(index.shape[0], device=index.device)
    if isinstance(sym, Rotation):
        return _select_rotation(sym, params, index, zeros, runs)
    groups = gather(sym.neurons, params)                                   # (R, *mid, n, g)
    shape, n, g = groups.shape, groups.shape[-2], groups.shape[-1]
    flat_shape = (shape[0], -1, g)                                          # (R, mid·n, g)
    if isinstance(sym, SignFlip):
        rows, weights = [index], [1.0]
    else:
        i, j = torch.triu_indices(n, n, offset=1, device=index.device)
        block, pair = index // len(i), index % len(i)
        rows, weights = [block * n + i[pair], block * n + j[pair]], [2 ** -0.5, -(2 ** -0.5)]

    def restrict(p: Params) -> torch.Tensor:
        flat = gather(sym.neurons, p).reshape(flat_shape)
        return sum(wt * flat[runs, row] for row, wt in zip(rows, weights))   # (R, g)

    def embed(c: torch.Tensor) -> Params:
        flat = torch.zeros(shape[0], math.prod(shape[1:-1]), g, dtype=c.dtype, device=c.device)
        for row, wt in zip(rows, weights):
            flat[runs, row] = wt * c
        return {**zeros, **scatter(sym.neurons, flat.reshape(shape), params)}

    return Mirror(sym, restrict, embed, g)


def _select_rotation(sym: Rotation, params: Params, index, zeros, runs) -> Mirror:
    u, w = params[sym.left], params[sym.right]                             # (R, *mid, a, h), (R, *mid, h, b)
    h, a, b = u.shape[-1], u.shape[-2], w.shape[-1]
    uf, wf = u.reshape(u.shape[0], -1, a, h), w.reshape(w.shape[0], -1, h, b)
    block, col = index // h, index % h
    gram = uf[runs, block].double().mT @ uf[runs, block].double() + wf[runs, block].double() @ wf[runs, block].double().mT
    n = linalg.eigh(gram)[1][runs, :, col].to(u.dtype)               # (R, h) unit vectors

    def restrict(p: Params) -> torch.Tensor:
        pu = p[sym.left].reshape(uf.shape)[runs, block]                    # (R, a, h)
        pw = p[sym.right].reshape(wf.shape)[runs, block]                   # (R, h, b)
        return torch.cat([(pu @ n.unsqueeze(-1)).squeeze(-1), (n.unsqueeze(-2) @ pw).squeeze(-2)], dim=-1)

    def embed(c: torch.Tensor) -> Params:
        eu = torch.zeros(uf.shape, dtype=c.dtype, device=c.device)
        ew = torch.zeros(wf.shape, dtype=c.dtype, device=c.device)
        eu[runs, block] = c[:, :a, None] * n[:, None, :]                  # c_U nᵀ
        ew[runs, block] = n[:, :, None] * c[:, None, a:]                  # n c_Wᵀ
        return {**zeros, sym.left: eu.reshape(u.shape), sym.right: ew.reshape(w.shape)}

    return Mirror(sym, restrict, embed, a + b)
