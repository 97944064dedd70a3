"""Every metric of symrun.analysis.metrics against a value computed by hand from its formula
(docs/theory.md §4), then `measure` on small models whose parameters are set by hand."""

from __future__ import annotations

import math

import pytest
import torch

from symrun.analysis import metrics
from symrun.config import EnsembleConfig, FactorizationConfig, HadamardConfig, MetricsConfig, MLPConfig
from symrun.models import build

F64 = torch.float64


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def orthogonal(n: int, seed: int) -> torch.Tensor:
    """A fixed random n×n orthogonal matrix (Q of a QR decomposition)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q


def values(x: torch.Tensor) -> list[float]:
    return [float(v) for v in x.detach().reshape(-1)]


# ---------------------------------------------------------------------------------------------
# rank family: a matrix with known singular values, A = Q1 diag(σ) Q2ᵀ


def known_matrix(sigmas: list[float], rows: int, cols: int, seed: int) -> torch.Tensor:
    """rows × cols matrix whose singular values are `sigmas` (padded with zeros)."""
    d = torch.zeros(rows, cols, dtype=F64)
    for i, s in enumerate(sigmas):
        d[i, i] = s
    return orthogonal(rows, seed) @ d @ orthogonal(cols, seed + 1).T


def test_numerical_rank_counts_singular_values_above_rtol_times_top():
    a = known_matrix([4.0, 2.0, 1e-4], 4, 3, seed=0)
    s = torch.linalg.svdvals(a)
    # threshold 1e-3 · 4 = 4e-3: σ = 4, 2 count, 1e-4 does not
    assert float(metrics.numerical_rank(s, 1e-3)) == 2
    # threshold 1e-5 · 4 = 4e-5 < 1e-4: all three count
    assert float(metrics.numerical_rank(s, 1e-5)) == 3
    # threshold 0.6 · 4 = 2.4: only σ₁
    assert float(metrics.numerical_rank(s, 0.6)) == 1
    # batched over a leading axis, and the zero matrix has rank 0
    batch = torch.stack([s, torch.zeros(3, dtype=F64)])
    assert values(metrics.numerical_rank(batch, 1e-3)) == [2.0, 0.0]


def test_effective_rank_is_exp_entropy_of_normalised_singular_values():
    # four equal σ: p = 1/4 each, entropy ln 4 → effective rank 4
    s_equal = torch.linalg.svdvals(known_matrix([2.0, 2.0, 2.0, 2.0], 4, 4, seed=2))
    assert float(metrics.effective_rank(s_equal)) == pytest.approx(4.0, rel=1e-12)
    # σ = (3, 1): p = (3/4, 1/4)
    s = t([3.0, 1.0])
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert float(metrics.effective_rank(s)) == pytest.approx(expected, rel=1e-12)
    # a rank-1 matrix: p = (1, 0, 0) → 1; zero matrix → 0 by convention (not NaN)
    batch = t([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert values(metrics.effective_rank(batch)) == pytest.approx([1.0, 0.0], abs=1e-12)


def test_stable_rank_is_frobenius_over_spectral_squared():
    a = known_matrix([2.0, 1.0], 3, 5, seed=4)
    s = torch.linalg.svdvals(a)
    # ‖A‖_F² / ‖A‖₂² = (4 + 1) / 4
    assert float(metrics.stable_rank(s)) == pytest.approx(1.25, rel=1e-12)
    assert float((a**2).sum() / torch.linalg.matrix_norm(a, ord=2) ** 2) == pytest.approx(1.25, rel=1e-12)
    assert values(metrics.stable_rank(t([[3.0, 3.0, 3.0], [0.0, 0.0, 0.0]]))) == pytest.approx([3.0, 0.0])


def test_rank_metrics_average_over_middle_axes_and_carry_the_qualifier():
    # (R=1, M=2, 3, 3): member 0 has σ = (2, 1, 0), member 1 has σ = (1, 0, 0)
    m0 = known_matrix([2.0, 1.0], 3, 3, seed=6)
    m1 = known_matrix([1.0], 3, 3, seed=8)
    out = metrics.rank_metrics(torch.stack([m0, m1])[None], rtol=1e-3, qualifier="layer0")
    assert set(out) == {"rank.layer0", "effective_rank.layer0", "stable_rank.layer0"}
    assert float(out["rank.layer0"][0]) == pytest.approx((2 + 1) / 2)
    eff0 = math.exp(-((2 / 3) * math.log(2 / 3) + (1 / 3) * math.log(1 / 3)))
    assert float(out["effective_rank.layer0"][0]) == pytest.approx((eff0 + 1) / 2, rel=1e-10)
    assert float(out["stable_rank.layer0"][0]) == pytest.approx((5 / 4 + 1) / 2, rel=1e-10)


# ---------------------------------------------------------------------------------------------
# sparsity


def test_sparsity_atol_and_rtol_rules():
    # group norms: 5, 0, 0.03, 1e-4 (each group has 2 coordinates)
    groups = t([[3.0, 4.0], [0.0, 0.0], [0.03, 0.0], [0.0, 1e-4]])
    # atol 1e-3 kills 0 and 1e-4; rtol 1e-2 kills ≤ 0.05, so also 0.03 → 3 of 4 dead
    assert values(metrics.dead_groups(groups, atol=1e-3, rtol=1e-2)) == [0.0, 1.0, 1.0, 1.0]
    assert float(metrics.sparsity(groups, atol=1e-3, rtol=1e-2)) == pytest.approx(0.75)
    # atol alone: 0 and 1e-4 dead → 2 of 4
    assert float(metrics.sparsity(groups, atol=1e-3, rtol=0.0)) == pytest.approx(0.5)
    # rtol alone (Chen et al.: rtol 0.1, no atol): ≤ 0.5 dead → 0, 0.03, 1e-4 → 3 of 4
    assert float(metrics.sparsity(groups, atol=0.0, rtol=0.1)) == pytest.approx(0.75)
    # atol = rtol = 0: only the exactly zero group (0 ≤ 0) → 1 of 4
    assert float(metrics.sparsity(groups, atol=0.0, rtol=0.0)) == pytest.approx(0.25)


def test_sparsity_all_zero_groups_are_fully_sparse_and_batched():
    zero = torch.zeros(2, 4, 3, dtype=F64)
    zero[1, 0, 0] = 1.0                     # run 1: one alive group of four
    # run 0 is all zero: fully sparse even with atol = 0 (0 ≤ rtol · 0), never NaN
    assert values(metrics.sparsity(zero, atol=0.0, rtol=0.1)) == pytest.approx([1.0, 0.75])
    assert values(metrics.sparsity(zero, atol=1e-3, rtol=0.0)) == pytest.approx([1.0, 0.75])


# ---------------------------------------------------------------------------------------------
# homogeneity


def test_normalized_distance_by_hand():
    groups = t([[1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [-1.0, 0.0]])
    d = metrics.normalized_distance(groups)
    # 2‖a − b‖² / (‖a‖² + ‖b‖²)
    assert float(d[0, 1]) == pytest.approx(2 * 2 / (1 + 1))        # orthogonal unit vectors: 2
    assert float(d[0, 2]) == pytest.approx(2 * 4 / (1 + 9))        # 0.8
    assert float(d[0, 3]) == pytest.approx(2 * 4 / (1 + 1))        # opposite: 4 (the maximum)
    assert float(d[1, 2]) == pytest.approx(2 * (9 + 1) / (1 + 9))  # 2
    assert values(torch.diagonal(d)) == pytest.approx([0.0] * 4, abs=1e-12)
    torch.testing.assert_close(d, d.T)
    # two zero vectors: distance 0, not NaN
    assert float(metrics.normalized_distance(torch.zeros(2, 3, dtype=F64))[0, 1]) == 0.0


def test_independent_fraction_is_transitive_and_excludes_dead():
    # a ~ b and b ~ c at threshold 0.05, but not a ~ c:
    #   d(a,b) = 2·0.0225/(1 + 1.0225) ≈ 0.0222, d(b,c) = 2·0.0225/(1.0225 + 1.09) ≈ 0.0213,
    #   d(a,c) = 2·0.09/(1 + 1.09) ≈ 0.0861
    a, b, c, far, zero = [1.0, 0.0], [1.0, 0.15], [1.0, 0.3], [0.0, 1.0], [0.0, 0.0]
    groups = t([a, b, c, far, zero])
    d = metrics.normalized_distance(groups)
    assert d[0, 1] < 0.05 and d[1, 2] < 0.05 and d[0, 2] > 0.05      # the premise of the test
    dead = torch.tensor([False, False, False, False, True])
    # groups {a, b, c}, {far}; the dead neuron is in none; width 5 → 2/5
    assert float(metrics.independent_fraction(groups, 0.05, dead)) == pytest.approx(2 / 5)
    # not masked dead, the zero neuron is its own group (distance 2 to all others) → 3/5
    alive = torch.zeros(5, dtype=torch.bool)
    assert float(metrics.independent_fraction(groups, 0.05, alive)) == pytest.approx(3 / 5)
    # a threshold below every pairwise distance: 4 singletons among alive neurons → 4/5
    assert float(metrics.independent_fraction(groups, 0.01, dead)) == pytest.approx(4 / 5)
    # a neuron masked dead belongs to no group, so it does not bridge a and c: {a}, {c}, {far} → 3/5
    b_dead = torch.tensor([False, True, False, False, True])
    assert float(metrics.independent_fraction(groups, 0.05, b_dead)) == pytest.approx(3 / 5)


def test_independent_fraction_follows_a_long_chain():
    # 8 unit vectors at angles 0, 0.3, …, 2.1: neighbours are at 2(1 − cos 0.3) ≈ 0.089 < 0.1,
    # next-neighbours at 2(1 − cos 0.6) ≈ 0.35 > 0.1; the chain needs paths of length 7.
    angles = torch.arange(8, dtype=F64) * 0.3
    chain = torch.stack([angles.cos(), angles.sin()], dim=-1)
    none_dead = torch.zeros(8, dtype=torch.bool)
    assert float(metrics.independent_fraction(chain, 0.1, none_dead)) == pytest.approx(1 / 8)
    # break the chain between 4 and 5 (rotate the last three away): two groups → 2/8
    broken = chain.clone()
    broken[5:] = torch.stack([(angles[5:] + 1.0).cos(), (angles[5:] + 1.0).sin()], dim=-1)
    assert float(metrics.independent_fraction(broken, 0.1, none_dead)) == pytest.approx(2 / 8)
    # batched over runs: (2, 8, 2)
    both = metrics.independent_fraction(torch.stack([chain, broken]), 0.1, torch.zeros(2, 8, dtype=torch.bool))
    assert values(both) == pytest.approx([1 / 8, 2 / 8])


def test_independent_fraction_all_dead_is_zero():
    groups = torch.zeros(3, 2, dtype=F64)
    assert float(metrics.independent_fraction(groups, 0.1, torch.ones(3, dtype=torch.bool))) == 0.0


def test_mean_pairwise_distance_by_hand():
    vectors = t([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    # d01 = 2·2/2 = 2, d02 = 2·1/(1 + 4) = 0.4, d12 = 2·5/(1 + 4) = 2
    assert float(metrics.mean_pairwise_distance(vectors)) == pytest.approx((2 + 0.4 + 2) / 3)
    same = t([[[1.0, 2.0], [1.0, 2.0]]])                              # (R=1, m=2, p=2)
    assert values(metrics.mean_pairwise_distance(same)) == pytest.approx([0.0], abs=1e-12)


# ---------------------------------------------------------------------------------------------
# balance and weight norm


def test_balance_is_difference_of_squared_norms_per_run():
    u = t([[1.0, 2.0], [2.0, 2.0]])
    w = t([[3.0, 0.0], [1.0, 1.0]])
    # (1 + 4) − 9 = −4; (4 + 4) − (1 + 1) = 6
    assert values(metrics.balance(u, w)) == pytest.approx([-4.0, 6.0])
    # matrices (R, a, b): Frobenius norms, ‖U‖² − ‖W‖² = 2² + 1² − 3² = −4
    U = t([[[2.0, 0.0], [0.0, 1.0]]])
    W = t([[[0.0, 3.0, 0.0]]])
    assert values(metrics.balance(U, W)) == pytest.approx([-4.0])


def test_weight_norm_sums_over_every_tensor_per_run():
    params = {"a": t([[3.0, 0.0], [1.0, 2.0]]), "b": t([[[4.0, 0.0]], [[2.0, 4.0]]])}
    # run 0: √(9 + 16) = 5; run 1: √(1 + 4 + 4 + 16) = 5
    assert values(metrics.weight_norm(params)) == pytest.approx([5.0, 5.0])
    params["a"] = torch.zeros(2, 2, dtype=F64)
    assert values(metrics.weight_norm(params)) == pytest.approx([4.0, math.sqrt(20.0)])


# ---------------------------------------------------------------------------------------------
# measure on models with hand-set parameters


CFG = MetricsConfig()   # atol 1e-3, rtol 1e-2, rank_rtol 1e-3, homogeneity 0.1, constraint_atol 1e-3


def with_values(model, seeds, **values_by_key) -> dict[str, torch.Tensor]:
    params = model.init_params(seeds, torch.device("cpu"), F64)
    out = {k: v.detach().clone() for k, v in params.items()}
    for k, v in values_by_key.items():
        assert out[k].shape == v.shape, k
        out[k] = v.clone()
    return out


def probe(d: int) -> torch.Tensor:
    return torch.randn(6, d, generator=torch.Generator().manual_seed(0), dtype=F64)


def test_measure_hadamard():
    model = build(HadamardConfig(), in_dim=5, out_dim=1)
    u = t([[1.0, 0.0, 2.0, 0.0, -1.0],       # run 0: coordinates 1, 3 are zero
           [3.0, 0.004, 0.0, 0.0, 0.0],      # run 1: coordinate 1 is small but not zero
           [0.0, 0.0, 0.0, 0.0, 0.0]])       # run 2: all zero
    w = t([[0.5, 0.0, 1.0, 0.0, 3.0],
           [4.0, 0.004, 0.0, 0.0, 0.0],
           [0.0, 0.0, 0.0, 0.0, 0.0]])
    params = with_values(model, [0, 1, 2], u=u, w=w)
    m = metrics.measure(model, params, CFG, probe(5))
    assert set(m) == {"weight_norm", "sparsity", "constraint_distance", "constraint_fraction",
                      "constraint_fraction.rescaling", "balance"}
    for k in m:
        assert m[k].shape == (3,), k
    # run 1: pair norms (5, 0.004√2 ≈ 0.0057, 0, 0, 0); 0.0057 ≤ 1e-2 · 5 is dead by rtol,
    # but ‖Oᵀθ‖ = 0.0057 > constraint_atol 1e-3, so its mirror constraint does not hold.
    assert values(m["sparsity"]) == pytest.approx([2 / 5, 4 / 5, 1.0])
    assert values(m["constraint_fraction"]) == pytest.approx([2 / 5, 3 / 5, 1.0])
    assert values(m["constraint_fraction.rescaling"]) == values(m["constraint_fraction"])   # the only kind
    # ‖Oᵀθ‖ of coordinate i = √(uᵢ² + wᵢ²)
    dist0 = (math.sqrt(1.25) + math.sqrt(5.0) + math.sqrt(10.0)) / 5
    dist1 = (5.0 + 0.004 * math.sqrt(2)) / 5
    assert values(m["constraint_distance"]) == pytest.approx([dist0, dist1, 0.0])
    # ‖u‖² − ‖w‖²: (1 + 4 + 1) − (0.25 + 1 + 9); (9 + 1.6e-5) − (16 + 1.6e-5); 0
    assert values(m["balance"]) == pytest.approx([-4.25, -7.0, 0.0])
    assert values(m["weight_norm"]) == pytest.approx([math.sqrt(16.25), math.sqrt(25 + 3.2e-5), 0.0])


def test_measure_factorization_rank_two():
    model = build(FactorizationConfig(hidden=3), in_dim=4, out_dim=3)
    # U0 W0 = diag-like with σ = (3, 2, 0); rotated by orthogonal A (out), B (inner), C (in), which
    # keeps σ(UW) and the eigenvalues of UᵀU + WWᵀ = Bᵀ diag(9+1, 1+4, 0) B.
    A, B, C = orthogonal(3, 10), orthogonal(3, 11), orthogonal(4, 12)
    U0 = t([[3.0, 0, 0], [0, 1.0, 0], [0, 0, 0]])
    W0 = t([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 0]])
    # run 1: σ = (2, 0, 0), Gram eigenvalues (4 + 1, 0, 0)
    U1 = t([[2.0, 0, 0], [0, 0, 0], [0, 0, 0]])
    W1 = t([[1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    U = torch.stack([A @ U0 @ B, A @ U1 @ B])
    W = torch.stack([B.T @ W0 @ C, B.T @ W1 @ C])
    m = metrics.measure(model, with_values(model, [0, 1], U=U, W=W), CFG, probe(4))
    assert set(m) == {"weight_norm", "rank", "effective_rank", "stable_rank", "constraint_distance",
                      "constraint_fraction", "constraint_fraction.rotation", "balance"}
    assert "sparsity" not in m and "independent_fraction" not in m
    assert values(m["rank"]) == pytest.approx([2.0, 1.0])
    eff = math.exp(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))          # p = (3/5, 2/5)
    assert values(m["effective_rank"]) == pytest.approx([eff, 1.0], rel=1e-9)
    assert values(m["stable_rank"]) == pytest.approx([13 / 9, 1.0], rel=1e-9)
    # rotation mirrors along the Gram's eigenvectors: ‖Oᵀθ‖ = √eigenvalue
    assert values(m["constraint_fraction"]) == pytest.approx([1 / 3, 2 / 3])
    assert values(m["constraint_distance"]) == pytest.approx(
        [(math.sqrt(5) + math.sqrt(10)) / 3, math.sqrt(5) / 3], abs=1e-7)
    assert values(m["balance"]) == pytest.approx([10.0 - 5.0, 4.0 - 1.0])
    assert values(m["weight_norm"]) == pytest.approx([math.sqrt(15.0), math.sqrt(5.0)])


def test_measure_residual_factorization_reports_rank_of_u_times_w_plus_identity():
    model = build(FactorizationConfig(hidden=3, residual=True), in_dim=3, out_dim=2)
    U = t([[[1.0, 0, 0], [0, 2.0, 0]], [[1.0, 0, 0], [0, 2.0, 0]]])
    W = torch.stack([torch.zeros(3, 3, dtype=F64), -torch.eye(3, dtype=F64)])
    m = metrics.measure(model, with_values(model, [0, 1], U=U, W=W), CFG, probe(3))
    # no mirror declared and no rescaling pair: no constraint metrics, no balance
    assert set(m) == {"weight_norm", "rank", "effective_rank", "stable_rank"}
    # run 0: U(0 + I) = U, σ = (2, 1); run 1: U(−I + I) = 0
    assert values(m["rank"]) == pytest.approx([2.0, 0.0])
    assert values(m["stable_rank"]) == pytest.approx([5 / 4, 0.0])


def test_measure_mlp_copied_neurons_form_one_group():
    model = build(MLPConfig(width=3, depth=1, activation="tanh"), in_dim=2, out_dim=1)
    # neuron = (row of W0, bias, column of W1); neurons 0 and 1 are exact copies in both runs,
    # neuron 2 is different in run 0 and all zero (dead) in run 1
    w0 = t([[[[1.0, 2.0], [1.0, 2.0], [-1.0, 0.3]]], [[[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]]]])  # (R, M, 3, 2)
    b0 = t([[[0.5, 0.5, -0.2]], [[0.5, 0.5, 0.0]]])                                          # (R, M, 3)
    w1 = t([[[[1.5, 1.5, 0.7]]], [[[1.5, 1.5, 0.0]]]])                                       # (R, M, 1, 3)
    b1 = t([[[0.1]], [[0.1]]])
    params = with_values(model, [0, 1], **{"layers.0.weight": w0, "layers.0.bias": b0,
                                           "layers.1.weight": w1, "layers.1.bias": b1})
    m = metrics.measure(model, params, CFG, probe(2))
    assert {"sparsity", "independent_fraction", "rank.layer0", "rank.layer1"} <= set(m)
    assert "rank" not in m and "balance" not in m
    assert not any(k.startswith(("member_", "ensemble_")) for k in m)     # a single MLP is no ensemble
    # run 0: groups {0, 1}, {2} → 2/3; run 1: {0, 1}, neuron 2 dead → 1/3
    assert values(m["independent_fraction"]) == pytest.approx([2 / 3, 1 / 3])
    assert values(m["sparsity"]) == pytest.approx([0.0, 1 / 3])
    # mirrors: Swap (0,1), (0,2), (1,2) and SignFlip 0, 1, 2 → run 0: swap (0,1) holds (1/6);
    # run 1: swap (0,1) and the sign flip of the dead neuron 2 hold (2/6)
    assert values(m["constraint_fraction"]) == pytest.approx([1 / 6, 2 / 6])
    # W0 = rows (1,2), (1,2), (−1,0.3): rank 2; run 1 rows (1,2), (1,2), (0,0): rank 1
    assert values(m["rank.layer0"]) == pytest.approx([2.0, 1.0])
    # stable rank of run 0's W0: ‖W‖_F² / λ_max(WᵀW), WᵀW = [[3, 3.7], [3.7, 8.09]]
    lam = (11.09 + math.sqrt(11.09**2 - 4 * (3 * 8.09 - 3.7**2))) / 2
    assert values(m["stable_rank.layer0"]) == pytest.approx([11.09 / lam, 1.0], rel=1e-9)


def test_measure_ensemble_identical_members():
    model = build(EnsembleConfig(width=2, depth=1, members=3, activation="tanh"), in_dim=2, out_dim=1)
    params = with_values(model, [0, 1])
    g = torch.Generator().manual_seed(3)
    params = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}
    for k in params:                            # run 0: member 1 is a copy of member 0
        params[k][0, 1] = params[k][0, 0]
    x = probe(2)
    m = metrics.measure(model, params, CFG, x)
    assert {"member_independent_fraction", "ensemble_spread", "ensemble_disagreement"} <= set(m)
    assert values(m["member_independent_fraction"]) == pytest.approx([2 / 3, 1.0])

    def nd(a, b):                               # 2‖a − b‖² / (‖a‖² + ‖b‖²)
        return float(2 * (a - b).pow(2).sum() / (a.pow(2).sum() + b.pow(2).sum()))

    def member(r, i):                           # member i of run r as one vector
        return torch.cat([params[k][r, i].reshape(-1) for k in params])

    def output(r, i):                           # tanh(x W0ᵀ + b0) W1ᵀ + b1
        h = torch.tanh(x @ params["layers.0.weight"][r, i].T + params["layers.0.bias"][r, i])
        return (h @ params["layers.1.weight"][r, i].T + params["layers.1.bias"][r, i]).reshape(-1)

    # run 0: pairs (0,1) → 0, (0,2) and (1,2) equal → spread = 2 d(0,2) / 3
    assert float(m["ensemble_spread"][0]) == pytest.approx(2 * nd(member(0, 0), member(0, 2)) / 3)
    assert float(m["ensemble_disagreement"][0]) == pytest.approx(2 * nd(output(0, 0), output(0, 2)) / 3)
    pairs = [(0, 1), (0, 2), (1, 2)]
    assert float(m["ensemble_spread"][1]) == pytest.approx(sum(nd(member(1, i), member(1, j)) for i, j in pairs) / 3)
    assert float(m["ensemble_disagreement"][1]) == pytest.approx(
        sum(nd(output(1, i), output(1, j)) for i, j in pairs) / 3)


def test_dead_members_count_as_zero_in_spread_and_disagreement():
    """docs/theory.md §4: a member within the sparsity tolerance of zero is measured as zero."""
    model = build(EnsembleConfig(width=2, depth=1, members=3, activation="tanh"), in_dim=2, out_dim=1)
    params = with_values(model, [0, 1])
    g = torch.Generator().manual_seed(4)
    params = {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}
    for k in params:
        params[k][0] *= 1e-5                    # run 0: every member dead (‖θ_m‖ ≪ atol), none identical
        params[k][1, 1:] *= 1e-5                # run 1: members 1 and 2 dead, member 0 alive
    m = metrics.measure(model, params, CFG, probe(2))
    assert float(m["ensemble_spread"][0]) == 0.0 and float(m["ensemble_disagreement"][0]) == 0.0
    # run 1: pairs (0,1), (0,2) at distance 2 (a live member against zero), (1,2) at 0
    assert float(m["ensemble_spread"][1]) == pytest.approx(4 / 3)
    assert float(m["ensemble_disagreement"][1]) == pytest.approx(4 / 3)


def test_an_ensemble_weight_decay_killed_is_homogeneous(tmp_path):
    """The case of issue 17: permutation_homogeneity at λ = 0.3 kills every member in 300 steps
    (weight norm ~3e-4); its spread read 1.6–2.2 before dead members counted as zero."""
    from symrun.training import engine
    from symrun.config import Config, TeacherDataConfig, TrainConfig, validate

    cfg = validate(Config(model=EnsembleConfig(members=4, width=8, bias=False),
                          data=TeacherDataConfig(teacher="mlp", dim=10, hidden=4),
                          train=TrainConfig(steps=300, log_every=300)))
    cfg.optim.lr, cfg.optim.weight_decay = 0.2, 0.3
    (outcome,) = engine.train_pack([cfg])
    last = outcome.rows[-1]
    assert last["sparsity"] == 1.0 and last["weight_norm"] < 1e-2
    assert last["ensemble_spread"] == 0.0 and last["ensemble_disagreement"] == 0.0


# ---------------------------------------------------------------------------------------------
# Neural collapse (Papyan, Han & Donoho 2020), conventions in metrics.neural_collapse


def test_neural_collapse_is_zero_at_an_exact_simplex_with_an_aligned_classifier():
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3], dtype=torch.float64)
    means = torch.stack([angles.cos(), angles.sin()], dim=-1)          # (3, 2), a simplex ETF in 2-D
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    h = means[y][None]                                                 # every sample at its class mean
    nc = metrics.neural_collapse(h, y, means[None], 3)
    for key in ("nc1", "nc2_equinorm", "nc2_equiangle", "nc3", "nc4"):
        assert nc[key].item() == pytest.approx(0.0, abs=1e-12), key


def test_neural_collapse_values_by_hand():
    s = 0.5
    # class 0 at (1 ± s, 0), class 1 at (−1 ± s, 0): means ±e1, Σ_B = e1e1ᵀ, Σ_W = s² e1e1ᵀ
    h = torch.tensor([[1 + s, 0.0], [1 - s, 0.0], [-1 + s, 0.0], [-1 - s, 0.0]], dtype=torch.float64)[None]
    y = torch.tensor([0, 0, 1, 1])
    aligned = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)[None]
    nc = metrics.neural_collapse(h, y, aligned, 2)
    assert nc["nc1"].item() == pytest.approx(s**2 / 2)                # tr(Σ_W Σ_B⁺)/C
    assert nc["nc2_equinorm"].item() == pytest.approx(0.0)
    assert nc["nc2_equiangle"].item() == pytest.approx(0.0)           # cos = −1 = −1/(C−1)
    assert nc["nc3"].item() == pytest.approx(0.0) and nc["nc4"].item() == 0.0
    rotated = torch.tensor([[0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)[None]
    nc = metrics.neural_collapse(h, y, rotated, 2)
    assert nc["nc3"].item() == pytest.approx(2.0)                     # ‖W/‖W‖ − M/‖M‖‖² = 4 · (1/√2)²
    # logits all 0: argmax picks class 0, the nearest mean is right: class 1's two samples disagree
    assert nc["nc4"].item() == pytest.approx(0.5)


def test_neural_collapse_nc1_equals_the_explicit_pseudo_inverse_formula():
    # the fast route (projections on Σ_B's eigenvectors) against tr(Σ_W Σ_B⁺)/C written out
    g = torch.Generator().manual_seed(0)
    r, n, p, c = 3, 60, 7, 4
    y = torch.arange(n) % c
    h = torch.randn(r, c, p, generator=g, dtype=torch.float64)[:, y] + 0.3 * torch.randn(r, n, p, generator=g, dtype=torch.float64)
    w = torch.randn(r, c, p, generator=g, dtype=torch.float64)
    means = torch.stack([h[:, y == k].mean(1) for k in range(c)], dim=1)
    within = h - means[:, y]
    sigma_w = within.mT @ within / n
    centred = means - means.mean(1, keepdim=True)
    sigma_b = centred.mT @ centred / c
    expected = torch.einsum("rij,rji->r", sigma_w, torch.linalg.pinv(sigma_b, hermitian=True)) / c
    torch.testing.assert_close(metrics.neural_collapse(h, y, w, c)["nc1"], expected)
    nearest = torch.cdist(h, means).argmin(-1)
    expected_nc4 = (nearest != (h @ w.mT).argmax(-1)).double().mean(-1)
    torch.testing.assert_close(metrics.neural_collapse(h, y, w, c)["nc4"], expected_nc4)


def test_neural_collapse_is_the_same_in_blocks_of_runs_and_on_features_stored_feature_major(monkeypatch):
    """Runs are measured in blocks (COLLAPSE_BLOCK_BYTES), and features an MLP stores feature-major
    (a transposed view) are projected as (targetsᵀ hᵀ)ᵀ: neither changes a run's values."""
    g = torch.Generator().manual_seed(1)
    r, n, p, c = 5, 40, 6, 3
    y = torch.arange(n) % c
    h = torch.randn(r, c, p, generator=g)[:, y] + 0.5 * torch.randn(r, n, p, generator=g)     # float32, (R, N, p)
    w = torch.randn(r, c, p, generator=g)
    whole = metrics.neural_collapse(h, y, w, c)
    stored = h.mT.contiguous().mT                                      # the same values, feature-major
    assert not stored.is_contiguous() and stored.mT.is_contiguous()
    monkeypatch.setattr(metrics, "COLLAPSE_BLOCK_BYTES", 2 * n * p * 8)    # blocks of 2 runs: 2, 2, 1
    for features in (h, stored):
        blocked = metrics.neural_collapse(features, y, w, c)
        for key, value in whole.items():
            torch.testing.assert_close(blocked[key], value, rtol=1e-12, atol=1e-14, msg=key)
    one_by_one = [metrics.neural_collapse(h[i:i + 1], y, w[i:i + 1], c)["nc1"] for i in range(r)]
    torch.testing.assert_close(torch.cat(one_by_one), whole["nc1"], rtol=1e-12, atol=1e-14)


