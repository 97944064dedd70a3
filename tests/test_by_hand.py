"""Models' hand-written training steps (PackedModel.loss_and_grads) against autograd through their
own forward pass: the same per-run loss and the same gradient, parameter by parameter, for shared
(full-batch) and per-run inputs, shared and per-run targets, both losses, every activation the
models write a backward for; and the engine's use of them: a pack trained by hand ends where the
same pack trained through autograd ends."""

from __future__ import annotations

import pytest
import torch

from symrun import data
from symrun.config import (Config, DigitsDataConfig, EnsembleConfig, HadamardConfig, MLPConfig, TeacherDataConfig,
                           validate)
from symrun.models import build
from symrun.models.nets import cpu
from symrun.models.nets.mlp import MLP
from symrun.training import engine, reparam
from symrun.training.loss import loss_and_grad_t, loss_per_run

F64, CPU = torch.float64, torch.device("cpu")
TEACHER = TeacherDataConfig(teacher="mlp", dim=5, out_dim=2)

CASES = [
    (MLPConfig(width=6, activation="tanh"), TEACHER),
    (MLPConfig(width=6, activation="tanh", bias=False), TEACHER),
    (MLPConfig(width=5, depth=3, activation="tanh"), TEACHER),
    (MLPConfig(width=5, depth=2, activation="relu"), TEACHER),
    (MLPConfig(width=7, activation="tanh"), DigitsDataConfig()),                                # cross-entropy
    (MLPConfig(width=7, depth=2, activation="relu", bias=False), DigitsDataConfig()),
    (EnsembleConfig(members=3, width=4, activation="tanh"), TEACHER),
    (EnsembleConfig(members=2, width=4, depth=2, activation="relu"), DigitsDataConfig()),
    (HadamardConfig(), TeacherDataConfig(teacher="sparse_linear", dim=8, out_dim=1)),
]


def setup(model_cfg, data_cfg, runs=4, n=30, dtype=F64):
    ds = data.load(data_cfg)
    model = build(model_cfg, ds.in_dim, ds.out_dim)
    g = torch.Generator().manual_seed(3)
    params = {k: v.detach() + 0.3 * torch.randn(v.shape, generator=g, dtype=F64)
              for k, v in model.init_params(list(range(runs)), CPU, F64).items()}
    params = {k: v.to(dtype) for k, v in params.items()}
    x = torch.as_tensor(ds.x, dtype=dtype)
    y = torch.as_tensor(ds.y) if ds.task == "classification" else torch.as_tensor(ds.y, dtype=dtype)
    idx = torch.randint(0, len(x), (runs, n), generator=g)
    return ds, model, params, x, y, idx


def by_autograd(model, params, x, y, task):
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss = loss_per_run(model.forward(leaves, x), y, task)
    return loss.detach(), dict(zip(leaves, torch.autograd.grad(loss.sum(), list(leaves.values()))))


@pytest.mark.parametrize("how", ["full", "minibatch"])
@pytest.mark.parametrize("model_cfg,data_cfg", CASES, ids=lambda c: getattr(c, "name", ""))
def test_hand_written_gradient_is_autograds(model_cfg, data_cfg, how):
    ds, model, params, x, y, idx = setup(model_cfg, data_cfg)
    xb, yb = (x, y) if how == "full" else (engine.take(x, idx), engine.take(y, idx))
    want_loss, want = by_autograd(model, params, xb, yb, ds.task)
    with torch.no_grad():
        loss, grads = model.loss_and_grads({k: v.clone() for k, v in params.items()}, xb, yb, ds.task)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    assert set(grads) == set(want)
    for k in want:
        assert grads[k].shape == want[k].shape, k
        torch.testing.assert_close(grads[k], want[k], rtol=1e-10, atol=1e-12, msg=k)


def test_per_run_targets_with_a_shared_input():
    """Label noise on a full batch: one input, each run its own labels."""
    ds, model, params, x, y, _ = setup(MLPConfig(width=6, activation="tanh"), DigitsDataConfig())
    g = torch.Generator().manual_seed(5)
    yr = torch.randint(0, ds.out_dim, (4, len(x)), generator=g)
    want_loss, want = by_autograd(model, params, x, yr, ds.task)
    with torch.no_grad():
        loss, grads = model.loss_and_grads(params, x, yr, ds.task)
    torch.testing.assert_close(loss, want_loss)
    for k in want:
        torch.testing.assert_close(grads[k], want[k], msg=k)


