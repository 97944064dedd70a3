"""The closed-form Hessian blocks of neuron mirrors (symrun.models.nets.curvature) against the blocks
Hessian-vector products build (symrun.analysis.critical), entry by entry, in float64; and the batched
λ_c of every mirror at once against one mirror at a time."""

from __future__ import annotations

import pytest
import torch

from symrun.analysis import critical
from symrun import data
from symrun.training import reparam
from symrun.models.nets import curvature
from symrun.config import Config, DigitsDataConfig, EnsembleConfig, MLPConfig, TeacherDataConfig
from symrun.training.engine import loss_per_run
from symrun.training.loss import RunLoss
from symrun.models import build
from symrun.analysis.symmetries import SignFlip, Swap, project, select

F64 = torch.float64
CPU = torch.device("cpu")


def setup(model_cfg, data_cfg, runs=3, n=40, scale=0.3):
    ds = data.load(data_cfg)
    model = build(model_cfg, ds.in_dim, ds.out_dim)
    rp = reparam.build(Config(model=model_cfg, data=data_cfg), model)
    g = torch.Generator().manual_seed(7)
    params = {k: v.detach() + scale * torch.randn(v.shape, generator=g, dtype=F64)
              for k, v in rp.init(list(range(runs)), CPU, F64).items()}
    x = torch.as_tensor(ds.x[:n], dtype=F64)
    y = torch.as_tensor(ds.y[:n]) if ds.task == "classification" else torch.as_tensor(ds.y[:n], dtype=F64)
    loss_of = lambda out: loss_per_run(out, y, ds.task)  # noqa: E731
    return model, params, x, loss_of


def hvp_blocks(model, sym, params, order, x, loss_of):
    """Oᵀ∇²L(θ₀)O of mirror order[r, m] by Hessian-vector products, one mirror at a time: (R, M, k, k)."""
    loss_fn = lambda p: loss_of(model.forward(p, x))  # noqa: E731
    out = []
    for slot in range(order.shape[1]):
        mirror = select(sym, params, order[:, slot])
        matvec = critical.restricted_matvec(mirror, critical.hvp_at(loss_fn, project(mirror, params)))
        out.append(critical.block(matvec, order.shape[0], mirror.size, F64, CPU))
    return torch.stack(out, dim=1)


CASES = [
    (MLPConfig(width=6, activation="tanh"), TeacherDataConfig(teacher="mlp", dim=5, out_dim=2)),
    (MLPConfig(width=6, activation="tanh", bias=False), TeacherDataConfig(teacher="mlp", dim=5, out_dim=2)),
    (MLPConfig(width=5, depth=3, activation="tanh"), TeacherDataConfig(teacher="mlp", dim=4, out_dim=3)),
    (MLPConfig(width=5, depth=2, activation="relu"), TeacherDataConfig(teacher="mlp", dim=4, out_dim=2)),
    (MLPConfig(width=5, depth=2, activation="gelu"), TeacherDataConfig(teacher="mlp", dim=4, out_dim=2)),
    (MLPConfig(width=7, activation="tanh"), DigitsDataConfig()),                         # cross-entropy
    (EnsembleConfig(members=3, width=4, activation="tanh"), TeacherDataConfig(teacher="mlp", dim=4, out_dim=2)),
    (EnsembleConfig(members=2, width=4, depth=2, activation="gelu"), DigitsDataConfig()),
]


@pytest.mark.parametrize("by_hand", [False, True], ids=["autograd", "by-hand"])
@pytest.mark.parametrize("model_cfg,data_cfg", CASES, ids=lambda c: getattr(c, "name", ""))
def test_closed_form_blocks_equal_hessian_vector_products(model_cfg, data_cfg, by_hand):
    model, params, x, loss_of = setup(model_cfg, data_cfg)
    if by_hand:     # δ' of the output layer written out (RunLoss.grad_t), as symrun.analysis.critical asks
        ds = data.load(data_cfg)
        y = torch.as_tensor(ds.y[:len(x)]) if ds.task == "classification" else torch.as_tensor(ds.y[:len(x)], dtype=F64)
        loss_of = RunLoss(y, ds.task)
    g = torch.Generator().manual_seed(1)
    checked = 0
    for sym in model.symmetries():
        if not isinstance(sym, (SignFlip, Swap)) or sym.neurons.name == "members":
            assert model.mirror_blocks(sym, params, torch.zeros(3, 1, dtype=torch.long), x, loss_of) is None
            continue
        count = critical.constraint_norms(sym, params).shape[1]
        order = torch.randint(count, (3, 4), generator=g)                      # 4 mirrors per run, any
        closed = model.mirror_blocks(sym, params, order, x, loss_of)
        expected = hvp_blocks(model, sym, params, order, x, loss_of)
        assert closed.shape == expected.shape
        scale = expected.abs().max()
        assert scale > 1e-3                                                    # a block worth comparing
        torch.testing.assert_close(closed, expected, rtol=0, atol=1e-10 * float(scale))
        checked += 1
    assert checked >= 1


