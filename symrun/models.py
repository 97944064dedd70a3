"""Packed models: one definition serves a pack of R runs (R = 1 included).

Parameters are a dict of tensors whose leading axis is the run axis R; MLPs and ensembles add a
member axis M (M = 1 for a plain MLP). `forward(params, x)` takes x shared by every run, (B, d),
or one minibatch per run, (R, B, d), and returns (R, B, out). Each model declares its mirror
symmetries (symrun.symmetries) and the matrices whose rank it reports.

Initialisation is drawn per run from the run's own "init" stream on the CPU in float64, so a run
starts from the same point whatever pack, device or dtype it is trained in.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from symrun.config import (AttentionConfig, ConfigError, EnsembleConfig, FactorizationConfig, HadamardConfig,
                           LinearConfig, MLPConfig, ModelConfig, ResNetConfig, TransformerConfig)
from symrun import curvature
from symrun.reparam import Basis, dcs_theta
from symrun.seeds import generator
from symrun.symmetries import NeuronSet, Rotation, SignFlip, Slot, Swap, Symmetry

Params = dict[str, torch.Tensor]


class PackedModel:
    """Base class: subclasses give `shapes`, `forward` and what they declare about symmetry."""

    permutes_neurons = False   # whether neurons of a layer can be swapped (report independent_fraction)
    second_order = True        # whether a run's end may take Hessian-vector products (symrun.critical)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], float]]:
        """Per-run parameter shapes and initial standard deviations."""
        raise NotImplementedError

    def init_params(self, seeds: list[int], device: torch.device, dtype: torch.dtype) -> Params:
        stds = {k: std for k, (_, std) in self.shapes().items()}
        return {k: v.requires_grad_() for k, v in self._draw(seeds, "init", stds, device, dtype).items()}

    def _draw(self, seeds, purpose: str, stds: dict[str, float], device, dtype) -> Params:
        per_run = []
        for seed in seeds:
            g = generator(seed, purpose)
            per_run.append({k: torch.randn(shape, generator=g, dtype=torch.float64) * stds[k]
                            for k, (shape, _) in self.shapes().items()})
        return {k: torch.stack([p[k] for p in per_run]).to(device=device, dtype=dtype) for k in self.shapes()}

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def symmetries(self) -> list[Symmetry]:
        return []

    def candidates(self) -> list[Symmetry]:
        """Mirrors `symrun check` tries whether or not they are declared: a sign flip and a swap
        of every neuron set (subclasses add others), so a new model learns what it really has."""
        return [c(ns) for ns in self.neuron_sets() for c in (SignFlip, Swap)]

    def neuron_sets(self) -> list[NeuronSet]:
        """Rescaling/permutation groups whose death and identity are measured."""
        return []

    def products(self, params: Params) -> dict[str, torch.Tensor]:
        """Matrices whose ranks are reported: {column suffix: (R, ..., a, b)}."""
        return {}

    def member_vectors(self, params: Params) -> torch.Tensor | None:
        return None

    def member_outputs(self, params: Params, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def balance_pair(self, params: Params) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def penultimate(self, params: Params, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(last hidden features (R, N, p), classifier weights (R, C, p)) for neural collapse."""
        return None

    def forward_penultimate(self, params: Params, x: torch.Tensor):
        """(forward(params, x), penultimate(params, x)), from one pass where the model can."""
        return self.forward(params, x), self.penultimate(params, x)

    def mirror_blocks(self, sym: Symmetry, params: Params, order: torch.Tensor, x: torch.Tensor,
                      loss_of) -> torch.Tensor | None:
        """Oᵀ∇²L(θ₀)O in closed form, for mirror order[r, m] of `sym` (numbered as
        symmetries.constraint_norms numbers them) of every run r at its projected point θ₀:
        (R, M, k, k), L = loss_of(forward(θ₀, x)) per run. None where the model has no closed
        form for `sym`: symrun.critical then builds the block from Hessian-vector products."""
        return None

    def constraint_violation(self, params: Params) -> torch.Tensor | None:
        """‖OᵀΘ‖ per run, (R,), for a model with a user-chosen linear constraint; None otherwise."""
        return None

    def probe_metrics(self, params: Params, probe: torch.Tensor, cfg) -> dict[str, torch.Tensor]:
        """Metrics a model reads off its own activations on the probe inputs: {column: (R,)}."""
        return {}

    def run_arrays(self, params: Params, probe: torch.Tensor) -> dict[str, torch.Tensor]:
        """Arrays saved beside each run at the end, for its own figures: {name: (R, ...)}."""
        return {}

    def run_state(self, params: Params, r: int) -> dict[str, torch.Tensor]:
        """Run r's parameters as a plain state dict (CPU tensors)."""
        return {k: v[r].detach().cpu().clone() for k, v in params.items()}


