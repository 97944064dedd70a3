"""Mirror symmetries as data, plus small pure functions that apply them and measure ‖Oᵀθ‖.

A mirror (shared/science.md §2) is R = I − 2OOᵀ with L(θ) = L(Rθ); its constraint set is
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
        norms = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
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
