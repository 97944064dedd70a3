"""Fully connected nets and ensembles of them, packed over runs, and a fast CPU tanh."""

from __future__ import annotations

import math

import numpy as np
import torch

from symrun.models.nets import cpu, curvature
from symrun.models.nets.base import PackedModel
from symrun.training.loss import loss_and_grad_t
from symrun.models.mlp import EnsembleConfig, MLPConfig
from symrun.analysis.symmetries import NeuronSet, SignFlip, Slot, Swap, Symmetry


class _NumpyTanh(torch.autograd.Function):
    """tanh on CPU through numpy's vectorised kernel. On the 2-core AMD EPYC it was written on,
    torch's CPU tanh ran as a scalar loop (the same speed at every ATEN_CPU_CAPABILITY), 3.5×
    slower on 2M float32 values with 2 cores than numpy's SIMD tanh on one; on a 2-core Intel
    Xeon (AVX-512) the two kernels are even (0.78 and 0.77 ms on one core), so this costs
    nothing where torch's is vectorised. Both are within an ulp or so of the exact value
    (relative error ≤ 1.1e-7 in float32 and 2.3e-16 in float64, near 0 included). The
    backward is torch's own tanh_backward of the saved output, itself differentiable, so
    Hessian-vector products (symrun.analysis.critical, symrun check) differentiate through it as
    through torch.tanh."""

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


def tanh_(x: torch.Tensor) -> torch.Tensor:
    """torch.tanh_, through numpy on the CPU for float32/float64 (as `tanh`)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        with torch.profiler.record_function(cpu.NUMPY_OP):
            np.tanh(x.numpy(), out=x.numpy())
        return x
    return x.tanh_()


# Without a graph (an evaluation, MLP.loss_and_grads): σ(z) overwriting z; and for the hand-written
# step δ = g ⊙ σ'(z) from the activation σ(z), the kernels autograd's own backward of tanh and relu uses.
_ACTIVATE = {"tanh": tanh_, "relu": torch.relu_}
_BACKWARD = {"tanh": torch.ops.aten.tanh_backward,
             "relu": lambda grad, out: torch.ops.aten.threshold_backward(grad, out, 0)}


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

    def example_width(self):
        """The input, each member's pre-activations and activations of every hidden layer, its output."""
        return self.sizes[0] + self.members * (2 * sum(self.sizes[1:-1]) + self.sizes[-1])

    def _hidden_t(self, params, x):
        """Activations of the last hidden layer, feature-major: (R, M, width, B)."""
        h = self._layer_t(params, 0, x)
        for l in range(self.cfg.depth):
            if l > 0:
                h = self._layer_t(params, l, h)
            h = self._act(h)
        return h

    def _act(self, h):
        """σ(h); without a graph to keep (an evaluation, a hand-written step), in place where it can be."""
        return self.act(h) if torch.is_grad_enabled() else _ACTIVATE.get(self.cfg.activation, self.act)(h)

    def _layer_t(self, params, l: int, x):
        """W x + b for layer l of every run and member, feature-major: (R, M, out, B). x is data,
        shared (B, in) or per run (R, B, in), or the previous layer's (R, M, in, B).

        Feature-major is the layout in which every matmul of a training step — forward, and the
        weight and input gradients autograd derives from it — writes a contiguous result of the
        parameter's own (out, in) layout, so the optimiser's update reads it without a strided
        pass; and the wide dimension (the batch) is the GEMMs' long one. Without a graph to keep,
        the bias is added in place."""
        h, b = self._linear_t(params, l, x), params.get(f"layers.{l}.bias")
        if b is None:
            return h
        return h + b.unsqueeze(-1) if torch.is_grad_enabled() else h.add_(b.unsqueeze(-1))

    def _linear_t(self, params, l: int, x):
        """W x for layer l, feature-major (R, M, out, B), x as `_layer_t` takes it."""
        w = params[f"layers.{l}.weight"]
        r, m, o, i = w.shape
        if x.dim() == 2:
            # A shared input (full batch): one large GEMM over all runs and members.
            # (reshape, not view: cpu.matmul may hand back a transposed product, symrun.models.nets.cpu)
            return cpu.matmul(w.reshape(r * m * o, i), x.T).reshape(r, m, o, x.shape[0])
        if x.dim() == 3:                      # per-run data (R, B, in): a transposed view
            x = x.mT.unsqueeze(1).expand(r, m, i, x.shape[1])
        return cpu.matmul(w, x)

    def loss_and_grads(self, params, x, y, task):
        """The forward pass feature-major as `forward` does it, then its backward written out:
        layer by layer, δ = Wᵀδ' ⊙ σ'(z) and ∂W = δ aᵀ, ∂b = Σ_B δ. Every hidden activation is
        made in place from its pre-activation (one array per layer, no graph)."""
        if self.cfg.activation not in _BACKWARD:
            return None
        depth, m = self.cfg.depth, self.members
        inputs = [x]                                          # each layer's input; hidden ones (R, M, in, B)
        for l in range(depth):
            inputs.append(self._act(self._layer_t(params, l, inputs[-1])))
        out = self._layer_t(params, depth, inputs[-1])        # (R, M, o, B)
        loss, delta = loss_and_grad_t(out[:, 0] if m == 1 else out.mean(1), y, task)
        delta = delta.unsqueeze(1) if m == 1 else (delta / m).unsqueeze(1).expand(out.shape)
        grads = {}
        for l in range(depth, -1, -1):
            a = inputs[l]
            if l < depth:                                     # back through layer l's activation
                w_next = params[f"layers.{l + 1}.weight"]
                delta = _BACKWARD[self.cfg.activation](cpu.matmul_rows(w_next.mT, delta), inputs[l + 1])
            grads[f"layers.{l}.weight"] = self._weight_grad(delta, a, params[f"layers.{l}.weight"].shape)
            if self.cfg.bias:
                grads[f"layers.{l}.bias"] = delta.sum(-1)
        return loss, grads

    @staticmethod
    def _weight_grad(delta, a, shape):
        """∂W = δ aᵀ summed over the batch, (R, M, out, in), for δ (R, M, out, B) and the layer's
        input a: shared data (B, in), per-run data (R, B, in) or activations (R, M, in, B)."""
        r, m, o, i = shape
        if a.dim() == 2:
            return cpu.matmul_rows(delta.reshape(r * m * o, -1), a).view(shape)
        if a.dim() == 3:
            return cpu.matmul_rows(delta.reshape(r, m * o, -1), a).view(shape)
        return cpu.matmul_rows(delta, a.mT)

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
        return {f"layer{l}": params[f"layers.{l}.weight"] for l in range(len(self.sizes) - 1)}

    def mirror_blocks(self, sym, params, order, x, loss_of):
        """Hidden neurons' sign flips and swaps in closed form (symrun.models.nets.curvature); member swaps
        of an ensemble go by Hessian-vector products."""
        return curvature.neuron_blocks(self, sym, params, order, x, loss_of)

    def member_vectors(self, params):
        if self.members == 1:
            return None
        return torch.cat([p.flatten(2) for p in params.values()], dim=-1)   # (R, M, P)

    def run_state(self, params, r):
        state = super().run_state(params, r)
        return {k: v[0] for k, v in state.items()} if self.members == 1 else state