class Hadamard(PackedModel):
    """f(x) = (u ⊙ w)ᵀx; each pair (uᵢ, wᵢ) has a sign mirror, and with weight decay λ the
    product u ⊙ w solves the lasso with penalty λ‖·‖₁ (shared/science.md §5.1)."""

    def __init__(self, cfg: HadamardConfig, in_dim: int, out_dim: int):
        if out_dim != 1:
            raise ConfigError(f"model=hadamard needs a single regression target, the data has {out_dim} outputs")
        self.d, self.std = in_dim, cfg.init_scale / math.sqrt(in_dim)

    def shapes(self):
        return {"u": ((self.d,), self.std), "w": ((self.d,), self.std)}

    def forward(self, params, x):
        s = params["u"] * params["w"]                        # (R, d)
        if x.dim() == 2:        # a shared input (full batch): one GEMM for every run, not R broadcast ones
            return (s @ x.T).unsqueeze(-1)                   # (R, B, 1)
        return x @ s.unsqueeze(-1)                           # per-run minibatches (R, B, d) → (R, B, 1)

    def coefficients(self) -> NeuronSet:
        return NeuronSet("coef", (Slot("u", 1), Slot("w", 1)))

    def symmetries(self):
        return [SignFlip(self.coefficients())]

    def neuron_sets(self):
        return [self.coefficients()]

    def balance_pair(self, params):
        return params["u"], params["w"]


class Factorization(PackedModel):
    """f(x) = U W x, or U(Wx + x) with `residual` (the symmetry-breaking control of the paper's
    Fig. 1); rotation mirrors in the inner space → low rank (shared/science.md §5.2)."""

    def __init__(self, cfg: FactorizationConfig, in_dim: int, out_dim: int):
        if cfg.residual and cfg.hidden != in_dim:
            raise ConfigError(f"model.residual needs model.hidden == input dimension ({in_dim}), got {cfg.hidden}")
        self.cfg, self.d, self.o, self.h = cfg, in_dim, out_dim, cfg.hidden

    def shapes(self):
        s = self.cfg.init_scale
        return {"U": ((self.o, self.h), s / math.sqrt(self.h)), "W": ((self.h, self.d), s / math.sqrt(self.d))}

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


class _NumpyTanh(torch.autograd.Function):
    """tanh on CPU through numpy's vectorised kernel: torch's CPU tanh is a scalar loop (the same
    speed at every ATEN_CPU_CAPABILITY), 3.5× slower on 2M float32 values with 2 cores than
    numpy's SIMD tanh on one; both are within an ulp or so of the exact value (relative error
    ≤ 1.1e-7 in float32 and 2.3e-16 in float64, near 0 included). The backward is torch's own
    tanh_backward of the saved output, itself differentiable, so Hessian-vector products
    (symrun.critical, symrun check) differentiate through it as through torch.tanh."""

    # forward(ctx, x), not forward(x) + setup_context: with setup_context, Function.apply binds
    # its arguments through inspect.signature on every call (~35 µs, a step's worth at 8 runs).
    @staticmethod
    def forward(ctx, x):
        x = x.detach().contiguous()
        y = torch.empty_like(x)
        np.tanh(x.numpy(), out=y.numpy())
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


