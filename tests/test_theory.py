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
