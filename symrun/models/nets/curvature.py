"""The Hessian block of a layered net's neuron mirrors, in closed form (docs/theory.md §2, §5.3).

Neuron i of hidden layer l has parameters θ_i = (w̃_i; u_i): its incoming weights with its bias,
and its column of the next layer's weight. With x̃ the layer's input (plus a 1 for the bias),
z_i = w̃_i·x̃, and the next pre-activation z' = Σ_k u_k σ(z_k) + b' (of the neuron's own member
in an ensemble). The loss depends on θ_i, θ_j only through z', so with δ' = ∂L/∂z' per example

    ∇²_{(θ_i, θ_j)} L = Jᵀ (∂²L/∂z'²) J + Σ_m δ'_m ∇²z'_m,      J = [J_i, J_j] = ∂z'/∂(θ_i, θ_j).

- Swap, O = (e_i − e_j)/√2 at θ_i = θ_j: J_i = J_j there (one function of equal arguments), so
  OᵀJᵀ = 0; and z' has no second derivative across i and j. So OᵀHO = Σ_m δ'_m ∂²z'_m/∂θ_i².
- SignFlip, O = e_i at θ_i = 0, where σ(0) = 0 (tanh, relu, gelu): J_i = (u_i σ'(z_i) x̃ᵀ, σ(z_i))
  = 0, and the same formula holds.

With ∂²z'_m/∂w̃² = u_{i,m} σ''(z_i) x̃x̃ᵀ, ∂²z'_m/∂w̃∂u_{m'} = [m = m'] σ'(z_i) x̃ and ∂²z'/∂u² = 0:

    OᵀHO = [[A, B], [Bᵀ, 0]],   A = Σ_n (δ'_n·u_i) σ''(z_i,n) x̃_n x̃_nᵀ,   B = Σ_n σ'(z_i,n) x̃_n δ'_nᵀ,

in the order of the neuron's group (w, b, u); the loss's 1/n is inside δ'. At a dead tanh neuron
A = 0 and λ_c = σ₁(B) = ‖E[x̃ (∂ℓ/∂z')ᵀ]‖₂, the dead-neuron closed form. σ' and σ'' follow
autograd's conventions (relu: σ'(0) = 0 and σ'' = 0), so the block is the one Hessian-vector
products build (tests/test_curvature.py, to 1e-10 in float64).

Cost: θ₀ differs from θ in neurons i and j only, so a run's layers up to l are computed once for
all its mirrors, and once for a layer's sign flips and swaps together (`_layers`); per mirror,
z'₀ = z' − Σ u σ(z) + (copies of the merged neuron), the layers above z', one backward pass to
z', and two small matrix products. The products x̃_a x̃_b of the shared data (A's Gram matrices)
are formed once per data tensor (`_pair_products`), not once per pass over a chunk of runs.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from symrun.analysis.symmetries import SignFlip, Swap, Symmetry

Params = dict[str, torch.Tensor]


def derivatives(activation: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(σ'(z), σ''(z)) as autograd differentiates symrun's activations."""
    if activation == "tanh":
        t = torch.tanh(z)
        d1 = 1 - t * t
        return d1, -2 * t * d1
    if activation == "relu":                       # torch: σ'(0) = 0, and σ'' = 0 everywhere
        return (z > 0).to(z.dtype), torch.zeros_like(z)
    if activation == "gelu":                       # σ = zΦ(z): σ' = Φ + zφ, σ'' = φ(2 − z²)
        phi = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * phi, phi * (2 - z * z)
    raise ValueError(f"no derivatives for activation '{activation}'")


