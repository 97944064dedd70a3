"""Every (model, declared mirror) pair (docs/theory.md §2–§3): the loss is unchanged under the
mirror R = I − 2OOᵀ, `apply_mirror` allocates, and on the constraint set Oᵀθ = 0 the gradient of the
loss — with or without weight decay (λ/2)‖θ‖² — has Oᵀ∇L = 0 (Theorem 1.1), and `constraint_norms`
reads ~0 there."""

from __future__ import annotations

import math

import pytest
import torch

from symrun.config import EnsembleConfig, FactorizationConfig, HadamardConfig, MLPConfig
from symrun.training.engine import loss_per_run
from symrun.models import build
from symrun.analysis.symmetries import (Rotation, SignFlip, Swap, apply_mirror, constraint_norms, gather, kind, mirror_count,
                               project, reflect, select)

F64 = torch.float64
SEEDS = [0, 1]                      # R = 2 runs
WEIGHT_DECAY = 0.3

MODELS = {
    "hadamard": (HadamardConfig(), 5, 1),
    "factorization": (FactorizationConfig(hidden=3), 4, 3),
    "mlp_tanh": (MLPConfig(width=4, depth=2, activation="tanh"), 3, 2),
    "mlp_relu": (MLPConfig(width=4, depth=2, activation="relu"), 3, 2),
    "ensemble": (EnsembleConfig(width=3, depth=1, members=3, activation="tanh"), 3, 2),
}


def make(name: str):
    """Model, generic float64 params (biases made non-zero), inputs x (B, d), targets y (B, o)."""
    cfg, d, o = MODELS[name]
    model = build(cfg, d, o)
    params = model.init_params(SEEDS, torch.device("cpu"), F64)
    g = torch.Generator().manual_seed(123)
    params = {k: (v.detach() + 0.5 * torch.randn(v.shape, generator=g, dtype=F64) if "bias" in k else v.detach())
              for k, v in params.items()}
    x = torch.randn(9, d, generator=g, dtype=F64)
    y = torch.randn(9, o, generator=g, dtype=F64)
    return model, params, x, y


def loss(model, params, x, y, weight_decay: float = 0.0) -> torch.Tensor:
    """Per-run half-MSE plus (λ/2)‖θ‖² per run: (R,)."""
    out = loss_per_run(model.forward(params, x), y, "regression")
    return out + weight_decay / 2 * sum(p.pow(2).flatten(1).sum(-1) for p in params.values())


def gradients(model, params, x, y, weight_decay: float) -> dict[str, torch.Tensor]:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    total = loss(model, leaves, x, y, weight_decay).sum()    # runs are disjoint: each its own gradient
    return dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))


def n_neurons(sym, params) -> int:
    return gather(sym.neurons, params).shape[-2]


def mirror_indices(sym, params):
    """A few mirrors of `sym`: neurons, pairs, or (not normalised) directions n."""
    if isinstance(sym, SignFlip):
        return list(range(n_neurons(sym, params)))
    if isinstance(sym, Swap):
        n = n_neurons(sym, params)
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    g = torch.Generator().manual_seed(7)
    h = params[sym.left].shape[-1]
    return [torch.randn(h, generator=g, dtype=F64) * 3 for _ in range(3)] + [torch.eye(h, dtype=F64)[0]]


def cases():
    """Every (model, declared mirror) pair, with an id such as mlp_tanh-1-SignFlip-layer0."""
    out = []
    for name in MODELS:
        model, params, _, _ = make(name)
        for k, sym in enumerate(model.symmetries()):
            label = sym.neurons.name if hasattr(sym, "neurons") else f"{sym.left}{sym.right}"
            out.append(pytest.param(name, k, id=f"{name}-{k}-{type(sym).__name__}-{label}"))
    return out


CASES = cases()


# ---------------------------------------------------------------------------------------------
# what each model declares


def kinds(model) -> list[tuple[str, str]]:
    return [(type(s).__name__, s.neurons.name if hasattr(s, "neurons") else "") for s in model.symmetries()]