def test_constraint_summary_per_kind_on_a_tanh_mlp():
    """Width 3, no bias, one run: neuron blocks (w_in (2), w_out (1)). Neuron 0 is dead, neurons 1
    and 2 are identical. Sign flips (rescaling): ‖θ_k‖ = (0, √3, √3) → 1 of 3 holds. Swaps
    (permutation): ‖θᵢ − θⱼ‖/√2 over pairs (0,1), (0,2), (1,2) = (√1.5, √1.5, 0) → 1 of 3 holds."""
    model = build(MLPConfig(width=3, depth=1, bias=False, activation="tanh"), in_dim=2, out_dim=1)
    w_in = t([[[[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]]])              # (R=1, M=1, 3, 2)
    w_out = t([[[[0.0, 1.0, 1.0]]]])                                # (1, 1, 1, 3)
    params = {"layers.0.weight": w_in, "layers.1.weight": w_out}
    m = metrics.measure(model, params, CFG, probe(2))
    assert values(m["constraint_fraction.rescaling"]) == pytest.approx([1 / 3])
    assert values(m["constraint_fraction.permutation"]) == pytest.approx([1 / 3])
    assert values(m["constraint_fraction"]) == pytest.approx([2 / 6])
    assert values(m["constraint_distance"]) == pytest.approx([(2 * math.sqrt(3) + 2 * math.sqrt(1.5)) / 6])
    assert "constraint_fraction.rotation" not in m
    relu = build(MLPConfig(width=3, depth=1, bias=False, activation="relu"), in_dim=2, out_dim=1)
    m = metrics.measure(relu, params, CFG, probe(2))                # ReLU: permutation mirrors only
    assert "constraint_fraction.rescaling" not in m and values(m["constraint_fraction.permutation"]) == pytest.approx([1 / 3])


def test_a_metric_column_is_its_name_or_name_dot_qualifier():
    assert metrics.column("rank") == "rank" and metrics.column("rank", "") == "rank"
    assert metrics.column("rank", "layer1.head0") == "rank.layer1.head0"
    assert metrics.column("critical_wd_max", "rescaling") == "critical_wd_max.rescaling"
