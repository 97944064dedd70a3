"""Any torch.nn.Module of the user's as a PackedModel (model=module; symrun.models.module).

A pack of R runs is one set of stacked parameters, (R, *shape) per parameter of the module, and
the forward pass is torch.func's ensembling: `vmap(functional_call(skeleton, ·, x))` over the
run axis, the input shared by every run (in_dims None) or one minibatch per run (in_dims 0).
The skeleton is the module on the "meta" device: it only says what to compute.

Run r's initialisation is the module's own (its constructor's, through torch's default
generator) drawn from the run's (seed, "init") stream, so a run alone and the same run inside a
pack start from the same point. Buffers that stay constant are shared by every run; buffers
that training would update (BatchNorm running statistics) are refused, as is randomness inside
the forward pass (Dropout): a run's numbers must not depend on its pack.

Its mirrors are the user's declarations (`model.mirrors`), checked against the module here;
`candidates` proposes the sign flips, unit swaps and rotations `symrun check --discover` tries.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import sys
import threading
from typing import Iterator

import torch
from torch.func import functional_call, stack_module_state, vmap

from symrun.config import ConfigError
from symrun.models.module import IMPORT_PATH, ModuleConfig
from symrun.models.nets.base import PackedModel, Params, in_chunks, module_width
from symrun.seeds import by_seed, derive_seed
from symrun.analysis.symmetries import NeuronSet, Rotation, SignFlip, Slot, Swap, Symmetry

PROBE_BATCH = 3                      # examples the module is tried on before any work
_GLOBAL_RNG = threading.Lock()       # held while torch's own generator is seeded for a run's draws


@contextlib.contextmanager
def user_path() -> Iterator[None]:
    """sys.path with the current folder and the user's config folders in front, for an import."""
    extra = [os.getcwd(), *[p for p in os.environ.get(IMPORT_PATH, "").split(os.pathsep) if p]]
    saved = list(sys.path)
    sys.path[:0] = [p for p in extra if p not in sys.path]
    try:
        yield
    finally:
        sys.path[:] = saved


def import_class(target: str) -> type:
    """The nn.Module subclass `package.module.Class` names; one-line ConfigError otherwise."""
    module, _, name = target.rpartition(".")
    if not module:
        raise ConfigError(f"model._target_={target} must be package.module.Class")
    try:
        with user_path():
            cls = getattr(importlib.import_module(module), name)
    except AttributeError:
        raise ConfigError(f"model._target_={target}: module {module} has no {name}") from None
    except Exception as e:  # noqa: BLE001 — whatever the user's module raises on import is bad input
        raise ConfigError(f"model._target_={target}: cannot import {module} ({type(e).__name__}: {_line(e)}); "
                          "it must be importable from the current folder, PYTHONPATH or a config folder (-cd)") from None
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ConfigError(f"model._target_={target} is not a torch.nn.Module class")
    return cls


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


