"""Science against the closed forms of docs/theory.md §5, through the real packed trainer.

Every expected value is computed here independently (scikit-learn's lasso, numpy's SVD, the
data's own moments), never taken from a symrun run. Conventions (§1): half-MSE loss and coupled
weight decay λ (penalty λ/2‖θ‖²), so every threshold reads directly in λ. Runs are float64,
full batch (GD) on the CPU; λ is chosen away from every threshold, where convergence slows
down critically (§5, last line).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import Lasso

from symrun import data
from symrun.training import engine
from symrun.analysis import theory
from symrun.config import Config, FactorizationConfig, HadamardConfig, MLPConfig, TeacherDataConfig, validate
from symrun.models import build


def gd_config(model, data_cfg, *, wd: float, lr: float, steps: int, log_every: int | None = None) -> Config:
    """Full-batch float64 GD on the CPU with coupled weight decay `wd`."""
    c = Config(model=model, data=data_cfg)
    c.optim.lr, c.optim.weight_decay = lr, wd
    c.train.steps, c.train.log_every, c.train.dtype = steps, log_every or steps, "float64"
    c.device = "cpu"
    return validate(c)


# ---------------------------------------------------------------------------------------------
# §5.1 Hadamard = lasso


def sklearn_lasso(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """argmin_s (1/2n)‖y − Xs‖² + λ‖s‖₁ by coordinate descent, converged far past 1e-6."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = Lasso(alpha=lam, fit_intercept=False, tol=1e-13, max_iter=1_000_000).fit(x, y)
    return fit.coef_


# sparse_linear teacher (20 inputs, 5 non-zero): λ_max = ‖Xᵀy/n‖∞ ≈ 0.95 on data seed 0.
# 0.08 keeps the 5 true coefficients and zeroes the 15 others, 0.45 keeps 3, 1.2 > λ_max zeroes all;
# the test checks below (KKT margins) that none of them sits near a coefficient's own threshold.
LASSO_LAMBDAS = (0.08, 0.45, 1.2)