def test_declared_mirrors():
    assert kinds(make("hadamard")[0]) == [("SignFlip", "coef")]
    assert kinds(make("factorization")[0]) == [("Rotation", "")]
    assert sorted(kinds(make("mlp_tanh")[0])) == sorted(
        [("Swap", "layer0"), ("SignFlip", "layer0"), ("Swap", "layer1"), ("SignFlip", "layer1")])
    assert sorted(kinds(make("ensemble")[0])) == sorted([("Swap", "layer0"), ("SignFlip", "layer0"), ("Swap", "members")])
    assert len(CASES) == 1 + 1 + 4 + 2 + 3


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_non_odd_activation_declares_no_sign_flip(activation):
    cfg = MLPConfig(width=4, depth=2, activation=activation)
    model = build(cfg, 3, 2)
    assert kinds(model) == [("Swap", "layer0"), ("Swap", "layer1")]
    # and rightly so: flipping a neuron's block changes the loss of a relu/gelu net
    _, params, x, y = make("mlp_relu")
    flipped = apply_mirror(SignFlip(model.neuron_sets()[0]), params, 0)
    assert (loss(model, flipped, x, y) - loss(model, params, x, y)).abs().max() > 1e-6


def test_residual_factorization_declares_no_rotation():
    model = build(FactorizationConfig(hidden=4, residual=True), 4, 3)
    assert model.symmetries() == []
    # the residual breaks the rotation mirror: reflecting the inner space changes the loss
    params = model.init_params(SEEDS, torch.device("cpu"), F64)
    params = {k: v.detach() for k, v in params.items()}
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 4, generator=g, dtype=F64), torch.randn(9, 3, generator=g, dtype=F64)
    reflected = apply_mirror(Rotation("U", "W"), params, torch.randn(4, generator=g, dtype=F64))
    assert (loss(model, reflected, x, y) - loss(model, params, x, y)).abs().max() > 1e-6


# ---------------------------------------------------------------------------------------------
# (1) invariance, (2) no mutation