def test_dead_relu_neurons_have_no_curvature_and_their_swap_block_is_zero():
    # Two dead relu neurons: z = 0 on every example, where torch's relu has σ'(0) = 0 — so no
    # gradient reaches them and the swap block is exactly 0, in closed form as by autograd.
    model, params, x, loss_of = setup(MLPConfig(width=5, activation="relu"), TeacherDataConfig(teacher="mlp", dim=4, out_dim=2))
    for k in ("layers.0.weight", "layers.0.bias"):
        params[k][:, :, 1:3] = 0.0
    params["layers.1.weight"][..., 1:3] = 0.0
    swap = next(s for s in model.symmetries() if isinstance(s, Swap))
    pair = 4                                           # (1, 2): after (0, 1), (0, 2), (0, 3), (0, 4)
    order = torch.full((3, 1), pair, dtype=torch.long)
    closed = model.mirror_blocks(swap, params, order, x, loss_of)
    assert torch.equal(closed, torch.zeros_like(closed))
    torch.testing.assert_close(closed, hvp_blocks(model, swap, params, order, x, loss_of), rtol=0, atol=1e-14)


def test_derivatives_match_autograd():
    z = torch.linspace(-3, 3, 61, dtype=F64).requires_grad_()
    for name, fn in (("tanh", torch.tanh), ("relu", torch.relu), ("gelu", torch.nn.functional.gelu)):
        d1 = torch.autograd.grad(fn(z).sum(), z, create_graph=True)[0]
        d2 = torch.autograd.grad(d1.sum(), z, allow_unused=True)[0] if d1.requires_grad else torch.zeros_like(z)
        mine = curvature.derivatives(name, z.detach())
        torch.testing.assert_close(mine[0], d1.detach(), rtol=0, atol=1e-14)
        torch.testing.assert_close(mine[1], torch.zeros_like(z) if d2 is None else d2, rtol=0, atol=1e-14)


@pytest.mark.parametrize("activation", ["tanh", "gelu"])
def test_thresholds_closed_form_batched_and_sequential_agree(activation):
    """λ_c by the closed form, by batched Hessian-vector products (every mirror of a run a virtual
    run) and by the old way, one mirror at a time: the same numbers."""
    model, params, x, loss_of = setup(MLPConfig(width=6, depth=2, activation=activation),
                                      TeacherDataConfig(teacher="mlp", dim=5, out_dim=2))
    loss_fn = lambda p: loss_of(model.forward(p, x))  # noqa: E731
    closed = lambda sym, p, order: model.mirror_blocks(sym, p, order, x, loss_of)  # noqa: E731
    fast = critical.thresholds(loss_fn, model.symmetries(), params, limit=5, block_size=64, closed_form=closed)
    batched = critical.thresholds(loss_fn, model.symmetries(), params, limit=5, block_size=64)
    sequential: dict[str, list[torch.Tensor]] = {}
    for sym in model.symmetries():
        order = critical.nearest(sym, params, 5)
        for slot in range(order.shape[1]):
            lam = critical.threshold(loss_fn, select(sym, params, order[:, slot]), params, block_size=64)
            sequential.setdefault(critical.kind(sym), []).append(lam)
    assert fast.keys() == batched.keys() == sequential.keys()
    for name in fast:
        old = torch.stack(sequential[name], dim=1)
        torch.testing.assert_close(batched[name], old, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(fast[name], old, rtol=1e-9, atol=1e-12)


def test_batched_lanczos_equals_one_mirror_at_a_time():
    # blocks larger than block_size go by Lanczos; virtual runs share the start vector, so a run's
    # estimate is the one it gets alone
    model, params, x, loss_of = setup(MLPConfig(width=6, depth=2), TeacherDataConfig(teacher="mlp", dim=8, out_dim=2))
    loss_fn = lambda p: loss_of(model.forward(p, x))  # noqa: E731
    swap = next(s for s in model.symmetries() if isinstance(s, Swap))
    order = critical.nearest(swap, params, 3)
    batched = critical.batched(loss_fn, swap, params, order, block_size=5)
    for slot in range(3):
        alone = critical.threshold(loss_fn, select(swap, params, order[:, slot]), params, block_size=5)
        torch.testing.assert_close(batched[:, slot], alone, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("changed", ["layers.0.weight", "layers.1.bias", "x"])
def test_kept_layers_and_pair_products_are_not_reused_after_a_change_in_place(changed):
    """neuron_blocks keeps a layer's activations (for the layer's other mirrors) and the data's
    pair products (for the next chunk of runs): a tensor changed in place is computed afresh."""
    model, params, x, loss_of = setup(MLPConfig(width=6, activation="tanh"), TeacherDataConfig(teacher="mlp", dim=5, out_dim=2))
    swap = next(s for s in model.symmetries() if isinstance(s, Swap))
    order = torch.tensor([[0, 3], [1, 2], [4, 0]])
    before = model.mirror_blocks(swap, params, order, x, loss_of)
    (x if changed == "x" else params[changed]).mul_(1.7)
    again = model.mirror_blocks(swap, params, order, x, loss_of)
    fresh = model.mirror_blocks(swap, {k: v.clone() for k, v in params.items()}, order, x.clone(), loss_of)
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)
    assert not torch.allclose(again, before)