def test_hadamard_with_weight_decay_is_the_lasso():
    data_cfg = TeacherDataConfig(teacher="sparse_linear", seed=0)
    ds = data.load(data_cfg)
    x, y = ds.x, ds.y[:, 0]
    n = len(x)
    lam_max = np.abs(x.T @ y / n).max()
    assert min(LASSO_LAMBDAS) < lam_max < max(LASSO_LAMBDAS)

    # One pack, three λ (only per-run settings differ).
    lr, steps = 0.2, 1500
    outcomes = engine.train_pack([gd_config(HadamardConfig(), data_cfg, wd=lam, lr=lr, steps=steps)
                                  for lam in LASSO_LAMBDAS])

    for lam, outcome in zip(LASSO_LAMBDAS, outcomes):
        ref = sklearn_lasso(x, y, lam)
        zero = ref == 0.0                   # coordinate descent sets coefficients exactly to zero
        # Away from thresholds (KKT): a zero coefficient's correlation with the residual is well
        # below λ, a non-zero one is well away from zero — else GD would converge too slowly.
        corr = np.abs(x.T @ (y - x @ ref) / n)
        assert np.all(lam - corr[zero] > 0.05), (lam, corr[zero])
        assert np.all(np.abs(ref[~zero]) > 0.05), (lam, ref[~zero])
        if lam < lam_max:
            assert 0 < zero.sum() < len(ref)
        else:
            assert zero.all()

        assert outcome.status == "finished"
        u, w = outcome.state["u"].numpy(), outcome.state["w"].numpy()
        s = u * w
        # GD never lands on an exact zero: near the symmetric point uᵢ = wᵢ = 0 both shrink by
        # ≈ (1 − lr(λ − |∂L/∂sᵢ|)) per step, so sᵢ only decays geometrically (here to ≲1e-10);
        # 1e-6 sits far below the smallest non-zero lasso coefficient (> 0.05) and far above that.
        assert np.array_equal(np.abs(s) < 1e-6, zero), (lam, s, ref)
        np.testing.assert_allclose(s, ref, rtol=0, atol=1e-5)
        # At the minimum each pair is balanced: |uᵢ| = |wᵢ| (AM–GM on λ/2(uᵢ² + wᵢ²) at fixed uᵢwᵢ).
        np.testing.assert_allclose(np.abs(u), np.abs(w), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# §5.2 factorization = singular-value soft-thresholding


# low_rank teacher (8 inputs → 5 outputs, rank 3, whitened): σ(C) ≈ (1.03, 0.65, 0.30, 0.02, 0.006)
# on data seed 0; these λ fall between them and give ranks 3, 2, 1, 0.
SVT_LAMBDAS = (0.15, 0.45, 0.8, 1.2)


def test_factorization_on_whitened_inputs_soft_thresholds_singular_values():
    data_cfg = TeacherDataConfig(teacher="low_rank", whiten=True, dim=8, out_dim=5, rank=3, seed=0)
    ds = data.load(data_cfg)
    n = len(ds.x)
    np.testing.assert_allclose(ds.x.T @ ds.x / n, np.eye(ds.in_dim), atol=1e-10)   # the closed form's premise
    sigma_c = np.linalg.svd(ds.y.T @ ds.x / n, compute_uv=False)                     # C = YᵀX/n, descending
    expected_ranks = [int((sigma_c > lam).sum()) for lam in SVT_LAMBDAS]
    assert expected_ranks == [3, 2, 1, 0]
    assert min(abs(s - lam) for s in sigma_c for lam in SVT_LAMBDAS) > 0.1            # away from thresholds

    outcomes = engine.train_pack([gd_config(FactorizationConfig(hidden=6), data_cfg, wd=lam, lr=0.2, steps=500)
                                  for lam in SVT_LAMBDAS])

    for lam, rank, outcome in zip(SVT_LAMBDAS, expected_ranks, outcomes):
        assert outcome.status == "finished"
        product = (outcome.state["U"] @ outcome.state["W"]).numpy()                  # (5, 8)
        sigma = np.linalg.svd(product, compute_uv=False)
        np.testing.assert_allclose(sigma, np.maximum(sigma_c - lam, 0.0), rtol=0, atol=1e-6)
        # Surviving modes are ≥ 0.15; the removed ones decay geometrically towards 0.
        assert int((sigma > 1e-6).sum()) == rank
        # The logged numerical rank (#{σᵢ > max(rtol·σ₁, atol)}) agrees, the all-zero product
        # of the last λ included (metrics.rank_atol).
        assert outcome.rows[-1]["rank"] == rank


# ---------------------------------------------------------------------------------------------
# §5.5 balance decay


def test_hadamard_balance_decays_by_one_minus_lr_lambda_squared_per_step():
    data_cfg = TeacherDataConfig(teacher="sparse_linear", seed=1)
    ds = data.load(data_cfg)
    x, y = ds.x, ds.y[:, 0]
    n = len(x)
    lr, steps, log_every, lambdas = 1e-3, 300, 100, (0.0, 0.5, 3.0)
    cfgs = [gd_config(HadamardConfig(), data_cfg, wd=lam, lr=lr, steps=steps, log_every=log_every) for lam in lambdas]
    outcomes = engine.train_pack(cfgs)

    # Same initial point as the runs (each run's init stream depends on its seed only).
    init = build(cfgs[0].model, ds.in_dim, ds.out_dim).init_params([cfgs[0].seed], torch.device("cpu"), torch.float64)
    u0, w0 = init["u"][0].detach().numpy(), init["w"][0].detach().numpy()
    b0 = u0**2 - w0**2

    for lam, outcome in zip(lambdas, outcomes):
        # One GD step, per coordinate (a = 1 − lr·λ, gᵢ = ∂L/∂sᵢ):
        #   uᵢ² − wᵢ² → (a² − lr²gᵢ²)(uᵢ² − wᵢ²)  exactly,
        # so after k steps bᵢ(k) = bᵢ(0)·a^{2k}·Π(1 − lr²gᵢ²/a²) with the product in
        # [1 − k·lr²G²/a², 1]. G bounds |gᵢ| = |xᵢᵀr|/n ≤ ‖xᵢ‖/√n · √(2L); GD with this small
        # lr decreases the regularised loss, so L ≤ L(0) + λ/2‖θ(0)‖². The sum over coordinates may
        # cancel, hence the factor Σ|bᵢ(0)|/|Σbᵢ(0)|.
        a = 1 - lr * lam
        loss0 = 0.5 * np.mean((x @ (u0 * w0) - y) ** 2) + lam / 2 * (u0 @ u0 + w0 @ w0)
        g2 = (x**2).sum(0).max() / n * 2 * loss0
        cancel = np.abs(b0).sum() / abs(b0.sum())
        rows = {r["step"]: r["balance"] for r in outcome.rows}
        assert rows[0] == pytest.approx(b0.sum(), rel=1e-12)
        for k in range(log_every, steps + 1, log_every):
            expected = a ** (2 * k)
            tol = expected * cancel * k * lr**2 * g2 / a**2
            assert tol < 0.02 * expected          # the bound is tight enough to tell (1−lrλ)^{2k} apart
            assert abs(rows[k] / rows[0] - expected) <= tol + 1e-12, (lam, k, rows[k] / rows[0], expected, tol)


# ---------------------------------------------------------------------------------------------
# §5.3 dead tanh neurons


@pytest.mark.parametrize("factor, all_dead", [(1.5, True), (0.5, False)])
def test_tanh_neurons_all_die_iff_weight_decay_exceeds_the_threshold(factor, all_dead):
    data_cfg = TeacherDataConfig(teacher="mlp", dim=10, seed=0)
    ds = data.load(data_cfg)
    # λ_c = ‖E[x yᵀ]‖₂: at f ≡ 0 the loss gradient of one neuron's (w, u) is linear with that
    # operator norm, so weight decay beats it iff λ > λ_c (§5.3).
    lam_c = np.linalg.norm(ds.x.T @ ds.y / len(ds.x), ord=2)
    assert theory.dead_neuron_threshold(ds) == pytest.approx(lam_c, rel=1e-12)

    model = MLPConfig(width=8, depth=1, activation="tanh", bias=False)
    (outcome,) = engine.train_pack([gd_config(model, data_cfg, wd=factor * lam_c, lr=0.3, steps=400)])
    assert outcome.status == "finished"
    w_in, w_out = outcome.state["layers.0.weight"].numpy(), outcome.state["layers.1.weight"].numpy()  # (8, 10), (1, 8)
    neuron_norms = np.sqrt((w_in**2).sum(1) + (w_out**2).sum(0))
    if all_dead:
        assert neuron_norms.max() < 1e-6
        assert outcome.rows[-1]["sparsity"] == 1.0
    else:
        assert neuron_norms.max() > 0.1
        assert outcome.rows[-1]["sparsity"] < 1.0
