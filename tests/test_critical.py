"""Critical weight decay λ_c = −λ_min(Oᵀ∇²L(θ₀)O) (symrun.analysis.critical) against closed forms computed
independently in numpy (docs/theory.md §5, in symrun's λ convention: half-MSE, penalty
(λ/2)‖θ‖²): a Hadamard coordinate, λ_c = |Xᵀr/n|ᵢ; a dead tanh neuron, λ_c = ‖E[x̃(y − f₋ᵢ)ᵀ]‖₂;
a rotation mirror of UW at 0, λ_c = σ₁(YᵀX/n); and at the fully symmetric point the thresholds
symrun.analysis.theory draws. Lanczos against the exact block; the end-of-run columns of a training run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from symrun.analysis import critical, theory
from symrun import data
from symrun.training import engine, reparam
from symrun.config import Config, FactorizationConfig, HadamardConfig, MLPConfig, TeacherDataConfig, validate
from symrun.training.engine import loss_per_run
from symrun.models import build
from symrun.analysis.symmetries import Rotation, SignFlip, Swap, project, select

F64 = torch.float64
CPU = torch.device("cpu")


def setup(model_cfg, data_cfg, seeds=(0, 1)):
    """Model, its loss function ρ → (R,) on the whole training set, generic params, the data."""
    ds = data.load(data_cfg)
    model = build(model_cfg, ds.in_dim, ds.out_dim)
    rp = reparam.build(Config(model=model_cfg, data=data_cfg), model)
    g = torch.Generator().manual_seed(4)
    params = {k: v.detach() + 0.2 * torch.randn(v.shape, generator=g, dtype=F64)
              for k, v in rp.init(list(seeds), CPU, F64).items()}
    x, y = torch.as_tensor(ds.x), torch.as_tensor(ds.y)
    return model, (lambda p: loss_per_run(model.forward(p, x), y, "regression")), params, ds


def test_hadamard_coordinate_threshold_is_the_lasso_gradient():
    model, loss_fn, params, ds = setup(HadamardConfig(), TeacherDataConfig(n=80, dim=6))
    sym = model.symmetries()[0]
    for i in range(6):
        mirror = select(sym, params, torch.tensor([i, i]))
        lam_c = critical.threshold(loss_fn, mirror, params, block_size=64)
        point = {k: v.numpy() for k, v in project(mirror, params).items()}
        for r in range(2):
            residual = ds.y[:, 0] - ds.x @ (point["u"][r] * point["w"][r])              # y − f(θ₀), coordinate i off
            assert float(lam_c[r]) == pytest.approx(abs(ds.x[:, i] @ residual) / len(ds.x), rel=1e-10)


@pytest.mark.parametrize("bias", [False, True])
def test_dead_tanh_neuron_threshold(bias):
    model, loss_fn, params, ds = setup(MLPConfig(width=5, bias=bias), TeacherDataConfig(teacher="mlp", n=60, dim=4, out_dim=2))
    flip = next(s for s in model.symmetries() if isinstance(s, SignFlip))
    mirror = select(flip, params, torch.tensor([2, 4]))
    lam_c = critical.threshold(loss_fn, mirror, params, block_size=64)
    point = project(mirror, params)
    residual = (torch.as_tensor(ds.y) - model.forward(point, torch.as_tensor(ds.x))).numpy()   # (R, n, o): y − f₋ᵢ
    xt = np.hstack([ds.x, np.ones((len(ds.x), 1))]) if bias else ds.x                      # x̃
    for r in range(2):
        expected = np.linalg.norm(xt.T @ residual[r] / len(ds.x), ord=2)
        assert float(lam_c[r]) == pytest.approx(expected, rel=1e-9)


def test_at_the_fully_symmetric_point_the_thresholds_of_theory_come_back():
    data_cfg = TeacherDataConfig(n=80, dim=6)
    model, loss_fn, params, ds = setup(HadamardConfig(), data_cfg)
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    per_kind = critical.thresholds(loss_fn, model.symmetries(), zero, limit=100, block_size=64)
    assert per_kind["rescaling"].shape == (2, 6)
    np.testing.assert_allclose(per_kind["rescaling"][0].numpy(), np.abs(ds.x.T @ ds.y[:, 0]) / len(ds.x), rtol=1e-10)
    assert float(per_kind["rescaling"].max()) == pytest.approx(theory.lasso_threshold(ds.x, ds.y), rel=1e-10)

    model, loss_fn, params, ds = setup(MLPConfig(width=4, bias=False), TeacherDataConfig(teacher="mlp", n=60, dim=4))
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    per_kind = critical.thresholds(loss_fn, model.symmetries(), zero, limit=100, block_size=64)
    for name in ("rescaling", "permutation"):      # a swap of two dead neurons sees the same curvature
        np.testing.assert_allclose(per_kind[name].numpy(), theory.dead_neuron_threshold(ds), rtol=1e-9)

    cfg = TeacherDataConfig(teacher="low_rank", dim=5, out_dim=4, n=100, whiten=True)
    model, loss_fn, params, ds = setup(FactorizationConfig(hidden=3), cfg)
    zero = {k: torch.zeros_like(v) for k, v in params.items()}
    per_kind = critical.thresholds(loss_fn, [Rotation("U", "W")], zero, limit=100, block_size=64)
    np.testing.assert_allclose(per_kind["rotation"].numpy(), theory.svt_singular_values(ds.x, ds.y, 0.0)[0], rtol=1e-9)


def test_lanczos_agrees_with_the_exact_block():
    model, loss_fn, params, _ = setup(MLPConfig(width=6, depth=2), TeacherDataConfig(teacher="mlp", n=50, dim=8, out_dim=2))
    swap = next(s for s in model.symmetries() if isinstance(s, Swap))       # block of 8 + 1 + 6 = 15
    mirror = select(swap, params, torch.tensor([3, 7]))
    assert mirror.size == 15
    exact = critical.threshold(loss_fn, mirror, params, block_size=64)
    full = critical.threshold(loss_fn, mirror, params, block_size=14)       # 14 Lanczos steps of 15
    few = critical.threshold(loss_fn, mirror, params, block_size=3)
    torch.testing.assert_close(full, exact, rtol=1e-8, atol=1e-10)
    assert (few <= exact + 1e-12).all()                                     # Ritz values bound λ_min from above


def run_config(wd: float, steps: int = 1500) -> Config:
    c = Config(model=HadamardConfig(), data=TeacherDataConfig(), seed=0)
    c.optim.lr, c.optim.weight_decay = 0.3, wd
    c.train.steps, c.train.log_every, c.train.dtype = steps, steps, "float64"
    c.metrics.critical_mirrors = 20                 # every coefficient (the default measures 4)
    return validate(c)


def test_a_run_logs_critical_weight_decay_at_its_end():
    ds = data.load(TeacherDataConfig())
    above, below = engine.train_pack([run_config(2.0), run_config(0.05)])
    last, first = above.rows[-1], above.rows[0]
    columns = {f"critical_wd_{s}.rescaling" for s in ("min", "median", "max")}
    assert columns <= last.keys() and not columns & first.keys()
    # λ = 2 > λ_max: every coefficient is 0, the symmetric point itself: λ_c = |Xᵀy/n|ᵢ, all below λ
    assert last["critical_wd_max.rescaling"] == pytest.approx(theory.lasso_threshold(ds.x, ds.y), rel=1e-6)
    assert last["critical_wd_min.rescaling"] <= last["critical_wd_median.rescaling"] <= last["critical_wd_max.rescaling"] < 2.0
    # λ = 0.05: the coefficients that stayed 0 are stable (λ_c ≤ λ); the live ones' mirrors are not
    assert below.rows[-1]["critical_wd_min.rescaling"] <= 0.05 + 1e-6 < below.rows[-1]["critical_wd_max.rescaling"]


def test_critical_columns_can_be_switched_off():
    c = run_config(0.1, steps=20)
    c.metrics.critical_mirrors = 0
    assert not any(k.startswith("critical_wd") for k in engine.train_pack([c])[0].rows[-1])


def test_at_end_uses_the_first_critical_examples_and_skips_dead_runs():
    ds = data.load(TeacherDataConfig())
    cfg = run_config(0.1)
    cfg.metrics.critical_examples = 50
    model = build(cfg.model, ds.in_dim, ds.out_dim)
    rp = reparam.build(cfg, model)
    zero = {k: torch.zeros(3, *v.shape[1:], dtype=F64) for k, v in rp.init([0], CPU, F64).items()}
    x, y = torch.as_tensor(ds.x), torch.as_tensor(ds.y)
    cols = critical.at_end(model, rp, zero, x, y, "regression", cfg.metrics, torch.tensor([True, False, True]))
    expected = np.abs(ds.x[:50].T @ ds.y[:50, 0]).max() / 50                   # λ_max of the first 50 examples
    np.testing.assert_allclose(cols["critical_wd_max.rescaling"][[0, 2]].numpy(), expected, rtol=1e-10)
    assert torch.isnan(cols["critical_wd_max.rescaling"][1])                  # a diverged run: NaN
    assert cols["critical_wd_examples"].tolist() == [50.0] * 3 and cols["critical_wd_exact"].tolist() == [0.0] * 3
    cfg.metrics.critical_examples = len(ds.x)                                 # all 200: exact (2 × 2 blocks)
    cols = critical.at_end(model, rp, zero, x, y, "regression", cfg.metrics, torch.ones(3, dtype=torch.bool))
    assert cols["critical_wd_examples"].tolist() == [200.0] * 3 and cols["critical_wd_exact"].tolist() == [1.0] * 3
    np.testing.assert_allclose(cols["critical_wd_max.rescaling"].numpy(), theory.lasso_threshold(ds.x, ds.y), rtol=1e-10)
    assert not critical.at_end(model, rp, zero, x, y, "regression", cfg.metrics.__class__(critical_mirrors=0),
                               torch.ones(3, dtype=torch.bool))


def test_at_end_solves_neuron_blocks_in_closed_form_exactly_whatever_their_size():
    """An MLP's neuron blocks come in closed form, so they are solved whole even when larger than
    metrics.critical_block (which would mean Lanczos by Hessian-vector products): the columns
    equal Hessian-vector products with a block large enough to be exact, and say exact."""
    model_cfg, data_cfg = MLPConfig(width=5), TeacherDataConfig(teacher="mlp", n=60, dim=4, out_dim=2)
    model, loss_fn, params, ds = setup(model_cfg, data_cfg, seeds=(0, 1, 2))
    cfg = Config(model=model_cfg, data=data_cfg).metrics
    cfg.critical_block, cfg.critical_mirrors = 3, 6                           # blocks are 4 + 1 + 2 = 7
    rp = reparam.build(Config(model=model_cfg, data=data_cfg), model)
    x, y = torch.as_tensor(ds.x), torch.as_tensor(ds.y)
    cols = critical.at_end(model, rp, params, x, y, "regression", cfg, torch.ones(3, dtype=torch.bool))
    exact = critical.summarize(critical.thresholds(loss_fn, model.symmetries(), params, 6, block_size=64))
    for k, v in exact.items():
        torch.testing.assert_close(cols[k], v, rtol=1e-9, atol=1e-12)
    assert cols["critical_wd_exact"].tolist() == [1.0] * 3 and cols["critical_wd_examples"].tolist() == [60.0] * 3


def test_at_end_in_passes_of_one_run_gives_the_same_columns(monkeypatch):
    model_cfg, data_cfg = MLPConfig(width=4, depth=2), TeacherDataConfig(teacher="mlp", n=50, dim=3, out_dim=2)
    model, _, params, ds = setup(model_cfg, data_cfg, seeds=(0, 1, 2))
    rp = reparam.build(Config(model=model_cfg, data=data_cfg), model)
    cfg = Config(model=model_cfg, data=data_cfg).metrics
    x, y, alive = torch.as_tensor(ds.x), torch.as_tensor(ds.y), torch.ones(3, dtype=torch.bool)
    together = critical.at_end(model, rp, params, x, y, "regression", cfg, alive)
    monkeypatch.setattr(critical.memory, "EVAL_BYTES", 1)                     # one run per pass
    assert critical.runs_per_pass(lambda p: model.forward(p, x).sum((1, 2)), params, 4) == 1
    apart = critical.at_end(model, rp, params, x, y, "regression", cfg, alive)
    assert together.keys() == apart.keys()
    for k in together:
        torch.testing.assert_close(apart[k], together[k], rtol=1e-12, atol=1e-14)


def test_nearest_mirrors_are_a_stable_sorts_first_ones_ties_included(monkeypatch):
    # distances with many ties (a symmetric point has every mirror at 0) and without
    for trial in range(60):
        g = torch.Generator().manual_seed(trial)
        n = int(torch.randint(1, 60, (1,), generator=g))
        norms = torch.randint(0, 4, (5, n), generator=g).double() / 3 if trial % 2 else torch.rand(5, n, generator=g, dtype=torch.float64)
        limit = int(torch.randint(1, 70, (1,), generator=g))
        monkeypatch.setattr(critical, "constraint_norms", lambda sym, params: norms)
        assert torch.equal(critical.nearest(None, {}, limit), norms.sort(dim=1, stable=True).indices[:, :limit])