@pytest.mark.parametrize("numpy_route", [True, False])
def test_float32_through_the_cpu_step_products(numpy_route, monkeypatch):
    """float32 on one kernel thread, a pack's products through numpy (on a CPU not made by Intel)
    or torch (symrun.models.nets.cpu)."""
    monkeypatch.setattr(cpu, "NUMPY_ROUTE", numpy_route)
    ds, model, params, x, y, idx = setup(MLPConfig(width=16, activation="tanh"), DigitsDataConfig(), dtype=torch.float32)
    xb, yb = engine.take(x, idx), engine.take(y, idx)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with cpu.one_thread_blas():
            want_loss, want = by_autograd(model, params, xb, yb, ds.task)
            with torch.no_grad():
                loss, grads = model.loss_and_grads(params, xb, yb, ds.task)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(loss, want_loss)
    for k in want:
        torch.testing.assert_close(grads[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_models_without_one_go_through_autograd():
    ds, model, params, x, y, _ = setup(MLPConfig(width=5, activation="gelu"), TEACHER)
    assert model.loss_and_grads(params, x, y, ds.task) is None


@pytest.mark.parametrize("batch_size", [None, 16])
def test_a_pack_trained_by_hand_ends_where_autograd_takes_it(monkeypatch, batch_size):
    """The engine's step by hand against the same pack with the hand-written step switched off."""
    cfgs = []
    for wd in (0.0, 0.01):
        for seed in (0, 1):
            c = Config(model=MLPConfig(width=8, activation="tanh"), data=DigitsDataConfig(batch_size=batch_size), seed=seed)
            c.optim.lr, c.optim.weight_decay, c.train.steps, c.train.log_every = 0.05, wd, 30, 10
            c.train.dtype, c.metrics.critical_mirrors = "float64", 0
            cfgs.append(validate(c))
    dataset = data.load(cfgs[0].data)
    calls = []
    hand_written = MLP.loss_and_grads
    monkeypatch.setattr(MLP, "loss_and_grads", lambda *a: calls.append(1) or hand_written(*a))
    by_hand = engine.train_pack(cfgs, dataset)
    assert len(calls) == 30
    monkeypatch.setattr(reparam.Reparam, "plain_gradient", property(lambda self: False))
    through_autograd = engine.train_pack(cfgs, dataset)
    for a, b in zip(by_hand, through_autograd):
        assert a.status == b.status == "finished"
        for k in a.state:
            torch.testing.assert_close(a.state[k], b.state[k], rtol=1e-9, atol=1e-11, msg=k)
        assert a.rows[-1]["train_loss"] == pytest.approx(b.rows[-1]["train_loss"], rel=1e-9)


@pytest.mark.parametrize("how", ["full", "minibatch"])
@pytest.mark.parametrize("model_cfg,data_cfg", CASES[:-1] + [(MLPConfig(width=5, depth=2, activation="gelu"), TEACHER)],
                         ids=lambda c: getattr(c, "name", ""))
def test_a_forward_without_a_graph_is_the_forward_with_one(model_cfg, data_cfg, how):
    """Evaluations run the MLP's forward under no_grad, biases and activations in place."""
    ds, model, params, x, y, idx = setup(model_cfg, data_cfg)
    xb = x if how == "full" else engine.take(x, idx)
    with torch.no_grad():
        out, pen = model.forward_penultimate(params, xb)
    want, want_pen = model.forward_penultimate({k: v.clone().requires_grad_() for k, v in params.items()}, xb)
    assert torch.equal(out, want.detach())
    assert (pen is None) == (want_pen is None)
    if pen is not None:
        assert torch.equal(pen[0], want_pen[0].detach())


def test_runs_diverge_at_the_same_step_by_hand_and_through_autograd(monkeypatch):
    """A grid whose large learning rates blow up: each run stops at the same step either way,
    and the runs that do not diverge end at the same parameters."""
    cfgs = []
    for lr in (0.05, 0.5, 5.0, 50.0):
        for seed in (0, 1):
            c = Config(model=HadamardConfig(), data=TeacherDataConfig(teacher="sparse_linear", dim=8, out_dim=1), seed=seed)
            c.optim.lr, c.optim.weight_decay, c.train.steps, c.train.log_every = lr, 0.01, 40, 10
            c.train.dtype, c.metrics.critical_mirrors = "float64", 0
            cfgs.append(validate(c))
    by_hand = engine.train_pack(cfgs)
    monkeypatch.setattr(reparam.Reparam, "plain_gradient", property(lambda self: False))
    through_autograd = engine.train_pack(cfgs)
    assert {o.status for o in by_hand} == {"finished", "diverged"}
    for a, b in zip(by_hand, through_autograd):
        assert (a.status, a.diverged_at) == (b.status, b.diverged_at)
        for k in a.state:
            torch.testing.assert_close(a.state[k], b.state[k], rtol=1e-9, atol=1e-11, msg=k)


def test_a_single_output_is_not_summed_over_and_gives_the_same_bits():
    """With one output (the Hadamard model, a scalar target) the losses take the squared residual
    as it is rather than summing over its axis of size 1 (torch's CPU sum there is slow): the
    same bits as that sum, both in loss_per_run and in the hand-written step's loss."""
    g = torch.Generator().manual_seed(0)
    for width in (1, 3):
        out, y = torch.randn(5, 40, width, generator=g), torch.randn(40, width, generator=g)
        assert torch.equal(loss_per_run(out, y, "regression"), 0.5 * (out - y).pow(2).sum(-1).mean(-1))
        loss, _ = loss_and_grad_t(out.mT.clone(), y, "regression")
        assert torch.equal(loss, 0.5 * (out - y).mT.square().sum(1).mean(-1))
