"""The packed model's interface: one definition serves a pack of R runs (R = 1 included).

Parameters are a dict of tensors whose leading axis is the run axis R; MLPs and ensembles add a
member axis M (M = 1 for a plain MLP). `forward(params, x)` takes x shared by every run, (B, d),
or one minibatch per run, (R, B, d), and returns (R, B, out). Each model declares its mirror
symmetries (symrun.analysis.symmetries) and the matrices whose rank it reports.

Initialisation is drawn per run from the run's own "init" stream on the CPU in float64, so a run
starts from the same point whatever pack, device or dtype it is trained in.
"""

from __future__ import annotations

from typing import Callable

import torch

from symrun.seeds import by_seed, generator
from symrun.training import memory
from symrun.analysis.symmetries import NeuronSet, SignFlip, Swap, Symmetry

Params = dict[str, torch.Tensor]


class PackedModel:
    """Base class: subclasses give `shapes`, `forward` and what they declare about symmetry."""

    permutes_neurons = False   # whether neurons of a layer can be swapped (report independent_fraction)
    second_order = True        # whether a run's end may take Hessian-vector products (symrun.analysis.critical)
    threadsafe = True          # whether shards of a pack may run its forward on several threads at once

    def shapes(self) -> dict[str, tuple[tuple[int, ...], float]]:
        """Per-run parameter shapes and initial standard deviations."""
        raise NotImplementedError

    def init_params(self, seeds: list[int], device: torch.device, dtype: torch.dtype) -> Params:
        stds = {k: std for k, (_, std) in self.shapes().items()}
        return {k: v.requires_grad_() for k, v in self._draw(seeds, "init", stds, device, dtype).items()}

    def _draw(self, seeds, purpose: str, stds: dict[str, float], device, dtype) -> Params:
        """Each run's draw from its (seed, purpose) stream, stacked (R, ...). Runs of a seed draw
        the same numbers, so each seed is drawn once: the Hadamard grid's pack (4,352 runs, 256
        seeds) started in 0.19–0.23 s a part on two threads, now in 0.013–0.027 s."""
        distinct, places = by_seed(seeds)
        per_seed = []
        for seed in distinct:
            g = generator(seed, purpose)
            per_seed.append({k: torch.randn(shape, generator=g, dtype=torch.float64) * stds[k]
                             for k, (shape, _) in self.shapes().items()})
        return {k: torch.stack([p[k] for p in per_seed])[places].to(device=device, dtype=dtype) for k in self.shapes()}

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_and_grads(self, params: Params, x: torch.Tensor, y: torch.Tensor,
                       task: str) -> tuple[torch.Tensor, Params] | None:
        """A training step's loss per run, (R,) — loss_per_run of `forward(params, x)` — and its
        gradient with respect to each of `params`, written out by hand (no autograd graph: a
        small model's step is otherwise mostly the graph's bookkeeping). None where the model has
        none for this input: the step then goes through autograd. Called under torch.no_grad."""
        return None

    def example_width(self) -> int:
        """Activations one example of one run produces in a forward pass (the input, every
        layer's output, the output), in elements: what an evaluation pass holds per (run,
        example), within symrun.training.memory.EVAL_BYTES."""
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

    def permutation_sets(self) -> list[NeuronSet]:
        """Groups whose identical members `independent_fraction` counts: the neuron sets of a
        model that permutes its neurons."""
        return self.neuron_sets() if self.permutes_neurons else []

    def products(self, params: Params) -> dict[str, torch.Tensor]:
        """Matrices whose ranks are reported: {qualifier of their columns (symrun.analysis.metrics.column:
        "" for the plain `rank`, "layer0" for `rank.layer0`): (R, ..., a, b)}."""
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
        form for `sym`: symrun.analysis.critical then builds the block from Hessian-vector products."""
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


def in_chunks(forward: Callable, params: Params, x: torch.Tensor, width: int) -> torch.Tensor:
    """forward(params, x) over chunks of the batch when autograd is off, each chunk's runs ×
    examples × `width` activations within memory.EVAL_BYTES; x is (B, ...) shared by the runs or
    (R, B, ...) per run, the output (R, B, ...)."""
    axis = 0 if x.dim() == 2 else 1
    size = max(1, memory.eval_items(width) // runs_of(params))
    if torch.is_grad_enabled() or x.shape[axis] <= size:
        return forward(params, x)
    return torch.cat([forward(params, chunk) for chunk in x.split(size, dim=axis)], dim=1)


def runs_of(params: Params) -> int:
    return next(iter(params.values())).shape[0]


def module_width(net: torch.nn.Module, x: torch.Tensor) -> int:
    """`example_width` of a torch module, measured: the input's and every leaf module's output
    elements for the batch x, per example (on the meta device nothing is computed)."""
    total = [x[0].numel()]

    def count(module, inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output[0].numel()

    leaves = [m for m in net.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            net(x[:1])
    finally:
        for h in handles:
            h.remove()
    return total[0]