class ModuleModel(PackedModel):
    """A user's nn.Module packed over runs (see the module's docstring)."""

    def __init__(self, cfg: ModuleConfig, in_dim: int, out_dim: int):
        self.cfg, self.cls = cfg, import_class(cfg.target)
        template = self._construct()
        params = {k: p.detach() for k, p in template.named_parameters()}
        if not params:
            raise ConfigError(f"model._target_={cfg.target} has no parameters to train")
        self._shapes = {k: tuple(p.shape) for k, p in params.items()}
        self.buffers = {k: b.detach().clone() for k, b in template.named_buffers()}
        self._refuse_updated_buffers(template, in_dim)
        self.width = self._width(template, in_dim, out_dim)
        self.skeleton = template.to("meta")
        self._pristine = copy.deepcopy(self.skeleton)  # never called: what other threads copy (`_skeleton`)
        self._threads = threading.local()
        self._on: dict = {}                          # constant buffers per (device, dtype)
        self.declared = [declared_symmetry(m, i, self._shapes) for i, m in enumerate(cfg.mirrors)]
        self._probe(in_dim, out_dim)

    def _construct(self) -> torch.nn.Module:
        try:
            return self.cls(**self.cfg.args)
        except Exception as e:  # noqa: BLE001 — a constructor that fails on the user's arguments is bad input
            args = ", ".join(f"{k}={v!r}" for k, v in self.cfg.args.items())
            raise ConfigError(f"model._target_={self.cfg.target}: {self.cls.__name__}({args}) failed: "
                              f"{type(e).__name__}: {_line(e)}") from None

    def _refuse_updated_buffers(self, template: torch.nn.Module, in_dim: int) -> None:
        """Buffers a training-mode forward changes (BatchNorm's running statistics) would differ
        per run and be updated outside autograd: refused, with one line."""
        if not self.buffers:
            return
        template.train()
        try:
            with torch.no_grad():
                template(torch.randn(PROBE_BATCH, in_dim, generator=torch.Generator().manual_seed(0)))
        except Exception:  # noqa: BLE001 — the probe below names the error
            return
        moved = [k for k, b in template.named_buffers() if not torch.equal(b, self.buffers[k])]
        if moved:
            raise ConfigError(f"model._target_={self.cfg.target} updates its buffers ({', '.join(moved)}) as it trains, "
                              "e.g. BatchNorm's running statistics: symrun packs modules whose buffers stay constant "
                              "(use track_running_stats=False, LayerNorm or GroupNorm)")

    def _width(self, template: torch.nn.Module, in_dim: int, out_dim: int) -> int:
        """`example_width`, measured on the module (one example, autograd off); in + out when
        its forward cannot run alone (`_probe` then names the error)."""
        try:
            return max(in_dim + out_dim, module_width(template, torch.zeros(1, in_dim)))
        except Exception:  # noqa: BLE001
            return in_dim + out_dim

    def example_width(self):
        return self.width

    def _probe(self, in_dim: int, out_dim: int) -> None:
        """Two runs on a small batch, as the engine will call it: one line if it cannot be
        batched over runs, draws random numbers, or gives outputs of the wrong shape."""
        x = torch.randn(PROBE_BATCH, in_dim, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                out = self.forward(self.init_params([0, 1], torch.device("cpu"), torch.float32), x)
        except Exception as e:  # noqa: BLE001
            hint = (" (it draws random numbers, e.g. Dropout: a run's numbers must not depend on its pack)"
                    if "random" in str(e).lower() else "")
            raise ConfigError(f"model._target_={self.cfg.target}: its forward pass on a batch of {PROBE_BATCH} inputs of "
                              f"{in_dim} features, batched over runs by torch.func.vmap, failed{hint}: "
                              f"{type(e).__name__}: {_line(e)}") from None
        if tuple(out.shape) != (2, PROBE_BATCH, out_dim):
            raise ConfigError(f"model._target_={self.cfg.target}: its output for a batch of {PROBE_BATCH} inputs has shape "
                              f"{tuple(out.shape[1:])}; the data needs ({PROBE_BATCH}, {out_dim})")

    def shapes(self):
        return {k: (shape, 0.0) for k, shape in self._shapes.items()}

    def init_params(self, seeds: list[int], device: torch.device, dtype: torch.dtype) -> Params:
        """Each run's parameters as the module's constructor draws them, from the torch generator
        seeded by the run's (seed, "init") stream, times model.init_scale; stacked (R, ...)."""
        distinct, places = by_seed(seeds)       # runs of a seed start alike: one module a seed
        nets = []
        for seed in distinct:
            # torch's generator is the process's: the parts of a pack (symrun.training.shards)
            # draw their runs' initialisations one at a time
            with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(seed, "init"))
                nets.append(self._construct())
        stacked, _ = stack_module_state(nets)
        return {k: (stacked[k].detach()[places] * self.cfg.init_scale).to(device=device, dtype=dtype).requires_grad_()
                for k in self._shapes}

    def _buffers(self, like: torch.Tensor) -> Params:
        key = (like.device, like.dtype)
        if key not in self._on:
            self._on[key] = {k: b.to(device=like.device, dtype=like.dtype if b.is_floating_point() else b.dtype)
                             for k, b in self.buffers.items()}
        return self._on[key]

    def _skeleton(self) -> torch.nn.Module:
        """The skeleton this thread calls: functional_call swaps a module's tensors in and out
        while it runs, so the parts of a pack, each on its thread (symrun.training.shards), have their own
        copy (a meta module: no memory)."""
        net = getattr(self._threads, "net", None)
        if net is None:       # copied from a skeleton no thread calls: one being called is mid-swap
            net = self._threads.net = self.skeleton if threading.current_thread() is threading.main_thread() \
                else copy.deepcopy(self._pristine)
        return net

    def forward(self, params, x):
        buffers = self._buffers(x)

        def one(p: Params, xb: torch.Tensor) -> torch.Tensor:
            return functional_call(self._skeleton(), (p, buffers), (xb,))

        def batched(p: Params, xb: torch.Tensor) -> torch.Tensor:
            return vmap(one, in_dims=(0, None if xb.dim() == 2 else 0))(p, xb)         # (R, B, out)

        return in_chunks(batched, params, x, self.width)

    # -- symmetry: declared mirrors and what they measure -------------------------------------

    def symmetries(self) -> list[Symmetry]:
        return list(self.declared)

    def neuron_sets(self) -> list[NeuronSet]:
        """The declared rescaling groups: their dead fraction is `sparsity`."""
        return list(dict.fromkeys(s.neurons for s in self.declared if isinstance(s, SignFlip)))

    def permutation_sets(self) -> list[NeuronSet]:
        """The declared permutation groups: their identical units give `independent_fraction`."""
        return list(dict.fromkeys(s.neurons for s in self.declared if isinstance(s, Swap)))

    def products(self, params):
        """left · right of each declared rotation: the first as `rank`, each as `rank.<name>` when
        there are several."""
        rotations = [s for s in self.declared if isinstance(s, Rotation)]
        out = {}
        for i, (sym, name) in enumerate(zip(rotations, self._rotation_names())):
            product = params[sym.left] @ params[sym.right]
            if i == 0:
                out[""] = product
            if len(rotations) > 1:
                out[name] = product
        return out

    def _rotation_names(self) -> list[str]:
        return [m["name"] for m in self.cfg.mirrors if m["kind"] == "rotation"]

    def candidates(self) -> list[Symmetry]:
        """What `symrun check` tries beyond the declarations (symrun.models.nets.discover)."""
        from symrun.models.nets.discover import candidates, same_mirror

        return [c for c in candidates(self._shapes) if not any(same_mirror(c, d) for d in self.declared)]


