"""Closed forms of docs/theory.md §5, used as tests and as theory lines on phase diagrams."""

from __future__ import annotations

import warnings

import numpy as np

from symrun.data import Dataset


def lasso_threshold(x: np.ndarray, y: np.ndarray) -> float:
    """λ_max = ‖Xᵀy/n‖∞: for λ ≥ λ_max every lasso coefficient is zero (§5.1)."""
    return float(np.abs(x.T @ y.reshape(len(y), -1) / len(x)).max())


def lasso(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """argmin_s (1/2n)‖y − Xs‖² + λ‖s‖₁ — the product u ⊙ w the Hadamard model converges to (§5.1)."""
    from sklearn.linear_model import Lasso

    if lam <= 0:
        return np.linalg.lstsq(x, y.reshape(-1), rcond=None)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = Lasso(alpha=lam, fit_intercept=False, tol=1e-12, max_iter=200_000).fit(x, y.reshape(-1))
    return fit.coef_


def lasso_sparsity(ds: Dataset, lambdas) -> np.ndarray:
    """Fraction of exact zeros of the lasso solution at each λ."""
    return np.array([np.mean(lasso(ds.x, ds.y, lam) == 0) for lam in lambdas])


def svt_singular_values(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """σᵢ(UW) at the minimum of half-MSE + (λ/2)(‖U‖²+‖W‖²) on whitened inputs: max(σᵢ(C) − λ, 0)
    with C = YᵀX/n (singular-value soft thresholding, §5.2)."""
    c = y.reshape(len(y), -1).T @ x / len(x)
    return np.maximum(np.linalg.svd(c, compute_uv=False) - lam, 0.0)


def svt_rank(ds: Dataset, lambdas, hidden: int | None = None) -> np.ndarray:
    """rank(UW) = #{σᵢ(C) > λ}, capped by the inner dimension h when given."""
    ranks = np.array([np.count_nonzero(svt_singular_values(ds.x, ds.y, lam)) for lam in lambdas], dtype=float)
    return np.minimum(ranks, hidden) if hidden is not None else ranks


def dead_neuron_threshold(ds: Dataset) -> float:
    """λ_c = ‖E[x yᵀ]‖₂ above which the all-dead state of a tanh net is stable (§5.3)."""
    return float(np.linalg.norm(ds.x.T @ ds.y.reshape(len(ds.y), -1) / len(ds.x), ord=2))
