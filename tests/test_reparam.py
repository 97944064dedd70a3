"""constraint=dcs on any model (symrun.training.reparam, docs/theory.md §6) and symmetry.remove.

After training with weight decay above the threshold, Oᵀθ = 0 holds to 1e-6 in the saved
parameters while the same run without DCS violates it; the sparse kind equals scikit-learn's
Lasso; sum_zero per output on model=linear sums each output's coefficients; θ starts at the
model's own initialisation; the extra parameters are counted; a DCS run alone = in a pack; bad
settings and malformed subspace files are refused with one line, before any work.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from symrun import data
from symrun.training import engine, reparam
from symrun.sweeping import sweep
from symrun.analysis import theory
from symrun.config import (Config, ConfigError, LinearConfig, MLPConfig, TeacherDataConfig,
                           validate)
from symrun.models import build
from conftest import assert_same_run

MLP_DATA = dict(teacher="mlp", n=100, dim=6, hidden=3)
LINEAR_DATA = dict(teacher="sparse_linear", n=100, dim=10, nonzero=5, noise_std=0.1)


def config(model, data_kw, wd, steps=2000, lr=0.2, seed=0, **constraint) -> Config:
    c = Config(model=model, data=TeacherDataConfig(**data_kw), seed=seed)
    c.optim.lr, c.optim.weight_decay = lr, wd
    c.train.steps, c.train.log_every, c.train.dtype, c.device = steps, steps, "float64", "cpu"
    for key, value in constraint.items():
        setattr(c.constraint, key, value)
    if constraint:
        c.constraint.name = "dcs"
    return validate(c)


def train(*cfgs):
    outcomes = [engine.train_pack([c])[0] for c in cfgs]
    assert {o.status for o in outcomes} == {"finished"}
    return outcomes


def test_sum_zero_per_output_unit_on_an_mlp_layer():
    with_dcs, plain = train(config(MLPConfig(width=8), MLP_DATA, 0.1, kind="sum_zero", params=["layers.0.weight"]),
                            config(MLPConfig(width=8), MLP_DATA, 0.1))
    w = with_dcs.state["layers.0.weight"]                                      # (8, 6): the saved θ
    assert w.sum(-1).abs().max() <= 1e-6 and w.abs().max() > 0.02             # constrained, not dead
    assert plain.state["layers.0.weight"].sum(-1).abs().max() > 0.02
    assert with_dcs.rows[-1]["constraint_violation"] <= 1e-6 < with_dcs.rows[0]["constraint_violation"]
    assert with_dcs.rows[-1]["constraint_zeros"] == 1.0
    assert "constraint_violation" not in plain.rows[-1]


def test_group_switches_a_parameter_off_as_a_whole():
    with_dcs, plain = train(config(MLPConfig(width=8), MLP_DATA, 0.03, kind="group", params=["layers.0.bias"]),
                            config(MLPConfig(width=8), MLP_DATA, 0.03))
    assert with_dcs.state["layers.0.bias"].abs().max() <= 1e-6
    assert plain.state["layers.0.bias"].abs().max() > 1e-3
    assert with_dcs.state["layers.0.weight"].abs().max() > 0.1                 # the rest of the net lives


def test_subspace_from_a_file(tmp_path):
    d = LINEAR_DATA["dim"]
    basis = np.random.default_rng(0).standard_normal((d, 2))                   # not orthonormal: symrun orthonormalises
    np.save(tmp_path / "o.npy", basis)
    with_dcs, plain = train(config(LinearConfig(), LINEAR_DATA, 2.0, kind="subspace", params=["w"], path=str(tmp_path / "o.npy")),
                            config(LinearConfig(), LINEAR_DATA, 2.0))
    q, _ = np.linalg.qr(basis)
    theta = with_dcs.state["theta"].numpy()                                   # (d, 1)
    np.testing.assert_allclose(q.T @ theta, 0.0, atol=1e-6)
    assert np.abs(theta).max() > 0.05 and np.abs(q.T @ plain.state["theta"].numpy()).max() > 0.02


def test_sparse_dcs_is_the_lasso():
    ds = data.load(TeacherDataConfig(**LINEAR_DATA))
    lam = 0.1
    (outcome,) = train(config(LinearConfig(), LINEAR_DATA, lam, steps=6000, kind="sparse"))
    expected = theory.lasso(ds.x, ds.y, lam)
    theta = outcome.state["theta"].numpy()[:, 0]
    assert 0 < (expected == 0).sum() < len(expected)                           # some zero, some not
    np.testing.assert_allclose(theta, expected, atol=1e-6)
    assert (np.abs(theta) <= 1e-6).sum() == (expected == 0).sum()


def test_sum_zero_per_output_on_model_linear_sums_each_output_s_coefficients():
    """model=linear stores Θᵀ as w (o, d), so per=output is Σᵢ Θᵢⱼ = 0 for each output j."""
    (outcome,) = train(config(LinearConfig(), {**LINEAR_DATA, "out_dim": 2}, 1.0, steps=3000, kind="sum_zero", params=["w"]))
    theta = outcome.state["theta"].numpy()                                    # (d, 2)
    np.testing.assert_allclose(theta.sum(axis=0), 0.0, atol=1e-6)
    assert np.abs(theta).max() > 0.05 and outcome.rows[-1]["constraint_violation"] <= 1e-6


def test_theta_starts_at_the_model_initialisation_and_extra_parameters_are_counted():
    model = build(MLPConfig(width=8), 6, 2)
    own = model.init_params([3], torch.device("cpu"), torch.float64)
    for kind, extra in [("sparse", 8 * 6), ("sum_zero", 2 * 8), ("group", 1)]:
        rp = reparam.build(config(MLPConfig(width=8), {**MLP_DATA, "out_dim": 2}, 0.1, kind=kind,
                                  params=["layers.0.weight"]), model)
        raw = rp.init([3], torch.device("cpu"), torch.float64)
        theta = rp.network(raw)
        for k in own:
            torch.testing.assert_close(theta[k], own[k], rtol=0, atol=1e-15)
        assert rp.extra_parameters() == extra
        assert sum(v[0].numel() for v in raw.values()) - sum(v[0].numel() for v in own.values()) == extra


def test_a_dcs_run_inside_a_pack_equals_the_run_alone():
    make = lambda seed, wd: config(MLPConfig(width=6), MLP_DATA, wd, steps=200, seed=seed,  # noqa: E731
                                   kind="sum_zero", per="layer", params=["layers.0.weight", "layers.1.weight"])
    target = make(3, 0.05)
    alone, pack = engine.train_pack([target])[0], engine.train_pack([make(1, 0.0), target, make(2, 0.2)])
    assert_same_run(alone, pack[1])


@pytest.mark.parametrize("overrides, message", [
    (["constraint=dcs", "constraint.kind=diagonal"], "constraint.kind must be one of sparse, sum_zero, subspace, group"),
    (["constraint=dcs", "constraint.params=[nope]"], "constraint.params names 'nope', which model=hadamard does not have (it has: u, w)"),
    (["constraint=dcs", "constraint.kind=subspace"], "constraint.path is needed by, and only by, constraint.kind=subspace"),
    (["constraint.kind=group"], "constraint.* settings need constraint=dcs"),
    (["constraint=dcs", "symmetry.remove=true"], "cannot be combined"),
    (["symmetry.remove_std=-1"], "symmetry.remove_std must be >= 0"),
    (["model=linear", "model.dcs=true"], "unknown setting 'model.dcs'; it is now constraint.enforce"),
])
def test_bad_settings_are_refused_before_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        sweep.plan(overrides, tmp_path, single=True)
    assert "\n" not in str(err.value) and not any(tmp_path.iterdir())


@pytest.mark.parametrize("content, message", [
    (np.ones((10, 2)), "linearly dependent"),
    (np.ones((7, 1)), r"O must be \(20, k\)"),
    (np.full((20, 1), np.nan), "non-finite"),
    (b"not an array", "not a readable .npy/.npz array"),
    ({"a": np.eye(20)[:, :2], "b": np.eye(20)[:, :1]}, "an .npz needs an array named O"),
])
def test_malformed_subspace_files_are_refused(tmp_path, cli, content, message):
    path = tmp_path / ("o.npz" if isinstance(content, dict) else "o.npy")
    if isinstance(content, dict):
        np.savez(path, **content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.save(path, content if content.shape[0] != 10 else np.hstack([content.T, content.T]).T[:, :2])
    args = ["model=hadamard", "constraint=dcs", "constraint.kind=subspace", "constraint.params=[u]", f"constraint.path={path}"]
    with pytest.raises(ConfigError, match=message):
        sweep.compose_one(args)
    if isinstance(content, bytes):          # and through the real command: one line, exit 2, nothing written
        proc = cli("run", *args, check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
        assert not (tmp_path / "outputs").exists()


def test_an_npz_with_an_array_named_o_is_used(tmp_path):
    np.savez(tmp_path / "o.npz", O=np.eye(20)[:, :3], other=np.zeros(2))
    cfg = sweep.compose_one(["model=hadamard", "constraint=dcs", "constraint.kind=subspace", "constraint.params=[u]",
                             f"constraint.path={tmp_path / 'o.npz'}"])
    rp = reparam.build(cfg, build(cfg.model, 20, 1))
    assert rp.bases["u"].k == 3 and rp.extra_parameters() == 6


def test_symmetry_removal_applies_to_any_model():
    """On the factorization the plain run drops rank at this λ; with the fixed offsets it cannot."""
    def cfg(remove):
        c = Config(model=__import__("symrun.config", fromlist=["FactorizationConfig"]).FactorizationConfig(hidden=6),
                   data=TeacherDataConfig(teacher="low_rank", dim=6, out_dim=6, rank=2, n=200, whiten=True))
        c.optim.lr, c.optim.weight_decay = 0.2, 0.3
        c.train.steps, c.train.log_every, c.train.dtype = 1500, 1500, "float64"
        c.symmetry.remove = remove
        return validate(c)

    plain, removed = train(cfg(False), cfg(True))
    assert plain.rows[-1]["rank"] < 6 and removed.rows[-1]["rank"] == 6
    assert not any(k.startswith("critical_wd") for k in removed.rows[-1])      # no mirrors left to measure
    assert math.isfinite(plain.rows[-1]["critical_wd_max.rotation"])


@pytest.mark.parametrize("preset, wd, metric, plain_value, removed_value", [
    ("dead_neurons", 0.85, "sparsity", 1.0, 0.0),                      # above λ_c every tanh neuron dies
    ("permutation_homogeneity", 0.3, "independent_fraction", 0.0, 1.0),   # the ensemble's members merge
])
def test_symmetry_removal_keeps_neurons_alive_and_distinct(preset, wd, metric, plain_value, removed_value):
    """The structure the plain run falls into at this λ (the presets' own settings) never forms with offsets."""
    plain, removed = (sweep.compose_one([f"experiment={preset}", f"optim.weight_decay={wd}", "noise.label_std=0",
                                         f"symmetry.remove={r}", "train.log_every=1000"]) for r in ("false", "true"))
    out_plain, out_removed = train(plain, removed)
    assert out_plain.rows[-1][metric] == plain_value and out_removed.rows[-1][metric] == removed_value


def test_dcs_through_the_command_line_saves_parameters_that_satisfy_the_constraint(cli, tmp_path):
    cli("run", "model=linear", "constraint=dcs", "constraint.kind=sum_zero", "constraint.per=layer",
        "constraint.params=[w]", "data.n=100", "data.dim=10", "optim.lr=0.2", "optim.weight_decay=0.6",
        "train.steps=3000", "train.log_every=1000", "train.dtype=float64")
    (saved,) = list(tmp_path.glob("outputs/*/*/runs/*/params.pt"))
    state = torch.load(saved, weights_only=True)
    assert set(state) == {"w", "theta"}                                   # the composed θ, not (w, u, v)
    assert abs(float(state["theta"].sum())) <= 1e-6 and float(state["theta"].abs().max()) > 0.1


def test_shrink_and_perturb_acts_on_the_trained_parameters_under_dcs():
    """At a task switch the fresh initialisation is drawn in ρ's names (w, u, v), so a DCS run
    goes through a task sequence; the constraint coordinates follow the same shrink."""
    c = config(MLPConfig(width=4), MLP_DATA, 0.01, steps=20, kind="sum_zero", params=["layers.0.weight"])
    c.tasks.count, c.tasks.change, c.tasks.shrink, c.tasks.perturb = 2, "pixels", 0.8, 0.1
    (outcome,) = train(validate(c))
    assert [r["task"] for r in outcome.rows][-1] == 1 and "constraint_violation" in outcome.rows[-1]