@pytest.mark.parametrize("name,k", CASES)
def test_loss_is_invariant_under_the_mirror(name, k):
    model, params, x, y = make(name)
    sym = model.symmetries()[k]
    base = loss(model, params, x, y)
    for index in mirror_indices(sym, params):
        mirrored = apply_mirror(sym, params, index)
        moved = max(float((mirrored[p] - params[p]).abs().max()) for p in params)
        assert moved > 1e-3, "the mirror should move a generic point"
        torch.testing.assert_close(loss(model, mirrored, x, y), base, rtol=0, atol=1e-10)
        # R is an involution: applying it twice gives θ back
        twice = apply_mirror(sym, mirrored, index)
        for p in params:
            torch.testing.assert_close(twice[p], params[p], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,k", CASES)
def test_apply_mirror_does_not_mutate_its_input(name, k):
    model, params, _, _ = make(name)
    sym = model.symmetries()[k]
    snapshot = {p: v.clone() for p, v in params.items()}
    index = mirror_indices(sym, params)[0]
    mirrored = apply_mirror(sym, params, index)
    assert mirrored is not params
    for p in params:
        assert torch.equal(params[p], snapshot[p]), p
    # writing into the result leaves the input alone (the result owns its changed tensors)
    for p, v in mirrored.items():
        if not torch.equal(v, params[p]):
            v.add_(1.0)
            assert torch.equal(params[p], snapshot[p]), p


@pytest.mark.parametrize("name,k", CASES)
def test_constraint_norm_is_half_the_distance_moved(name, k):
    """θ − Rθ = 2OOᵀθ, so ‖θ − Rθ‖ = 2‖Oᵀθ‖: ties apply_mirror to constraint_norms."""
    model, params, _, _ = make(name)
    sym = model.symmetries()[k]
    norms = constraint_norms(sym, params)
    r = norms.shape[0]
    if isinstance(sym, Rotation):
        u, w = params[sym.left], params[sym.right]
        _, vecs = torch.linalg.eigh(u[0].T @ u[0] + w[0] @ w[0].T)    # run 0's declared directions
        for c in range(vecs.shape[1]):
            moved = apply_mirror(sym, params, vecs[:, c])
            dist = math.sqrt(sum(float((moved[p][0] - params[p][0]).pow(2).sum()) for p in params))
            assert float(norms[0, c]) == pytest.approx(dist / 2, rel=1e-8, abs=1e-10)
        return
    # apply_mirror acts on every member at once: that mirror's O spans the members' mirrors, so
    # its ‖Oᵀθ‖ is the root-sum-square of the per-member norms (M = 1 outside ensembles)
    indices = mirror_indices(sym, params)
    per_member = norms.reshape(r, -1, len(indices))       # (R, M, mirrors of one member)
    for c, index in enumerate(indices):
        moved = apply_mirror(sym, params, index)
        for run in range(r):
            dist = math.sqrt(sum(float((moved[p][run] - params[p][run]).pow(2).sum()) for p in params))
            assert float(per_member[run, :, c].pow(2).sum().sqrt()) == pytest.approx(dist / 2, rel=1e-10)


# ---------------------------------------------------------------------------------------------
# (3) Oᵀ∇L = 0 on the constraint set, (4) constraint_norms ~ 0 there


def expected_mirror_count(sym, params) -> int:
    if isinstance(sym, Rotation):
        return params[sym.left].shape[-1]
    groups = gather(sym.neurons, params)                  # (R, [M,] n, g)
    members = math.prod(groups.shape[1:-2])
    n = groups.shape[-2]
    return members * (n if isinstance(sym, SignFlip) else n * (n - 1) // 2)


def onto_constraint(sym, params):
    """A point with Oᵀθ = 0 for one mirror of `sym` (in every run and member), and that mirror."""
    out = {k: v.detach().clone() for k, v in params.items()}
    if isinstance(sym, SignFlip):                         # neuron 1's whole block = 0
        for slot in sym.neurons.slots:
            out[slot.param].select(slot.axis, 1).zero_()
        return out, 1
    if isinstance(sym, Swap):                             # neuron/member 2's block = neuron/member 0's
        for slot in sym.neurons.slots:
            t = out[slot.param]
            t.select(slot.axis, 2).copy_(t.select(slot.axis, 0))
        return out, (0, 2)
    n = torch.randn(out[sym.left].shape[-1], generator=torch.Generator().manual_seed(9), dtype=F64)
    n = n / n.norm()
    proj = torch.eye(len(n), dtype=F64) - torch.outer(n, n)
    out[sym.left] = out[sym.left] @ proj                  # U n = 0
    out[sym.right] = proj @ out[sym.right]                # nᵀ W = 0
    return out, n


@pytest.mark.parametrize("weight_decay", [0.0, WEIGHT_DECAY])
@pytest.mark.parametrize("name,k", CASES)
def test_gradient_stays_on_the_constraint_set(name, k, weight_decay):
    model, params, x, y = make(name)
    sym = model.symmetries()[k]
    point, index = onto_constraint(sym, params)
    grads = gradients(model, point, x, y, weight_decay)
    if isinstance(sym, Rotation):
        gu, gw = grads[sym.left], grads[sym.right]        # (R, a, h), (R, h, b)
        assert gu.abs().max() > 1e-4 and gw.abs().max() > 1e-4
        torch.testing.assert_close(gu @ index, torch.zeros_like(gu[..., 0]), rtol=0, atol=1e-12)   # (∇U) n
        torch.testing.assert_close(index @ gw, torch.zeros_like(gw[..., 0, :]), rtol=0, atol=1e-12)  # nᵀ(∇W)
        return
    g = gather(sym.neurons, grads)                        # (R, [M,] n, group)
    assert g.abs().max() > 1e-4
    if isinstance(sym, SignFlip):
        # the zeroed block's gradient is zero, a live neuron's is not
        torch.testing.assert_close(g[..., index, :], torch.zeros_like(g[..., index, :]), rtol=0, atol=1e-12)
        assert g[..., 0, :].abs().max() > 1e-4
    else:
        i, j = index
        torch.testing.assert_close(g[..., i, :], g[..., j, :], rtol=0, atol=1e-12)
        assert (g[..., i, :] - g[..., 1, :]).abs().max() > 1e-6
    # on the set the loss itself is still invariant under this mirror
    torch.testing.assert_close(loss(model, apply_mirror(sym, point, index), x, y), loss(model, point, x, y),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("name,k", CASES)
def test_constraint_norms_vanish_on_the_constraint_set(name, k):
    model, params, _, _ = make(name)
    sym = model.symmetries()[k]
    r = len(SEEDS)
    generic = constraint_norms(sym, params)
    assert generic.shape == (r, expected_mirror_count(sym, params))
    assert generic.min() > 1e-3                          # a generic point satisfies no constraint
    point, _ = onto_constraint(sym, params)
    norms = constraint_norms(sym, point)
    assert norms.shape == (r, expected_mirror_count(sym, params))
    # exactly one mirror per run (and per member, where the constraint was set in each) holds
    per_run = 1 if isinstance(sym, Rotation) or sym.neurons.lead == 1 else math.prod(
        gather(sym.neurons, params).shape[1:-2])
    held = norms <= 1e-6
    assert held.sum(dim=1).tolist() == [per_run] * r
    assert norms[~held].min() > 1e-3
    if isinstance(sym, SignFlip) and sym.neurons.lead == 1:
        assert float(norms[:, 1].abs().max()) <= 1e-12    # neuron 1 is the one zeroed


# ---------------------------------------------------------------------------------------------
# concrete mirrors (select / reflect / project) agree with apply_mirror and constraint_norms


@pytest.mark.parametrize("name,k", CASES)
def test_selected_mirror_matches_apply_mirror_and_constraint_norms(name, k):
    model, params, _, _ = make(name)
    sym = model.symmetries()[k]
    norms = constraint_norms(sym, params)                               # (R, n_mirrors)
    assert norms.shape[1] == mirror_count(sym, params)
    for j in range(norms.shape[1]):
        index = torch.tensor([j, norms.shape[1] - 1 - j])               # a different mirror per run
        mirror = select(sym, params, index)
        torch.testing.assert_close(mirror.restrict(params).norm(dim=-1), norms[torch.arange(2), index], rtol=1e-10, atol=1e-12)
        on_set = project(mirror, params)
        assert mirror.restrict(on_set).abs().max() < 1e-12
        # the columns of O are orthonormal: ‖Oc‖ = ‖c‖ and Oᵀ(Oc) = c
        c = torch.randn(2, mirror.size, generator=torch.Generator().manual_seed(j), dtype=F64)
        embedded = mirror.embed(c)
        torch.testing.assert_close(mirror.restrict(embedded), c, rtol=0, atol=1e-12)
    if isinstance(sym, Rotation):
        return
    # for sign flips and swaps, reflect(select(j)) in a one-member model = apply_mirror(j)
    single = {p: v[:1] for p, v in params.items()}
    if sym.neurons.lead == 2 and gather(sym.neurons, single).shape[1] > 1:
        return                                                          # apply_mirror acts on every member at once
    for j, index in enumerate(mirror_indices(sym, single)):
        reflected = reflect(select(sym, single, torch.tensor([j])), single)
        expected = apply_mirror(sym, single, index)
        for p in single:
            torch.testing.assert_close(reflected[p], expected[p], rtol=0, atol=1e-12)


def test_kinds_of_the_declared_mirrors():
    assert {kind(s) for s in make("hadamard")[0].symmetries()} == {"rescaling"}
    assert {kind(s) for s in make("factorization")[0].symmetries()} == {"rotation"}
    assert {kind(s) for s in make("mlp_tanh")[0].symmetries()} == {"rescaling", "permutation"}
    assert {kind(s) for s in make("mlp_relu")[0].symmetries()} == {"permutation"}    # ReLU: no sign flips
