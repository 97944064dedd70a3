"""Models: what symrun trains, declared once each (symrun.models.registry).

- `registry`: every model option as a `ModelSpec`; `build(cfg, in_dim, out_dim)`.
- one module per option, torch-free: its config dataclass and its spec (hadamard, factorization,
  mlp with ensemble, attention, linear, resnet, transformer, and `module`: a user's nn.Module).
- `nets/`: the packed networks themselves (torch): the `PackedModel` interface (nets.base), one
  module per option, the closed-form neuron curvature of MLPs (nets.curvature), and the
  adapter that packs any torch.nn.Module over runs through torch.func (nets.module).
"""

from symrun.models.registry import ModelSpec, build, names, options, spec

__all__ = ["ModelSpec", "build", "names", "options", "spec"]
