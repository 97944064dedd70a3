"""What the optimiser trains (ρ) versus what the network uses (θ = g(ρ)); weight decay acts on ρ.

Two reparametrisations apply to every model, because they only rename and recombine the model's
parameter dict:

- **symmetry removal** (`symmetry.remove`): θ = ρ + b with b ~ N(0, remove_std²) fixed per run
  (Ziyin et al., ICLR 2025). The zero point of a rescaling pair, the equal point of two neurons
  and a rank-deficient product are no longer mirror-symmetric points of ρ's objective, so the
  model's mirrors are gone (docs/theory.md §3).
- **DCS** (`constraint=dcs`, docs/theory.md §6, the paper's Eq. 8): a named parameter p is
  trained as θ_p = (I − OOᵀ)w + O(u⊙v). Each pair (uᵢ, vᵢ) is a sign mirror of ρ's objective with
  constraint set cᵢ = (Oᵀθ_p)ᵢ = 0; by the L1 equivalence the penalty on c is λ‖c‖₁, so cᵢ is
  exactly 0 once λ ≥ |∂ℓ/∂cᵢ| at cᵢ = 0. O = I is spred (θ = u⊙v, Ziyin & Wang 2023: an exact
  lasso); `group` trains θ_p = s·w with one scalar s, a sign mirror (s, w) → (−s, −w) whose set
  is θ_p = 0 (group sparsity). With `constraint.enforce=false` θ_p is trained as itself and the
  same constraint is only measured: the baseline DCS is compared against.

This is `torch.nn.utils.parametrize`'s idea (a parameter computed from others in every forward
pass) applied to symrun's stacked dict of (R, ...) tensors, which are not module attributes.
O is never formed for the structured kinds: each `Basis` is the pair of maps w ↦ Oᵀw, c ↦ Oc.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from symrun.config import Config, ConfigError, MetricsConfig
from symrun.analysis.symmetries import NeuronSet, Rotation, SignFlip, Slot, Symmetry

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Basis:
    """O for one parameter of per-run shape `shape`: restrict (R, *shape) → (R, k) = Oᵀw,
    embed (R, k) → (R, *shape) = Oc."""

    k: int
    restrict: Callable[[torch.Tensor], torch.Tensor]
    embed: Callable[[torch.Tensor], torch.Tensor]


def dcs_theta(w: Optional[torch.Tensor], u: torch.Tensor, v: torch.Tensor, basis: Basis) -> torch.Tensor:
    """θ = (I − OOᵀ)w + O(u⊙v); w = None means O = I (θ = u⊙v: spred)."""
    c = basis.embed(u * v)
    return c if w is None else w - basis.embed(basis.restrict(w)) + c


def identity_basis(shape: tuple[int, ...]) -> Basis:
    n = math.prod(shape)
    return Basis(n, lambda w: w.flatten(1), lambda c: c.reshape(c.shape[0], *shape))


def sum_basis(shape: tuple[int, ...], per: str) -> Basis:
    """Orthonormal O whose columns are the normalised indicator of each summed slice: the slices
    along the last axis (per=output) or the whole parameter (per=layer)."""
    length = shape[-1] if per == "output" and len(shape) else max(1, math.prod(shape))
    rows = shape[:-1] if per == "output" and len(shape) else ()
    scale = 1 / math.sqrt(length)

    def restrict(w):
        return (w.reshape(w.shape[0], -1, length).sum(-1) * scale)            # (R, k)

    def embed(c):
        return (c.unsqueeze(-1) * scale).expand(c.shape[0], c.shape[1], length).reshape(c.shape[0], *shape)

    return Basis(max(1, math.prod(rows)), restrict, embed)


def dense_basis(o: torch.Tensor, shape: tuple[int, ...]) -> Basis:
    """O given as an (entries, k) matrix with orthonormal columns."""
    return Basis(o.shape[1], lambda w: w.flatten(1) @ o.to(w), lambda c: (c @ o.to(c).T).reshape(c.shape[0], *shape))


def load_subspace(path: str, entries: int, name: str) -> torch.Tensor:
    """O from a user's .npy/.npz, checked and orthonormalised (QR); one-line ConfigError otherwise."""
    where = f"constraint.path {path}"
    try:
        loaded = np.load(Path(path).expanduser(), allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            keys = list(loaded.keys())
            if "O" not in keys and len(keys) != 1:
                raise ConfigError(f"{where}: an .npz needs an array named O (it has {', '.join(keys) or 'none'})")
            loaded = loaded["O" if "O" in keys else keys[0]]
        o = np.asarray(loaded, dtype=np.float64)
    except ConfigError:
        raise
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{where} is not a readable .npy/.npz array ({' '.join(str(e).split())})") from None
    if o.ndim == 1:
        o = o[:, None]
    if o.ndim != 2 or o.shape[0] != entries or not 1 <= o.shape[1] <= entries:
        raise ConfigError(f"{where}: O must be ({entries}, k) with 1 <= k <= {entries} for parameter {name}, got shape {o.shape}")
    if not np.isfinite(o).all():
        raise ConfigError(f"{where}: O has non-finite entries")
    q, r = np.linalg.qr(o)
    diag = np.abs(np.diag(r))
    if diag.min() <= 1e-10 * max(diag.max(), 1e-300):
        raise ConfigError(f"{where}: the columns of O are linearly dependent (rank < {o.shape[1]})")
    return torch.from_numpy(q)


class Reparam:
    """ρ ↦ θ for one pack: the identity, θ = ρ + b, or DCS on the parameters `constraint.params`
    names. `init` draws ρ so that θ starts at the model's own initialisation (plus b)."""

    def __init__(self, cfg: Config, model):
        self.model, self.shapes = model, {k: shape for k, (shape, _) in model.shapes().items()}
        self.remove_std = cfg.symmetry.remove_std if cfg.symmetry.remove else None
        self.offsets: Optional[Params] = None
        c = cfg.constraint
        self.kind = c.kind if c.name == "dcs" else None      # the constraint measured, if any
        self.enforced = self.kind is not None and c.enforce     # and whether DCS enforces it
        self.bases: dict[str, Basis] = {}
        self.constrained: list[str] = []
        if self.kind is None:
            return
        self.constrained = list(dict.fromkeys(c.params)) or list(self.shapes)
        unknown = [p for p in self.constrained if p not in self.shapes]
        if unknown:
            raise ConfigError(f"constraint.params names '{unknown[0]}', which model={cfg.model.name} does not have "
                              f"(it has: {', '.join(self.shapes)})")
        for p in self.constrained:
            shape = self.shapes[p]
            if self.kind == "sparse":
                self.bases[p] = identity_basis(shape)
            elif self.kind == "sum_zero":
                self.bases[p] = sum_basis(shape, c.per)
            elif self.kind == "subspace":
                self.bases[p] = dense_basis(load_subspace(c.path, math.prod(shape), p), shape)

    # -- the trained parameters ρ ------------------------------------------------------------

    def raw_names(self, p: str) -> tuple[str, ...]:
        if not self.enforced or p not in self.constrained:
            return (p,)
        return {"sparse": (f"{p}.u", f"{p}.v"), "group": (f"{p}.w", f"{p}.s")}.get(self.kind, (f"{p}.w", f"{p}.u", f"{p}.v"))

    def init(self, seeds: list[int], device: torch.device, dtype: torch.dtype) -> Params:
        """ρ (leaves requiring grad), drawn so that θ equals the model's initialisation (+ b); draws
        the offsets b of symmetry removal for these runs."""
        if self.remove_std is not None:
            self.offsets = self.model._draw(seeds, "offset", {k: self.remove_std for k in self.shapes}, device, dtype)
        return self.init_params(seeds, device, dtype)

    def init_params(self, seeds: list[int], device: torch.device, dtype: torch.dtype) -> Params:
        """A fresh ρ from these seeds' "init" streams (PackedModel.init_params, in ρ's names)."""
        theta = {k: v.detach() for k, v in self.model.init_params(seeds, device, dtype).items()}
        raw: Params = {}
        for p, t in theta.items():
            names = self.raw_names(p)
            if len(names) == 1:
                raw[p] = t
            elif self.kind == "group":            # θ = s·w, s = 1
                raw[names[0]], raw[names[1]] = t.reshape(t.shape[0], 1, -1), torch.ones(t.shape[0], 1, dtype=dtype, device=device)
            else:                                 # u = Oᵀθ, v = 1 (and w = θ)
                basis = self.bases[p]
                u = basis.restrict(t)
                if self.kind != "sparse":
                    raw[names[0]] = t
                raw[names[-2]], raw[names[-1]] = u, torch.ones_like(u)
        return {k: v.clone().requires_grad_() for k, v in raw.items()}

    def network(self, raw: Params, runs: slice = slice(None)) -> Params:
        """θ, the parameters the model's forward pass and the metrics see; `raw` may be the ρ of
        the pack's runs `runs` only (a shard, symrun.training.shards)."""
        theta = {}
        for p in self.shapes:
            names = self.raw_names(p)
            if len(names) == 1:
                theta[p] = raw[p]
            elif self.kind == "group":
                w, s = raw[names[0]], raw[names[1]]
                theta[p] = (s.unsqueeze(-1) * w).reshape(w.shape[0], *self.shapes[p])
            else:
                w = raw[names[0]] if self.kind != "sparse" else None
                theta[p] = dcs_theta(w, raw[names[-2]], raw[names[-1]], self.bases[p])
        if self.offsets is not None:
            theta = {k: v + self.offsets[k][runs] for k, v in theta.items()}
        return theta

    @property
    def plain_gradient(self) -> bool:
        """Whether ∂L/∂ρ is ∂L/∂θ, name for name: ρ = θ, or θ = ρ + b (DCS measuring only, or not at all)."""
        return not self.enforced

    def extra_parameters(self) -> int:
        """Parameters per run beyond the model's own (the cost of DCS)."""
        own = sum(math.prod(s) for s in self.shapes.values())
        return sum(math.prod(s) for s in self.raw_shapes().values()) - own

    def raw_shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for p, shape in self.shapes.items():
            names, n = self.raw_names(p), math.prod(shape)
            if len(names) == 1:
                out[p] = shape
            elif self.kind == "group":
                out.update({names[0]: (1, n), names[1]: (1,)})
            else:
                k = self.bases[p].k
                out.update({names[-2]: (k,), names[-1]: (k,)}, **({names[0]: shape} if self.kind != "sparse" else {}))
        return out

    # -- symmetry of ρ's objective -------------------------------------------------------------

    def symmetries(self) -> list[Symmetry]:
        """The mirrors of the trained objective in ρ: none under symmetry removal; with DCS the
        (u, v) sign mirrors, plus the model's own mirrors that touch no constrained parameter."""
        if self.remove_std is not None:
            return []
        if not self.enforced:
            return self.model.symmetries()
        own = [s for s in self.model.symmetries() if not set(_params_of(s)) & set(self.constrained)]
        dcs = [SignFlip(NeuronSet(f"dcs:{p}", tuple(Slot(n, 1) for n in self.raw_names(p)[-2:])))
               for p in self.constrained]
        return own + dcs

    def candidates(self) -> list[Symmetry]:
        """Mirrors worth trying that are not declared: the model's own candidates, or all of its
        mirrors under symmetry removal (where they should fail), in ρ's names."""
        declared = self.symmetries()
        pool = self.model.candidates() + (self.model.symmetries() if self.remove_std is not None else [])
        usable = [s for s in pool if not (self.enforced and set(_params_of(s)) & set(self.constrained))]
        return [s for s in dict.fromkeys(usable) if s not in declared]

    # -- the constraint, measured on θ ----------------------------------------------------------

    def measure(self, raw: Params, cfg: MetricsConfig) -> dict[str, torch.Tensor]:
        """constraint_violation = ‖Oᵀθ‖ over the constrained parameters, and constraint_zeros = the
        fraction of coordinates cᵢ = (Oᵀθ)ᵢ with |cᵢ| ≤ constraint_atol; enforced by DCS or not.
        θ is composed from ρ (`raw`) in float64, so an enforced cᵢ = 0 has no round-off floor at 1e-8."""
        if self.kind is None:
            return {}
        theta = self.network({k: v.detach().double() for k, v in raw.items()})
        coords = []
        for p in self.constrained:
            t = theta[p].double()
            coords.append(t.flatten(1).norm(dim=-1, keepdim=True) if self.kind == "group" else self.bases[p].restrict(t))
        c = torch.cat(coords, dim=1)                                        # (R, Σk)
        return {"constraint_violation": c.norm(dim=-1), "constraint_zeros": (c.abs() <= cfg.constraint_atol).double().mean(-1)}


def _params_of(sym: Symmetry) -> list[str]:
    return [sym.left, sym.right] if isinstance(sym, Rotation) else [s.param for s in sym.neurons.slots]


def build(cfg: Config, model) -> Reparam:
    """The reparametrisation a config asks for; ConfigError for an unknown parameter name or a
    bad subspace file (sweep planning calls this before any work)."""
    return Reparam(cfg, model)