def declared_symmetry(m: dict, i: int, shapes: dict[str, tuple[int, ...]]) -> Symmetry:
    """A mirror of model.mirrors (already checked for form) as a Symmetry on the module's
    parameters, axes moved past the run axis; one-line ConfigError for an unknown parameter, an
    axis out of range or sizes that do not match."""
    where = f"model.mirrors[{i}]"

    def shape(param: str) -> tuple[int, ...]:
        if param not in shapes:
            raise ConfigError(f"{where}: the module has no parameter '{param}' (it has: {', '.join(shapes)})")
        return shapes[param]

    if m["kind"] == "rotation":
        left, right = shape(m["left"]), shape(m["right"])
        if len(left) < 2 or len(right) < 2 or left[-1] != right[-2] or left[:-2] != right[:-2]:
            raise ConfigError(f"{where}: a rotation needs left (…, a, h) and right (…, h, b) with the same h; "
                              f"{m['left']} is {left} and {m['right']} is {right}")
        return Rotation(m["left"], m["right"])
    slots, sizes = [], {}
    for param, axis in m["slots"]:
        dims = shape(param)
        if not -len(dims) <= axis < len(dims):
            raise ConfigError(f"{where}: axis {axis} of {param} is out of range (its shape is {dims})")
        axis %= len(dims)
        sizes[f"{param}[{axis}]"] = dims[axis]
        slots.append(Slot(param, axis + 1))                       # + 1: the run axis comes first
    if len(set(sizes.values())) != 1:
        raise ConfigError(f"{where}: its slots must index the same number of units, got "
                          + ", ".join(f"{k} = {v}" for k, v in sizes.items()))
    neurons = NeuronSet(m["name"], tuple(slots), lead=1)
    return SignFlip(neurons) if m["kind"] == "rescaling" else Swap(neurons)
