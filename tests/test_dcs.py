"""A linear constraint made exact by DCS (docs/theory.md §6), on model=linear: Θ = (I − OOᵀ)w +
O(u⊙v) under weight decay makes c = OᵀΘ exactly 0 once λ exceeds |∂ℓ/∂c| at c = 0, and not below;
the same model with the constraint measured but not enforced (`constraint.enforce=false`) never
satisfies it and logs how far it is. Also: the DCS sign mirrors leave the loss unchanged, a run
alone = the same run in a pack, and the old model=linear spellings are refused with the new key.

Expected values are computed independently: O and the forward pass in numpy, the threshold from
the closed-form ridge solution of the problem restricted to OᵀΘ = 0, and a run trained alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from symrun import data
from symrun.training import engine, reparam
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
    """O (d, k) on one output's coefficients: 1/√d·1 for sum_to_zero, e_1…e_k for prefix."""
    return np.ones((d, 1)) / np.sqrt(d) if constraint == "sum_to_zero" else np.eye(d)[:, :k]


def prefix_file(folder, d: int, k: int, out: int) -> str:
    """O for "the first k coefficients of each output are 0" on w (out, d), flattened: (out·d, out·k)."""
    o = np.zeros((out * d, out * k))
    for j in range(out):
        o[j * d:j * d + k, j * k:(j + 1) * k] = np.eye(k)
    np.save(folder / "prefix.npy", o)
    return str(folder / "prefix.npy")


def config(wd: float, enforce: bool = True, seed: int = 0, lr: float = 0.2, steps: int = 3000,
           path: str | None = None, out_dim: int = 1, constraint: str = "dcs") -> Config:
    """model=linear on DATA; the constraint sum-to-zero per output, or the subspace at `path`."""
    c = Config(model=LinearConfig(), data=TeacherDataConfig(**DATA, out_dim=out_dim), seed=seed)
    c.constraint.name, c.constraint.enforce, c.constraint.params = constraint, enforce, ["w"]
    c.constraint.kind, c.constraint.path = ("sum_zero", None) if path is None else ("subspace", path)
    if constraint == "none":
        c.constraint = type(c.constraint)()
    c.optim.lr, c.optim.weight_decay = lr, wd
    c.train.steps, c.train.log_every, c.train.dtype, c.device = steps, steps // 3, "float64", "cpu"
    return validate(c)


def violation(outcome, o: np.ndarray) -> np.ndarray:
    """OᵀΘ of a finished run, from its saved effective Θ: (k, o)."""
    assert outcome.status == "finished"
    return o.T @ outcome.state["theta"].numpy()


# ---------------------------------------------------------------------------------------------
# (1) DCS enforces the constraint exactly; measured but not enforced, it is violated


@pytest.mark.parametrize("constraint, constrained, out_dim", [("sum_to_zero", 1, 1), ("prefix", 3, 2)])
def test_dcs_makes_the_constraint_exact_where_the_measured_only_arm_violates_it(constraint, constrained, out_dim, tmp_path):
    o = numpy_basis(constraint, DATA["dim"], constrained)
    path = prefix_file(tmp_path, DATA["dim"], constrained, out_dim) if constraint == "prefix" else None
    runs = [config(1.0, enforce, steps=1500, path=path, out_dim=out_dim) for enforce in (True, False)]
    with_dcs, plain = engine.train_pack(runs[:1])[0], engine.train_pack(runs[1:])[0]
    np.testing.assert_allclose(violation(with_dcs, o), 0.0, atol=1e-6)
    assert np.linalg.norm(violation(plain, o)) > 0.02
    # both arms log ‖OᵀΘ‖_F of the saved Θ, and the fraction of its coordinates at 0
    for outcome in (with_dcs, plain):
        assert outcome.rows[-1]["constraint_violation"] == pytest.approx(np.linalg.norm(violation(outcome, o)), abs=1e-12)
    assert with_dcs.rows[-1]["constraint_violation"] <= 1e-6 < with_dcs.rows[0]["constraint_violation"]
    assert with_dcs.rows[-1]["constraint_zeros"] == 1.0 and plain.rows[-1]["constraint_zeros"] == 0.0
    assert set(plain.state) == {"w", "theta"}                    # not enforced: Θ is trained as itself


def test_the_unconstrained_model_reports_no_violation():
    outcome = engine.train_pack([config(0.1, constraint="none", steps=30)])[0]
    assert "constraint_violation" not in outcome.rows[-1] and set(outcome.state) == {"w", "theta"}


def test_measuring_the_constraint_leaves_the_training_unchanged():
    """constraint.enforce=false only measures: the run equals the unconstrained one."""
    measured, plain = engine.train_pack([config(0.3, enforce=False, steps=200)])[0], engine.train_pack([config(0.3, constraint="none", steps=200)])[0]
    torch.testing.assert_close(measured.state["theta"], plain.state["theta"], rtol=0, atol=0)
    assert measured.rows[-1]["train_loss"] == plain.rows[-1]["train_loss"]


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
# (4) the DCS mirrors and the constraint set, on ρ = (w, u, v)