def neuron_blocks(mlp, sym: Symmetry, params: Params, order: torch.Tensor, x: torch.Tensor,
                  loss_of: Callable[[torch.Tensor], torch.Tensor]) -> Optional[torch.Tensor]:
    """Oᵀ∇²L(θ₀)O of hidden-neuron mirror order[r, m] of run r of `mlp` (a models.MLP), at its
    projected point: (R, M, k, k). None for mirrors other than its neuron sign flips and swaps."""
    sets = mlp.neuron_sets()
    if not isinstance(sym, (SignFlip, Swap)) or sym.neurons not in sets:
        return None
    layer, flip = sets.index(sym.neurons), isinstance(sym, SignFlip)
    runs, m = order.shape
    member, i, j = _neurons(order.reshape(-1), mlp.sizes[layer + 1], flip)
    run = torch.arange(runs, device=order.device).repeat_interleave(m)         # virtual run v = r·M + m
    # δ' = ∂L/∂z' by hand where z' is the output and the loss says how (symrun.training.loss.RunLoss),
    # else by autograd through the layers above
    by_hand = layer + 1 == mlp.cfg.depth and hasattr(loss_of, "grad_t")
    with torch.no_grad():
        h, s, z_next = _layers(mlp, params, layer, x)
        w = params[f"layers.{layer}.weight"]
        if mlp.cfg.bias:
            w = torch.cat([w, params[f"layers.{layer}.bias"].unsqueeze(-1)], dim=-1)   # w̃: (R, M, width, p)
        u = params[f"layers.{layer + 1}.weight"]                               # (R, M, out', width)
        xt = _with_ones(h if layer == 0 else h[run, member], mlp.cfg.bias)    # x̃: (p, n) or (V, p, n)
        # the projected neuron: zero for a sign flip, the pair's mean for a swap (both get it)
        w_bar = torch.zeros_like(w[run, member, i]) if flip else (w[run, member, i] + w[run, member, j]) / 2
        u_bar = torch.zeros_like(u[run, member, :, i]) if flip else (u[run, member, :, i] + u[run, member, :, j]) / 2
        z_bar = torch.matmul(w_bar.unsqueeze(-2), xt).squeeze(-2)              # (V, n)
        shift = -u[run, member, :, i, None] * s[run, member, i, None, :]       # (V, out', n)
        if not flip:
            shift = shift - u[run, member, :, j, None] * s[run, member, j, None, :] + 2 * u_bar[..., None] * mlp.act(z_bar)[:, None]
        z0 = z_next[run]                                                       # z' at θ₀, every member
        # z0[v, member[v]] += shift[v], as slabs added in place (an indexed += gathers and scatters)
        members = z0.shape[1]
        z0.view(-1, *z0.shape[2:]).index_add_(0, torch.arange(len(run), device=run.device) * members + member, shift)
        if by_hand:
            # z' is the output (each member's): δ' written out, of the members' mean, which
            # passes 1/M of it to each member; z0 is this call's own copy, and is overwritten
            delta = loss_of.grad_t(z0[:, 0] if members == 1 else z0.mean(1))        # δ': (V, out', n)
            if members > 1:
                delta = delta / members
    if not by_hand:
        z0.requires_grad_()
        out = _above(mlp, params, run, layer + 1, z0)                          # (V, n, o)
        delta = torch.autograd.grad(loss_of(out).sum(), z0)[0][torch.arange(len(run)), member]   # δ': (V, out', n)
    d1, d2 = derivatives(mlp.cfg.activation, z_bar)
    b = _cross(xt, delta * d1.unsqueeze(1))                                    # B: (V, p, out')
    if flip or mlp.cfg.activation == "relu":                                   # u = 0 or σ'' = 0: A = 0
        a = b.new_zeros(b.shape[0], b.shape[1], b.shape[1])
    else:
        a = _weighted_gram(xt, (u_bar.unsqueeze(-1) * delta).sum(1) * d2,      # A, weights (δ'·u) σ''(z)
                           x if layer == 0 else None)
    top = torch.cat([a, b], dim=-1)
    bottom = torch.cat([b.mT, b.new_zeros(b.shape[0], b.shape[2], b.shape[2])], dim=-1)
    block = torch.cat([top, bottom], dim=-2)
    return block.view(runs, m, *block.shape[1:])


_LAYERS = WeakIdKeyDictionary()     # a layer's weight tensor → (what it was computed from, `_layers`)


def _layers(mlp, params: Params, layer: int, x: torch.Tensor):
    """(layer `layer`'s input, its activations, the next layer's pre-activations) of every run:
    (R, M, ·, n) each (the input is x itself for layer 0). A layer's sign flips and swaps are
    asked for in turn with the same tensors (symrun.analysis.critical.thresholds), so the last
    answer is kept while the layer's weight tensor lives, and reused for the same tensors, none
    of them changed in place since (their version counters)."""
    key = params[f"layers.{layer}.weight"]
    tensors = (x, *params.values())
    kept = _LAYERS.get(key)
    if (kept is not None and len(kept[0]) == len(tensors)
            and all(ref() is t and version == t._version for (ref, version), t in zip(kept[0], tensors))):
        return kept[1]
    h = x
    for k in range(layer):
        h = mlp.act(mlp._layer_t(params, k, h))                                # (R, M, width, n)
    s = mlp.act(mlp._layer_t(params, layer, h))                                # (R, M, width, n)
    out = h, s, mlp._layer_t(params, layer + 1, s)                             # z': (R, M, out', n)
    # weak references: the entry must not keep its own key (the weight, among the params) alive
    _LAYERS[key] = ([(weakref.ref(t), t._version) for t in tensors], out)
    return out