def tanh(x: torch.Tensor) -> torch.Tensor:
    """torch.tanh, through numpy on the CPU for float32/float64 (`_NumpyTanh`)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return _NumpyTanh.apply(x)
    return torch.tanh(x)


_ACTIVATIONS = {"tanh": tanh, "relu": torch.relu, "gelu": torch.nn.functional.gelu}


class MLP(PackedModel):
    """`members` fully connected nets (1 for model=mlp) whose outputs are averaged.

    Parameters `layers.{l}.weight` (R, M, out, in) and `layers.{l}.bias` (R, M, out). Hidden
    neurons can be swapped (permutation mirrors); with tanh each can also flip sign (an odd
    activation); members of an ensemble can be swapped as wholes.
    """

    permutes_neurons = True

    def __init__(self, cfg: MLPConfig, in_dim: int, out_dim: int):
        self.cfg, self.act = cfg, _ACTIVATIONS[cfg.activation]
        self.members = cfg.members if isinstance(cfg, EnsembleConfig) else 1
        self.sizes = [in_dim] + [cfg.width] * cfg.depth + [out_dim]

    def shapes(self):
        out, m = {}, self.members
        for l, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            out[f"layers.{l}.weight"] = ((m, fan_out, fan_in), self.cfg.init_scale / math.sqrt(fan_in))
            if self.cfg.bias:
                out[f"layers.{l}.bias"] = ((m, fan_out), 0.0)
        return out

    def _hidden_t(self, params, x):
        """Activations of the last hidden layer, feature-major: (R, M, width, B)."""
        h = self._layer_t(params, 0, x)
        for l in range(self.cfg.depth):
            if l > 0:
                h = self._layer_t(params, l, h)
            h = self.act(h)
        return h

    def _layer_t(self, params, l: int, x):
        """W x + b for layer l of every run and member, feature-major: (R, M, out, B). x is data,
        shared (B, in) or per run (R, B, in), or the previous layer's (R, M, in, B).

        Feature-major is the layout in which every matmul of a training step — forward, and the
        weight and input gradients autograd derives from it — writes a contiguous result of the
        parameter's own (out, in) layout, so the optimiser's update reads it without a strided
        pass; and the wide dimension (the batch) is the GEMMs' long one."""
        w, b = params[f"layers.{l}.weight"], params.get(f"layers.{l}.bias")
        r, m, o, i = w.shape
        if x.dim() == 2:
            # A shared input (full batch): one large GEMM over all runs and members.
            h = (w.reshape(r * m * o, i) @ x.T).view(r, m, o, x.shape[0])
        else:
            if x.dim() == 3:                      # per-run data (R, B, in): a transposed view
                x = x.mT.unsqueeze(1).expand(r, m, i, x.shape[1])
            h = torch.matmul(w, x)
        return h if b is None else h + b.unsqueeze(-1)

    def _readout(self, params, h_t):
        """Each member's outputs from its last hidden layer (R, M, width, B): (R, M, B, out)."""
        return self._layer_t(params, self.cfg.depth, h_t).mT

    def _penultimate(self, params, h_t):
        """(features (R, B, width), classifier (R, out, width)) of a single network (M = 1)."""
        return h_t.mT[:, 0], params[f"layers.{self.cfg.depth}.weight"][:, 0]

    def member_outputs(self, params, x):
        return self._readout(params, self._hidden_t(params, x))

    def penultimate(self, params, x):
        return self._penultimate(params, self._hidden_t(params, x)) if self.members == 1 else None

    def forward(self, params, x):
        return self._average(self.member_outputs(params, x))

    def forward_penultimate(self, params, x):
        h = self._hidden_t(params, x)
        return self._average(self._readout(params, h)), (self._penultimate(params, h) if self.members == 1 else None)

    def _average(self, outputs):
        return outputs[:, 0] if self.members == 1 else outputs.mean(dim=1)     # (R, B, out)

    def neuron_sets(self):
        sets = []
        for l in range(self.cfg.depth):
            slots = [Slot(f"layers.{l}.weight", 2)]
            if self.cfg.bias:
                slots.append(Slot(f"layers.{l}.bias", 2))
            slots.append(Slot(f"layers.{l + 1}.weight", 3))
            sets.append(NeuronSet(f"layer{l}", tuple(slots), lead=2))
        return sets

    def symmetries(self):
        syms: list[Symmetry] = []
        for ns in self.neuron_sets():
            syms.append(Swap(ns))
            if self.cfg.activation == "tanh":
                syms.append(SignFlip(ns))
        if self.members > 1:
            syms.append(Swap(NeuronSet("members", tuple(Slot(k, 1) for k in self.shapes()), lead=1)))
        return syms

    def products(self, params):
        return {f".layer{l}": params[f"layers.{l}.weight"] for l in range(len(self.sizes) - 1)}

    def mirror_blocks(self, sym, params, order, x, loss_of):
        """Hidden neurons' sign flips and swaps in closed form (symrun.curvature); member swaps
        of an ensemble go by Hessian-vector products."""
        return curvature.neuron_blocks(self, sym, params, order, x, loss_of)

    def member_vectors(self, params):
        if self.members == 1:
            return None
        return torch.cat([p.flatten(2) for p in params.values()], dim=-1)   # (R, M, P)

    def run_state(self, params, r):
        state = super().run_state(params, r)
        return {k: v[0] for k, v in state.items()} if self.members == 1 else state


