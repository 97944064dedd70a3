"""Property-based tests (hypothesis) of the metrics and the mirrors, over shapes and values that
hand-picked examples would not cover. Example counts stay modest: the suite runs on 2 cores."""

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from symrun.analysis import metrics
from symrun import models
from symrun.config import AttentionConfig, EnsembleConfig, FactorizationConfig, HadamardConfig, MLPConfig
from symrun.analysis.symmetries import Rotation, SignFlip, Swap, apply_mirror, constraint_norms, gather

CPU = torch.device("cpu")
FEW = settings(max_examples=40, deadline=None)

# (runs, neurons, group size) with exact zeros and repeated neurons among the values
values = st.one_of(st.floats(-10, 10, allow_nan=False), st.just(0.0))


@st.composite
def neuron_groups(draw):
    r, n, g = draw(st.integers(1, 3)), draw(st.integers(1, 10)), draw(st.integers(1, 5))
    base = draw(arrays(np.float64, (r, n, g), elements=values))
    copies = draw(st.lists(st.integers(0, n - 1), min_size=n, max_size=n))   # some neurons repeat others
    groups = base[:, copies] if draw(st.booleans()) else base
    perm = draw(st.permutations(range(n)))
    return torch.from_numpy(np.ascontiguousarray(groups)), torch.tensor(perm)


@FEW
@given(neuron_groups(), st.floats(0, 1), st.floats(0, 1), st.floats(0.01, 1))
def test_sparsity_and_independent_fraction_lie_in_0_1_and_ignore_neuron_order(data, atol, rtol, threshold):
    groups, perm = data
    shuffled = groups[:, perm]
    s, s_perm = metrics.sparsity(groups, atol, rtol), metrics.sparsity(shuffled, atol, rtol)
    dead = metrics.dead_groups(groups, atol, rtol)
    f = metrics.independent_fraction(groups, threshold, dead)
    f_perm = metrics.independent_fraction(shuffled, threshold, dead[:, perm])
    for value in (s, f):
        assert ((0 <= value) & (value <= 1)).all()
    assert torch.equal(s, s_perm)
    torch.testing.assert_close(f, f_perm, rtol=0, atol=1e-12)
    # every alive neuron is in exactly one group: at least one group if any is alive
    alive = (~dead).sum(-1)
    assert ((f > 0) == (alive > 0)).all() and (f <= alive / groups.shape[1] + 1e-12).all()


def _orthogonal(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


@st.composite
def low_rank(draw):
    m, n = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    rank = draw(st.integers(0, min(m, n)))
    s = draw(st.lists(st.floats(0.05, 20), min_size=rank, max_size=rank))   # σ_min/σ_max ≥ 1/400 ≫ rtol
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    u, v = _orthogonal(m, gen)[:, :rank], _orthogonal(n, gen)[:, :rank]
    a = u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T                    # (m, n) of rank `rank`
    return a, rank, _orthogonal(m, gen), _orthogonal(n, gen)


@FEW
@given(low_rank())
def test_rank_measures_give_the_true_rank_and_ignore_orthogonal_transforms(case):
    a, rank, q1, q2 = case
    measured = metrics.rank_metrics(a[None], rtol=1e-3, atol=1e-9)
    assert measured["rank"].item() == rank
    assert measured["effective_rank"].item() <= rank + 1e-9 and measured["stable_rank"].item() <= rank + 1e-9
    rotated = metrics.rank_metrics((q1 @ a @ q2)[None], rtol=1e-3, atol=1e-9)
    assert rotated["rank"].item() == rank
    for k in ("effective_rank", "stable_rank"):
        assert math.isclose(rotated[k].item(), measured[k].item(), rel_tol=1e-9, abs_tol=1e-9)


MODELS = {
    "hadamard": lambda d, o, h: (HadamardConfig(), 1),
    "factorization": lambda d, o, h: (FactorizationConfig(hidden=h), o),
    "mlp-tanh": lambda d, o, h: (MLPConfig(width=h, depth=2), o),
    "ensemble": lambda d, o, h: (EnsembleConfig(width=h, members=3, activation="relu"), o),
    "attention": lambda d, o, h: (AttentionConfig(tokens=2, heads=2, key_dim=h), o),
}


@st.composite
def mirror_case(draw):
    """A model's parameters, one of its declared mirrors and one index of that mirror."""
    d, o, h = 2 * draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(2, 6))
    cfg, out = MODELS[draw(st.sampled_from(sorted(MODELS)))](d, o, h)
    model = models.build(cfg, d, out)
    seeds = draw(st.lists(st.integers(0, 1000), min_size=1, max_size=3))
    params = {k: v.detach() for k, v in model.init_params(seeds, CPU, torch.float64).items()}
    sym = draw(st.sampled_from(model.symmetries()))
    if isinstance(sym, Rotation):
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        index = torch.randn(params[sym.left].shape[-1], generator=gen, dtype=torch.float64)
    else:
        n = gather(sym.neurons, params).shape[-2]
        i = draw(st.integers(0, n - 1))
        index = i if isinstance(sym, SignFlip) else (i, draw(st.integers(0, n - 1).filter(lambda j: j != i)))
    return params, sym, index


@FEW
@given(mirror_case())
def test_a_mirror_applied_twice_is_the_identity(case):
    params, sym, index = case
    twice = apply_mirror(sym, apply_mirror(sym, params, index), index)
    for k in params:
        if isinstance(sym, Rotation):
            torch.testing.assert_close(twice[k], params[k], rtol=0, atol=1e-12)
        else:
            assert torch.equal(twice[k], params[k])


@FEW
@given(mirror_case())
def test_constraint_distance_is_zero_on_the_projection_onto_the_constraint_set(case):
    """(I − OOᵀ)θ = (θ + Rθ)/2 lies on the mirror's constraint set Oᵀθ = 0: its distance there is
    exactly 0 for sign flips and swaps; for rotations it is an eigenvalue, 0 up to round-off."""
    params, sym, index = case
    mirrored = apply_mirror(sym, params, index)
    projected = {k: (params[k] + mirrored[k]) / 2 for k in params}
    norms = constraint_norms(sym, projected)                                        # (R, mirrors)
    before = constraint_norms(sym, params)
    if isinstance(sym, SignFlip):
        lead = gather(sym.neurons, params).shape[1:-2]                              # member axis, if any
        at = norms.view(norms.shape[0], *lead, -1)[..., index]
        assert (at == 0).all()
    elif isinstance(sym, Swap):
        i, j = sorted(index)
        n = gather(sym.neurons, params).shape[-2]
        pair = [(a, b) for a in range(n) for b in range(a + 1, n)].index((i, j))
        at = norms.view(norms.shape[0], -1, n * (n - 1) // 2)[..., pair]
        assert (at == 0).all()
    else:
        scale = before.max(dim=1).values
        assert (norms.min(dim=1).values <= 1e-6 * scale).all()
