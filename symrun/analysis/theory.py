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
    return lasso_solutions(x, y, [lam])[0]


def lasso_sparsity(ds: Dataset, lambdas) -> np.ndarray:
    """Fraction of exact zeros of the lasso solution at each λ."""
    return np.array([np.mean(s == 0) for s in lasso_solutions(ds.x, ds.y, lambdas)])


def lasso_solutions(x: np.ndarray, y: np.ndarray, lambdas) -> list[np.ndarray]:
    """`lasso` at each λ, read off one exact solution path (`lasso_path`): a coefficient out of the
    active set is exactly 0, as coordinate descent leaves it. Where the path cannot answer (it
    stops where XᵀX restricted to the active set is singular, n < d) or its answer fails the
    optimality conditions by more than rounding, scikit-learn's coordinate descent does (its
    import alone is ~1.5 s of a report here, so it is kept for those cases)."""
    y = np.asarray(y, dtype=float).reshape(-1)
    lams, betas = lasso_path(x, y)
    out = []
    for lam in lambdas:
        if lam <= 0:
            out.append(np.linalg.lstsq(x, y, rcond=None)[0])
            continue
        beta = _on_path(lams, betas, lam)
        out.append(beta if beta is not None and _optimal(x, y, beta, lam) else _coordinate_descent(x, y, lam))
    return out


def lasso_path(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The breakpoints (λ_k descending from λ_max = ‖Xᵀy/n‖∞, β_k) of the lasso's solution, which
    is linear in λ between them: the homotopy (LARS with the lasso's step). On an active set A
    with signs s, β_A(λ) = G_AA⁻¹(c_A − λ s_A) (G = XᵀX/n, c = Xᵀy/n); going down in λ, the next
    event is an inactive correlation |c_j − G_jA β_A| reaching λ (j joins, with its sign) or an
    active coefficient reaching 0 (it leaves). The variable the last event moved does not move
    back at the next one (the rounding of its own event would otherwise look like one)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float).reshape(-1)
    n, d = x.shape
    gram, corr = x.T @ x / n, x.T @ y / n
    lam = float(np.abs(corr).max())
    lams, betas = [lam], [np.zeros(d)]
    if lam == 0.0:
        return np.array(lams), np.array(betas)
    last = int(np.argmax(np.abs(corr)))
    signs = {last: float(np.sign(corr[last]))}
    # a bound, not a count: the path has O(d) events; should it stop short, coordinate descent answers
    for _ in range(8 * (d + 1)):
        active = np.array(list(signs))
        try:
            a = np.linalg.solve(gram[np.ix_(active, active)], corr[active])
            b = np.linalg.solve(gram[np.ix_(active, active)], np.array(list(signs.values())))
        except np.linalg.LinAlgError:
            break
        below, event = 0.0, None
        inactive = np.array([j for j in range(d) if j not in signs and j != last], dtype=int)
        with np.errstate(divide="ignore", invalid="ignore"):
            if len(inactive):
                p = corr[inactive] - gram[np.ix_(inactive, active)] @ a
                q = gram[np.ix_(inactive, active)] @ b
                for at, sign in ((p / (1 - q), 1.0), (-p / (1 + q), -1.0)):      # p + λq = ±λ
                    ok = np.isfinite(at) & (at < lam * (1 - 1e-12)) & (at > below)
                    if ok.any():
                        k = int(np.argmax(np.where(ok, at, -np.inf)))
                        below, event = float(at[k]), (int(inactive[k]), sign)
            at = a / b                                                            # a − λb = 0
        ok = np.isfinite(at) & (at < lam * (1 - 1e-12)) & (at > below) & (active != last)
        if ok.any():
            k = int(np.argmax(np.where(ok, at, -np.inf)))
            below, event = float(at[k]), (int(active[k]), 0.0)
        beta = np.zeros(d)
        beta[active] = a - below * b
        lam = below
        if event is not None:
            last = event[0]
            if event[1]:
                signs[last] = event[1]
            else:
                beta[last] = 0.0
                del signs[last]
        lams.append(lam)
        betas.append(beta)
        if event is None:                 # nothing happens above 0: the path ends at λ = 0
            break
    return np.array(lams), np.array(betas)


def _on_path(lams: np.ndarray, betas: np.ndarray, lam: float) -> np.ndarray | None:
    """β(λ) from the breakpoints, or None below the last one when the path stopped before 0."""
    if lam >= lams[0]:
        return np.zeros(betas.shape[1])
    k = int(np.searchsorted(-lams, -lam, side="right")) - 1          # lams[k] ≥ λ > lams[k + 1]
    if k + 1 >= len(lams):
        return None
    t = (lam - lams[k + 1]) / (lams[k] - lams[k + 1])
    beta = betas[k + 1] + t * (betas[k] - betas[k + 1])
    beta[(betas[k] == 0) & (betas[k + 1] == 0)] = 0.0                # out of the active set: exactly 0
    return beta


def _optimal(x: np.ndarray, y: np.ndarray, beta: np.ndarray, lam: float, tol: float = 1e-9) -> bool:
    """The lasso's optimality conditions at λ, up to rounding: Xᵀ(y − Xβ)/n is λ·sign(βᵢ) where
    βᵢ ≠ 0 and at most λ in size where βᵢ = 0."""
    r = x.T @ (y - x @ beta) / len(x)
    on = beta != 0
    return bool(np.all(np.abs(r[on] - lam * np.sign(beta[on])) <= tol * max(lam, 1.0))
                and np.all(np.abs(r[~on]) <= lam + tol * max(lam, 1.0)))


def _coordinate_descent(x: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    from sklearn.linear_model import Lasso

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = Lasso(alpha=lam, fit_intercept=False, tol=1e-12, max_iter=200_000).fit(x, y)
    return fit.coef_


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
