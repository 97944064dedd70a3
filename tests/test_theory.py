"""The closed forms drawn as theory lines, against values worked out independently."""

import numpy as np
import pytest

from symrun.analysis import theory
from symrun.data import Dataset


def _orthogonal_design(n=8, d=4, seed=0):
    # XᵀX/n = I exactly: columns of √n·Q with Q orthonormal.
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, d)))
    return np.sqrt(n) * q


def test_lasso_on_an_orthogonal_design_is_soft_thresholding():
    x = _orthogonal_design()
    target = np.array([1.5, -0.6, 0.2, 0.0])           # Xᵀy/n for y = X·target
    y = x @ target
    for lam in (0.1, 0.5, 1.0):
        expected = np.sign(target) * np.maximum(np.abs(target) - lam, 0.0)
        np.testing.assert_allclose(theory.lasso(x, y, lam), expected, atol=1e-8)
        np.testing.assert_allclose(theory._coordinate_descent(x, y, lam), expected, atol=1e-8)   # the fallback
    ds = Dataset(x, y[:, None], "regression")
    # zero where |Xᵀy/n| ≤ λ: {0.0}, {0.2, 0.0}, {-0.6, 0.2, 0.0}, all
    assert list(theory.lasso_sparsity(ds, [0.1, 0.5, 1.0, 2.0])) == [0.25, 0.5, 0.75, 1.0]
    assert theory.lasso_threshold(x, y) == pytest.approx(1.5)


def test_svt_on_whitened_inputs_shrinks_the_singular_values_of_c():
    n = d = 3
    x = np.sqrt(n) * np.eye(d)                           # XᵀX/n = I
    c = np.diag([3.0, 2.0, 0.5])                         # wanted C = YᵀX/n
    y = x @ c.T                                          # then YᵀX/n = C
    np.testing.assert_allclose(theory.svt_singular_values(x, y, 1.0), [2.0, 1.0, 0.0])
    ds = Dataset(x, y, "regression")
    assert list(theory.svt_rank(ds, [0.1, 1.0, 2.5, 3.5])) == [3, 2, 1, 0]
    assert list(theory.svt_rank(ds, [0.1, 1.0], hidden=1)) == [1, 1]    # rank ≤ inner dimension h


def test_dead_neuron_threshold_is_the_norm_of_the_input_output_correlation():
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    y = np.array([[3.0], [4.0]])
    assert theory.dead_neuron_threshold(Dataset(x, y, "regression")) == pytest.approx(2.5)   # ‖(1.5, 2)‖
    y2 = np.array([[3.0, 0.0], [0.0, 1.0]])
    assert theory.dead_neuron_threshold(Dataset(x, y2, "regression")) == pytest.approx(1.5)  # top singular value


def test_the_lasso_path_gives_coordinate_descents_solution_at_every_lambda():
    """theory.lasso reads one exact solution path (homotopy). Each answer meets the lasso's
    optimality conditions to rounding, and equals scikit-learn's coordinate descent (the same
    coefficients, the same exact zeros) wherever that has converged as far: on well-posed designs,
    nearly collinear columns, and more inputs than examples (where coordinate descent at tol 1e-13
    can stop 0.3 away on a nearly collinear pair, which its own optimality conditions show)."""
    import warnings

    from sklearn.linear_model import Lasso

    rng = np.random.default_rng(0)
    for trial in range(24):
        n, d = [(200, 20), (40, 12), (12, 30)][trial % 3]
        x = rng.normal(size=(n, d))
        if trial % 4 == 0:
            x[:, 1] = x[:, 0] + 0.01 * rng.normal(size=n)                # nearly collinear
        y = x[:, :5] @ rng.normal(size=5) + 0.1 * rng.normal(size=n)
        lam_max = theory.lasso_threshold(x, y)
        lambdas = np.geomspace(lam_max * 1e-3, lam_max * 1.2, 15)
        compared = 0
        for lam, ours in zip(lambdas, theory.lasso_solutions(x, y, lambdas)):
            assert theory._optimal(x, y, ours, lam, tol=1e-10), (trial, lam)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = Lasso(alpha=lam, fit_intercept=False, tol=1e-13, max_iter=1_000_000).fit(x, y).coef_
            if theory._optimal(x, y, ref, lam, tol=1e-10):
                compared += 1
                np.testing.assert_allclose(ours, ref, atol=1e-6, err_msg=f"trial {trial}, λ = {lam}")
                assert np.array_equal(ours == 0, ref == 0), (trial, lam)
        assert compared >= len(lambdas) // 2, trial          # coordinate descent converged on most


def test_the_hadamard_theory_line_does_not_import_scikit_learn():
    # scipy and scikit-learn take ~1.5 s to import: a report draws the lasso line without them
    import subprocess
    import sys

    code = ("import sys, numpy as np\nfrom symrun import data\nfrom symrun.config import TeacherDataConfig\n"
            "from symrun.analysis import theory\nds = data.load(TeacherDataConfig())\n"
            "s = theory.lasso_sparsity(ds, np.geomspace(1e-4, 1.0, 200))\n"
            "print(s[0] < s[-1] == 1.0, 'sklearn' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False"]