def make(constraint="prefix", k=3, d=7, out=2, folder=None):
    cfg = Config(model=LinearConfig(), data=TeacherDataConfig(dim=d, out_dim=out))
    cfg.constraint.name, cfg.constraint.params = "dcs", ["w"]
    if constraint == "prefix":
        cfg.constraint.kind, cfg.constraint.path = "subspace", prefix_file(folder, d, k, out)
    else:
        cfg.constraint.kind = "sum_zero"
    model = build(cfg.model, d, out)
    rp = reparam.build(validate(cfg), model)
    raw = {name: v.detach() for name, v in rp.init_params([0, 1], CPU, F64).items()}
    raw = {name: v + 0.3 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=F64) for name, v in raw.items()}
    g = torch.Generator().manual_seed(5)
    return model, rp, raw, torch.randn(11, d, generator=g, dtype=F64), torch.randn(11, out, generator=g, dtype=F64)


def loss(model, rp, raw, x, y):
    return loss_per_run(model.forward(rp.network(raw), x), y, "regression")


@pytest.mark.parametrize("constraint, k", [("prefix", 3), ("sum_to_zero", 1)])
def test_forward_matches_numpy(constraint, k, tmp_path):
    model, rp, raw, x, _ = make(constraint, k, folder=tmp_path)
    # O on the flattened w (2·7 entries): one block per output; a file's O as numpy's QR signs it
    o = (np.linalg.qr(np.load(tmp_path / "prefix.npy"))[0] if constraint == "prefix"
         else np.kron(np.eye(2), numpy_basis(constraint, 7, k)))
    for r in range(2):
        w, u, v = (raw[name][r].numpy() for name in ("w.w", "w.u", "w.v"))     # w (2, 7); u, v (2·k,)
        theta = ((np.eye(14) - o @ o.T) @ w.reshape(-1) + o @ (u * v)).reshape(2, 7).T   # (7, 2)
        np.testing.assert_allclose(model.forward(rp.network(raw), x)[r].numpy(), x.numpy() @ theta, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("constraint, k", [("prefix", 3), ("sum_to_zero", 1)])
def test_loss_is_invariant_under_the_dcs_sign_mirrors(constraint, k, tmp_path):
    model, rp, raw, x, y = make(constraint, k, folder=tmp_path)
    sym = SignFlip(NeuronSet("dcs:w", (Slot("w.u", 1), Slot("w.v", 1))))
    assert rp.symmetries() == [sym] and model.symmetries() == []
    base = loss(model, rp, raw, x, y)
    for i in range(2 * k):
        mirrored = apply_mirror(sym, raw, i)
        torch.testing.assert_close(mirrored["w.u"][:, i], -raw["w.u"][:, i])
        torch.testing.assert_close(loss(model, rp, mirrored, x, y), base, rtol=0, atol=1e-12)
    flip_u_only = {**raw, "w.u": -raw["w.u"]}                    # control: one factor alone changes it
    assert (loss(model, rp, flip_u_only, x, y) - base).abs().min() > 1e-6


def test_theta_respects_the_constraint_for_any_w_when_u_times_v_is_zero(tmp_path):
    model, rp, raw, x, y = make("prefix", 3, folder=tmp_path)
    o = torch.as_tensor(numpy_basis("prefix", 7, 3))
    u = raw["w.u"].clone()
    u[:, 1] = 0.0                                                 # u⊙v = 0 with u ≠ 0 and v ≠ 0
    v = torch.where(u == 0, raw["w.v"], torch.zeros_like(raw["w.v"]))
    w = torch.randn(raw["w.w"].shape, generator=torch.Generator().manual_seed(2), dtype=F64) * 10
    point = {"w.w": w, "w.u": u, "w.v": v}
    theta = rp.network(point)["w"].mT                             # (2, 7, 2): Θ per run
    torch.testing.assert_close(o.T @ theta, torch.zeros(2, 3, 2, dtype=F64), rtol=0, atol=1e-12)
    metrics = type(Config().metrics)()
    assert float(rp.measure(point, metrics)["constraint_violation"].max()) < 1e-12
    assert float(rp.measure(raw, metrics)["constraint_violation"].min()) > 1e-3
    # at u = v = 0 (every mirror's constraint set) the loss gradient has no (u, v) component
    leaves = {"w.w": w.requires_grad_(), "w.u": torch.zeros_like(u, requires_grad=True), "w.v": torch.zeros_like(v, requires_grad=True)}
    grads = torch.autograd.grad(loss(model, rp, leaves, x, y).sum(), list(leaves.values()))
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
    assert {"constraint_violation", "constraint_zeros"} <= alone.rows[-1].keys()
    assert_same_run(alone, packed)
    assert outcomes[0].rows[-1]["train_loss"] != pytest.approx(alone.rows[-1]["train_loss"])


# ---------------------------------------------------------------------------------------------
# (6) model=linear's own DCS settings are gone: one line naming what replaces them


@pytest.mark.parametrize("setting, new", [("model.dcs=true", "constraint.enforce"),
                                          ("model.constraint=sum_to_zero", "constraint.kind=sum_zero"),
                                          ("model.constrained=3", "constraint.kind=subspace")])
def test_the_old_spellings_are_refused_naming_the_new_key(setting, new, tmp_path):
    with pytest.raises(ConfigError, match=f"unknown setting '{setting.split('=')[0]}'; it is now .*{new}"):
        sweep.plan(["model=linear", setting], tmp_path, single=True)
