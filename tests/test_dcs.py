"""model=linear with DCS (docs/theory.md §6): Θ = (I − OOᵀ)w + O(u⊙v) under weight decay makes
c = OᵀΘ exactly 0 once λ exceeds |∂ℓ/∂c| at c = 0, and not below; the plain linear model never
satisfies the constraint. Also: the declared (u, v) sign mirrors leave the loss unchanged, a run
alone = the same run in a pack, and bad constraint settings are refused.

Expected values are computed independently: O and the forward pass in numpy, the threshold from
the closed-form ridge solution of the problem restricted to OᵀΘ = 0, and a run trained alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from symrun import data
from symrun.training import engine
from symrun.sweeping import sweep
from symrun.config import Config, ConfigError, LinearConfig, TeacherDataConfig, validate
from symrun.training.engine import loss_per_run
from symrun.models import build
from symrun.analysis.symmetries import NeuronSet, SignFlip, Slot, apply_mirror
from conftest import assert_same_run

F64 = torch.float64
CPU = torch.device("cpu")
# The preset's data: its least-squares Θ sums to ≈ −0.32, so sum-to-zero is a real constraint.
DATA = dict(teacher="sparse_linear", n=100, dim=10, nonzero=5, noise_std=0.1)


def numpy_basis(constraint: str, d: int, k: int = 0) -> np.ndarray:
    """O (d, k): 1/√d·1 for sum_to_zero, e_1…e_k for prefix."""
    return np.ones((d, 1)) / np.sqrt(d) if constraint == "sum_to_zero" else np.eye(d)[:, :k]


def config(wd: float, dcs: bool = True, seed: int = 0, lr: float = 0.2, steps: int = 3000,
           constraint: str = "sum_to_zero", constrained: int = 1, out_dim: int = 1) -> Config:
    c = Config(model=LinearConfig(constraint=constraint, constrained=constrained, dcs=dcs),
               data=TeacherDataConfig(**DATA, out_dim=out_dim), seed=seed)
    c.optim.lr, c.optim.weight_decay = lr, wd
    c.train.steps, c.train.log_every, c.train.dtype, c.device = steps, steps // 3, "float64", "cpu"
    return validate(c)


def violation(outcome, o: np.ndarray) -> np.ndarray:
    """OᵀΘ of a finished run, from its saved effective Θ: (k, o)."""
    assert outcome.status == "finished"
    return o.T @ outcome.state["theta"].numpy()


# ---------------------------------------------------------------------------------------------
# (1) DCS enforces the constraint exactly; the plain model does not


@pytest.mark.parametrize("constraint, constrained, out_dim", [("sum_to_zero", 1, 1), ("prefix", 3, 2)])
def test_dcs_makes_the_constraint_exact_where_the_plain_model_violates_it(constraint, constrained, out_dim):
    o = numpy_basis(constraint, DATA["dim"], constrained)
    runs = [config(1.0, dcs, steps=1500, constraint=constraint, constrained=constrained, out_dim=out_dim) for dcs in (True, False)]
    with_dcs, plain = engine.train_pack(runs[:1])[0], engine.train_pack(runs[1:])[0]
    c = violation(with_dcs, o)
    np.testing.assert_allclose(c, 0.0, atol=1e-6)
    np.testing.assert_allclose(with_dcs.state["u"].numpy() * with_dcs.state["v"].numpy(), c, atol=1e-12)
    assert np.linalg.norm(violation(plain, o)) > 0.02
    # the logged metric is ‖OᵀΘ‖_F of the saved Θ
    for outcome in (with_dcs, plain):
        assert outcome.rows[-1]["constraint_violation"] == pytest.approx(np.linalg.norm(violation(outcome, o)), abs=1e-12)
    assert with_dcs.rows[-1]["constraint_violation"] <= 1e-6 < with_dcs.rows[0]["constraint_violation"]


def test_the_unconstrained_model_reports_no_violation():
    outcome = engine.train_pack([config(0.1, dcs=False, constraint="none", steps=30)])[0]
    assert "constraint_violation" not in outcome.rows[-1] and set(outcome.state) == {"w", "theta"}


# ---------------------------------------------------------------------------------------------
# (2), (3) a threshold, not a projection: c = 0 iff λ > |∂ℓ/∂c| at the restricted optimum


def threshold_gradient(lam: float) -> np.ndarray:
    """g = Oᵀ∇ℓ(Θ⊥) for sum_to_zero, with Θ⊥ = argmin ½‖y − XΘ‖²/n + λ/2‖Θ‖² over OᵀΘ = 0:
    ridge on the projected design XP (P = I − OOᵀ), whose solution already lies in range(P)."""
    ds = data.load(TeacherDataConfig(**DATA))
    x, y = ds.x, ds.y
    n, d = x.shape
    o = numpy_basis("sum_to_zero", d)
    xp = x @ (np.eye(d) - o @ o.T)
    theta = np.linalg.solve(xp.T @ xp / n + lam * np.eye(d), xp.T @ y / n)          # (d, 1)
    assert abs((o.T @ theta).item()) < 1e-12
    return o.T @ (x.T @ (x @ theta - y) / n)                                          # (1, 1)


def test_a_small_weight_decay_does_not_enforce_the_constraint():
    outcome = engine.train_pack([config(0.01)])[0]
    assert abs(violation(outcome, numpy_basis("sum_to_zero", DATA["dim"])).item()) > 0.1


def test_the_constraint_holds_exactly_iff_weight_decay_exceeds_the_gradient_at_c_zero():
    o = numpy_basis("sum_to_zero", DATA["dim"])
    below, above = 0.15, 0.6
    g_below, g_above = threshold_gradient(below), threshold_gradient(above)
    assert below < 0.7 * abs(g_below).item() and above > 1.3 * abs(g_above).item(), "λs clearly on each side"
    low, high = engine.train_pack([config(below), config(above)])
    c_low, c_high = violation(low, o).item(), violation(high, o).item()
    assert abs(c_high) <= 1e-6
    assert abs(c_low) > 1e-2
    assert np.sign(c_low) == -np.sign(g_below.item())          # c leaves 0 down the gradient


# ---------------------------------------------------------------------------------------------
# (4) the declared mirrors and the constraint set


def make(constraint="prefix", k=3, d=7, out=2):
    model = build(LinearConfig(constraint=constraint, constrained=k, dcs=True), d, out)
    params = {name: v.detach() for name, v in model.init_params([0, 1], CPU, F64).items()}
    g = torch.Generator().manual_seed(5)
    return model, params, torch.randn(11, d, generator=g, dtype=F64), torch.randn(11, out, generator=g, dtype=F64)


def loss(model, params, x, y):
    return loss_per_run(model.forward(params, x), y, "regression")


@pytest.mark.parametrize("constraint, k", [("prefix", 3), ("sum_to_zero", 1)])
def test_forward_matches_numpy(constraint, k):
    model, params, x, _ = make(constraint, k)
    o = numpy_basis(constraint, 7, k)
    for r in range(2):
        w, u, v = (params[name][r].numpy() for name in ("w", "u", "v"))
        theta = (np.eye(7) - o @ o.T) @ w + o @ (u * v)
        np.testing.assert_allclose(model.forward(params, x)[r].numpy(), x.numpy() @ theta, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("constraint, k", [("prefix", 3), ("sum_to_zero", 1)])
def test_loss_is_invariant_under_the_declared_sign_mirrors(constraint, k):
    model, params, x, y = make(constraint, k)
    sym = SignFlip(NeuronSet("constraint", (Slot("u", 1), Slot("v", 1))))
    assert model.symmetries() == [sym]
    base = loss(model, params, x, y)
    for i in range(k):
        mirrored = apply_mirror(sym, params, i)
        torch.testing.assert_close(mirrored["u"][:, i], -params["u"][:, i])
        torch.testing.assert_close(loss(model, mirrored, x, y), base, rtol=0, atol=1e-12)
    flip_u_only = {**params, "u": -params["u"]}                  # control: one factor alone changes it
    assert (loss(model, flip_u_only, x, y) - base).abs().min() > 1e-6


def test_theta_respects_the_constraint_for_any_w_when_u_times_v_is_zero():
    model, params, x, y = make("prefix", 3)
    o = torch.as_tensor(numpy_basis("prefix", 7, 3))
    u = params["u"].clone()
    u[:, 1] = 0.0                                                 # u⊙v = 0 with u ≠ 0 and v ≠ 0
    v = torch.where(u == 0, params["v"], torch.zeros_like(params["v"]))
    w = torch.randn(params["w"].shape, generator=torch.Generator().manual_seed(2), dtype=F64) * 10
    point = {"w": w, "u": u, "v": v}
    torch.testing.assert_close(o.T @ model.theta(point), torch.zeros(2, 3, 2, dtype=F64), rtol=0, atol=1e-12)
    assert float(model.constraint_violation(point).max()) < 1e-12
    assert float(model.constraint_violation(params).min()) > 1e-3
    # at u = v = 0 (every mirror's constraint set) the loss gradient has no (u, v) component
    leaves = {"w": w.requires_grad_(), "u": torch.zeros_like(u, requires_grad=True), "v": torch.zeros_like(v, requires_grad=True)}
    grads = torch.autograd.grad(loss(model, leaves, x, y).sum(), list(leaves.values()))
    assert grads[0].abs().max() > 1e-3 and grads[1].abs().max() == 0 and grads[2].abs().max() == 0


# ---------------------------------------------------------------------------------------------
# (5) a run alone = the same run in a pack


def test_a_dcs_run_inside_a_pack_equals_the_run_alone():
    target = config(0.3, seed=3, steps=300)
    others = [config(wd, seed=s, lr=lr, steps=300) for s, wd, lr in [(10, 0.0, 0.1), (11, 1.0, 0.2), (12, 0.05, 0.15)]]
    pack = others[:2] + [target] + others[2:]
    alone, outcomes = engine.train_pack([target])[0], engine.train_pack(pack)
    packed = outcomes[2]
    assert {o.status for o in outcomes} == {"finished"}
    assert {"constraint_violation", "constraint_distance"} <= alone.rows[-1].keys()
    assert_same_run(alone, packed)
    assert outcomes[0].rows[-1]["train_loss"] != pytest.approx(alone.rows[-1]["train_loss"])


# ---------------------------------------------------------------------------------------------
# (6) bad settings refused


@pytest.mark.parametrize("model, message", [
    (LinearConfig(constraint="prefix", constrained=0), "model.constrained must be >= 1, got 0"),
    (LinearConfig(constraint="sum_to_one"), "model.constraint must be one of none, sum_to_zero, prefix, got 'sum_to_one'"),
    (LinearConfig(constraint="none", dcs=True), "model.dcs=true needs a model.constraint"),
])
def test_bad_constraints_are_refused(model, message):
    with pytest.raises(ConfigError, match=message):
        validate(Config(model=model, data=TeacherDataConfig()))


def test_a_prefix_longer_than_the_input_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"model.constrained must be in \[1, 10\]"):
        build(LinearConfig(constraint="prefix", constrained=11), 10, 1)
    with pytest.raises(ConfigError, match=r"model.constrained must be in \[1, 6\] \(the input dimension\), got 7"):
        sweep.plan(["model=linear", "data.dim=6", "model.constraint=prefix", "model.constrained=7"], tmp_path, single=True)
    assert build(LinearConfig(constraint="prefix", constrained=10, dcs=True), 10, 1).k == 10