class Attention(PackedModel):
    """One multi-head self-attention layer, mean-pooled over tokens, then a linear readout.

    An input row (d,) is read as T tokens of e = d/T features, X (T, e), plus learned positions.
    Per head h: A = softmax((X W_Q)(X W_K)ᵀ/√k) over keys, head output A (X W_V) W_O; heads are
    summed (= concatenated, then W_O), averaged over tokens and mapped to the output by `readout`.
    Parameters: query (R, H, e, k) = W_Q, key (R, H, k, e) = W_Kᵀ (so query @ key = W_Q W_Kᵀ),
    value (R, H, e, k), out (R, H, k, e), readout (R, e, o) [, position (R, T, e)].

    Scores depend on W_Q, W_K only through W_Q W_Kᵀ, so (W_Q, W_K) → (W_Q R, W_K R) for orthogonal R
    of the k-space is a symmetry; its mirrors drive the rank of W_Q W_Kᵀ down under weight decay
    (shared/science.md §3). (W_V, W_O) → (W_V R, Rᵀ W_O) is one too.
    """

    def __init__(self, cfg: AttentionConfig, in_dim: int, out_dim: int):
        if in_dim % cfg.tokens:
            raise ConfigError(f"model.tokens={cfg.tokens} must divide the input dimension {in_dim}")
        self.cfg, self.t, self.e, self.o = cfg, cfg.tokens, in_dim // cfg.tokens, out_dim

    def shapes(self):
        s, h, k, e = self.cfg.init_scale, self.cfg.heads, self.cfg.key_dim, self.e
        out = {"query": ((h, e, k), s / math.sqrt(e)), "key": ((h, k, e), s / math.sqrt(e)),
               "value": ((h, e, k), s / math.sqrt(e)), "out": ((h, k, e), s / math.sqrt(h * k)),
               "readout": ((e, self.o), s / math.sqrt(e))}
        if self.cfg.positions:
            out["position"] = ((self.t, e), s)      # on the scale of the N(0, 1) input features
        return out

    def forward(self, params, x):
        r = params["query"].shape[0]
        tokens = x.reshape(*x.shape[:-1], self.t, self.e).expand(r, *x.shape[-2:-1], self.t, self.e)  # (R, B, T, e)
        if self.cfg.positions:
            tokens = tokens + params["position"].unsqueeze(1)
        q = torch.einsum("rbte,rhek->rhbtk", tokens, params["query"])               # (R, H, B, T, k)
        k = torch.einsum("rbte,rhke->rhbtk", tokens, params["key"])
        v = torch.einsum("rbte,rhek->rhbtk", tokens, params["value"])
        att = torch.softmax(q @ k.mT / math.sqrt(self.cfg.key_dim), dim=-1)          # (R, H, B, T, T)
        heads = torch.einsum("rhbtk,rhke->rbte", att @ v, params["out"])             # (R, B, T, e)
        return heads.mean(dim=-2) @ params["readout"]                                # (R, B, o)

    def symmetries(self):
        return [Rotation("query", "key"), Rotation("value", "out")]

    def products(self, params):
        qk = params["query"] @ params["key"]                                         # (R, H, e, e)
        per_head = {f".head{h}": qk[:, h] for h in range(qk.shape[1])} if qk.shape[1] > 1 else {}
        return {"": qk, **per_head}

    def balance_pair(self, params):
        return params["query"], params["key"]