def _neurons(index: torch.Tensor, width: int, flip: bool):
    """Mirror numbers → (member, i, j), as constraint_norms numbers a set's mirrors: per member,
    neurons in order (flips, j = i) or pairs i < j in row-major order (swaps)."""
    if flip:
        return index // width, index % width, index % width
    first, second = torch.triu_indices(width, width, offset=1, device=index.device)
    pair = index % len(first)
    return index // len(first), first[pair], second[pair]


GRAM_VALUES = 2**24     # x̃_n x̃_nᵀ of every example, upper triangles, held at most this large


def _cross(xt: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_n x̃_n g_nᵀ per virtual run: x̃ (p, n) shared or (V, p, n); g (V, o, n) → (V, p, o). A
    shared x̃ goes through one GEMM with every run's g side by side."""
    if xt.dim() == 3:
        return xt @ g.mT
    v, o, n = g.shape
    return (xt @ g.permute(2, 0, 1).reshape(n, v * o)).view(-1, v, o).transpose(0, 1)


def _weighted_gram(xt: torch.Tensor, c: torch.Tensor, data: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ_n c_n x̃_n x̃_nᵀ per virtual run: x̃ (p, n) shared or (V, p, n), c (V, n) → (V, p, p).
    For a shared x̃ it is one GEMM, c @ [x̃_n ⊗ x̃_n], over the upper triangles (half the work of
    V separate products, and no (V, p, n) temporary); `data`: the tensor x̃ was made from, whose
    products are then formed once (`_pair_products`)."""
    p, n = xt.shape[-2:]
    if xt.dim() == 3 or p * (p + 1) // 2 * n > GRAM_VALUES:
        return (xt * c.unsqueeze(-2)) @ xt.mT
    upper = c @ _pair_products(xt, data).T                                     # (V, p(p+1)/2)
    i, j = torch.triu_indices(p, p, device=xt.device)
    out = c.new_zeros(len(c), p, p)
    out[:, i, j] = upper
    out[:, j, i] = upper
    return out


_PRODUCTS = WeakIdKeyDictionary()   # a data tensor → (its version, `_pair_products` of x̃ made from it)


def _pair_products(xt: torch.Tensor, data: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows x̃_a ⊙ x̃_b for a ≤ b in row-major order (triu_indices'): (p(p+1)/2, n), formed a
    slice at a time (a gather by index would cost 6× more). x̃ made from the `data` tensor
    (layer 0) is the same for every chunk of runs, so its products are kept while `data` lives
    and is not changed in place."""
    kept = _PRODUCTS.get(data) if data is not None else None
    if (kept is not None and kept[0] == data._version
            and kept[1].shape == (xt.shape[0] * (xt.shape[0] + 1) // 2, xt.shape[1]) and kept[1].dtype == xt.dtype):
        return kept[1]
    products = torch.cat([xt[a] * xt[a:] for a in range(xt.shape[0])])
    if data is not None:
        _PRODUCTS[data] = (data._version, products)
    return products


def _with_ones(h: torch.Tensor, bias: bool) -> torch.Tensor:
    """x̃ feature-major: the data (n, d) → (d[+1], n); a hidden layer's (V, width, n) → (V, width[+1], n)."""
    h = h.T if h.dim() == 2 else h
    return torch.cat([h, h.new_ones(*h.shape[:-2], 1, h.shape[-1])], dim=-2) if bias else h


def _above(mlp, params: Params, run: torch.Tensor, layer: int, z: torch.Tensor) -> torch.Tensor:
    """The network's output from layer `layer`'s pre-activation z (V, M, out', n): (V, n, o)."""
    depth = mlp.cfg.depth
    later = {k: v[run] for k, v in params.items() if int(k.split(".")[1]) > layer}
    h = z
    for k in range(layer + 1, depth + 1):
        h = mlp._layer_t(later, k, mlp.act(h))
    return mlp._average(h.mT)