class Linear(PackedModel):
    """f(x) = Θᵀx with Θ (R, d, o), and an optional linear constraint OᵀΘ = 0 (O: d × k,
    orthonormal columns). With `dcs` the constraint is enforced by DCS (shared/science.md §6):
    Θ = (I − OOᵀ)w + O(u⊙v), w (R, d, o), u, v (R, k, o), weight decay on all three. Each pair
    (u_i, v_i) has a sign mirror whose constraint set is c_i = (OᵀΘ)_i = 0; by the L1 equivalence
    the penalty on c is λ‖c‖₁, so c is exactly 0 once λ ≥ |∂ℓ/∂c| at c = 0. Without `dcs`,
    Θ = w (the unconstrained baseline) and the constraint is only measured."""

    def __init__(self, cfg: LinearConfig, in_dim: int, out_dim: int):
        if cfg.constraint == "prefix" and not 1 <= cfg.constrained <= in_dim:
            raise ConfigError(f"model.constrained must be in [1, {in_dim}] (the input dimension), got {cfg.constrained}")
        self.cfg, self.d, self.o = cfg, in_dim, out_dim
        self.k = {"none": 0, "sum_to_zero": 1, "prefix": cfg.constrained}[cfg.constraint]

    def basis(self, like: torch.Tensor) -> torch.Tensor:
        """O (d, k) with orthonormal columns, in `like`'s dtype and device."""
        if self.cfg.constraint == "sum_to_zero":
            return torch.full((self.d, 1), 1 / math.sqrt(self.d), dtype=like.dtype, device=like.device)
        return torch.eye(self.d, self.k, dtype=like.dtype, device=like.device)

    def shapes(self):
        std = self.cfg.init_scale / math.sqrt(self.d)
        out = {"w": ((self.d, self.o), std)}
        if self.cfg.dcs:
            out.update(u=((self.k, self.o), std), v=((self.k, self.o), std))
        return out

    def theta(self, params: Params) -> torch.Tensor:
        """The effective coefficients Θ: (R, d, o)."""
        w = params["w"]
        if not self.cfg.dcs:
            return w
        o = self.basis(w)                                                # O acts on Θ's input axis
        return dcs_theta(w, params["u"], params["v"], Basis(self.k, lambda t: o.T @ t, lambda c: o @ c))

    def forward(self, params, x):
        return x @ self.theta(params)                                    # (R, B, o)

    def pairs(self) -> NeuronSet:
        return NeuronSet("constraint", (Slot("u", 1), Slot("v", 1)))

    def symmetries(self):
        return [SignFlip(self.pairs())] if self.cfg.dcs else []

    def constraint_violation(self, params):
        if self.k == 0:
            return None
        theta = self.theta({k: v.double() for k, v in params.items()})  # float64: no round-off floor at 1e-7
        return (self.basis(theta).T @ theta).flatten(1).norm(dim=-1)     # ‖OᵀΘ‖_F: (R,)

    def run_state(self, params, r):
        return {**super().run_state(params, r), "theta": self.theta(params)[r].detach().cpu().clone()}


def build(cfg: ModelConfig, in_dim: int, out_dim: int) -> PackedModel:
    """The packed model a model config names, for data of the given input/output sizes."""
    if isinstance(cfg, HadamardConfig):
        return Hadamard(cfg, in_dim, out_dim)
    if isinstance(cfg, FactorizationConfig):
        return Factorization(cfg, in_dim, out_dim)
    if isinstance(cfg, MLPConfig):
        return MLP(cfg, in_dim, out_dim)
    if isinstance(cfg, AttentionConfig):
        return Attention(cfg, in_dim, out_dim)
    if isinstance(cfg, LinearConfig):
        return Linear(cfg, in_dim, out_dim)
    if isinstance(cfg, (ResNetConfig, TransformerConfig)):
        from symrun import nets   # real networks live in their own module (and may need torchvision)

        return nets.ResNet18(cfg, in_dim, out_dim) if isinstance(cfg, ResNetConfig) else nets.Transformer(cfg, in_dim, out_dim)
    raise ConfigError(f"unknown model '{cfg.name}'")
