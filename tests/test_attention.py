"""model=attention: the forward pass against a loop-by-loop reference, its rotation mirrors
(docs/theory.md §2–§3: loss invariance, Oᵀ∇L = 0 on the constraint set), the rank of W_Q W_Kᵀ
against numpy, a run alone = the same run in a pack, and a bad `model.tokens` refused.

Expected values are computed independently: numpy loops for the forward pass, numpy's SVD for
ranks, and a run trained alone for the pack.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from symrun.training import engine
from symrun.sweeping import sweep
from symrun.config import AttentionConfig, Config, ConfigError, MetricsConfig, TeacherDataConfig, validate
from symrun.training.engine import loss_per_run
from symrun.analysis.metrics import measure
from symrun.models import build
from symrun.analysis.symmetries import Rotation, apply_mirror, constraint_norms
from conftest import assert_same_run

F64 = torch.float64
CPU = torch.device("cpu")
SEEDS = [0, 1]                                # R = 2 runs
T, E, H, K, O = 3, 5, 2, 4, 2                 # tokens, features per token, heads, key_dim, outputs
D = T * E


def make(positions: bool = True):
    """Model, generic float64 params, inputs x (B, d) and targets y (B, o)."""
    model = build(AttentionConfig(tokens=T, heads=H, key_dim=K, positions=positions), D, O)
    params = {k: v.detach() for k, v in model.init_params(SEEDS, CPU, F64).items()}
    g = torch.Generator().manual_seed(123)
    return model, params, torch.randn(9, D, generator=g, dtype=F64), torch.randn(9, O, generator=g, dtype=F64)


def loss(model, params, x, y, weight_decay: float = 0.0) -> torch.Tensor:
    """Per-run half-MSE plus (λ/2)‖θ‖²: (R,)."""
    out = loss_per_run(model.forward(params, x), y, "regression")
    return out + weight_decay / 2 * sum(p.pow(2).flatten(1).sum(-1) for p in params.values())


def reference_forward(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """One run, one sample at a time, one head at a time: x (B, d) → (B, o)."""
    out = []
    for row in x:
        tokens = row.reshape(T, E) + p.get("position", 0.0)                  # (T, e)
        mixed = np.zeros((T, E))
        for h in range(H):
            scores = (tokens @ p["query"][h]) @ (tokens @ p["key"][h].T).T / math.sqrt(K)   # (T, T)
            att = np.exp(scores - scores.max(axis=1, keepdims=True))
            att /= att.sum(axis=1, keepdims=True)                            # softmax over keys
            mixed += att @ (tokens @ p["value"][h]) @ p["out"][h]
        out.append(mixed.mean(axis=0) @ p["readout"])
    return np.array(out)


@pytest.mark.parametrize("positions", [True, False])
@pytest.mark.parametrize("per_run_input", [False, True])
def test_forward_matches_a_loop_reference(positions, per_run_input):
    model, params, x, _ = make(positions)
    xs = torch.stack([x, x.flip(0)]) if per_run_input else x               # (R, B, d) or (B, d)
    out = model.forward(params, xs)
    assert out.shape == (len(SEEDS), 9, O)
    for r in range(len(SEEDS)):
        p = {k: v[r].numpy() for k, v in params.items()}
        expected = reference_forward(p, (xs[r] if per_run_input else x).numpy())
        np.testing.assert_allclose(out[r].numpy(), expected, rtol=1e-12, atol=1e-12)
    assert ("position" in params) == positions


# ---------------------------------------------------------------------------------------------
# rotation mirrors: invariance and Oᵀ∇L = 0 on the constraint set


def test_declared_mirrors():
    model = make()[0]
    assert model.symmetries() == [Rotation("query", "key"), Rotation("value", "out")]


def random_directions(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(K, generator=g, dtype=F64) * 3 for _ in range(n)] + [torch.eye(K, dtype=F64)[0]]


@pytest.mark.parametrize("sym", [Rotation("query", "key"), Rotation("value", "out")], ids=["QK", "VO"])
def test_loss_is_invariant_under_the_rotation_mirrors(sym):
    model, params, x, y = make()
    base = loss(model, params, x, y)
    for n in random_directions():
        mirrored = apply_mirror(sym, params, n)
        assert float((mirrored[sym.left] - params[sym.left]).abs().max()) > 1e-3, "a generic point moves"
        torch.testing.assert_close(loss(model, mirrored, x, y), base, rtol=0, atol=1e-12)
        twice = apply_mirror(sym, mirrored, n)                            # R is an involution
        for k in params:
            torch.testing.assert_close(twice[k], params[k], rtol=0, atol=1e-12)


def test_reflecting_one_factor_alone_changes_the_loss():
    """Control: the invariance is a property of the pair, so the test above can fail."""
    model, params, x, y = make()
    n = random_directions(1)[0]
    n = n / n.norm()
    reflect = torch.eye(K, dtype=F64) - 2 * torch.outer(n, n)
    for name in ("query", "value"):
        moved = {**params, name: params[name] @ reflect}
        assert (loss(model, moved, x, y) - loss(model, params, x, y)).abs().min() > 1e-6


def onto_constraint(sym: Rotation, params, n: torch.Tensor):
    """Project every head of every run so that left·n = 0 and nᵀ·right = 0 (n a unit k-vector)."""
    proj = torch.eye(K, dtype=F64) - torch.outer(n, n)
    return {**params, sym.left: params[sym.left] @ proj, sym.right: proj @ params[sym.right]}


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("sym", [Rotation("query", "key"), Rotation("value", "out")], ids=["QK", "VO"])
def test_gradient_stays_on_the_constraint_set(sym, weight_decay):
    model, params, x, y = make()
    n = torch.randn(K, generator=torch.Generator().manual_seed(9), dtype=F64)
    n = n / n.norm()
    point = onto_constraint(sym, params, n)
    leaves = {k: v.clone().requires_grad_() for k, v in point.items()}
    grads = dict(zip(leaves, torch.autograd.grad(loss(model, leaves, x, y, weight_decay).sum(), list(leaves.values()))))
    gl, gr = grads[sym.left], grads[sym.right]                           # (R, H, e, k), (R, H, k, e)
    assert gl.abs().max() > 1e-4 and gr.abs().max() > 1e-4
    torch.testing.assert_close(gl @ n, torch.zeros_like(gl[..., 0]), rtol=0, atol=1e-12)       # (∇W_Q) n
    torch.testing.assert_close(n @ gr, torch.zeros_like(gr[..., 0, :]), rtol=0, atol=1e-12)    # nᵀ(∇W_Kᵀ)
    # off the set the same components are not zero: the check above can fail
    free = {k: v.clone().requires_grad_() for k, v in params.items()}
    g_free = torch.autograd.grad(loss(model, free, x, y, weight_decay).sum(), free[sym.left])[0]
    assert (g_free @ n).abs().max() > 1e-4
    # constraint_norms: one mirror per head and run holds (the same n was removed from every head)
    norms = constraint_norms(sym, point)
    assert norms.shape == (len(SEEDS), H * K)
    assert ((norms <= 1e-6).sum(dim=1) == H).all()
    assert constraint_norms(sym, params).min() > 1e-3


def test_constraint_norms_per_head_are_half_the_distance_moved():
    """θ − Rθ = 2OOᵀθ: for n an eigenvector of head h's UᵀU + WWᵀ, the part of θ − Rθ in head h
    has norm 2‖Oᵀθ‖, the value constraint_norms reports for that head and direction."""
    model, params, _, _ = make()
    sym = Rotation("query", "key")
    norms = constraint_norms(sym, params).reshape(len(SEEDS), H, K)
    for r in range(len(SEEDS)):
        for h in range(H):
            u, w = params["query"][r, h].numpy(), params["key"][r, h].numpy()
            evals, vecs = np.linalg.eigh(u.T @ u + w @ w.T)               # independent of torch
            np.testing.assert_allclose(norms[r, h].numpy() ** 2, evals, rtol=1e-9, atol=1e-12)
            for c in range(K):
                moved = apply_mirror(sym, params, torch.from_numpy(vecs[:, c]))
                dist = math.sqrt(sum(float((moved[k][r, h] - params[k][r, h]).pow(2).sum()) for k in ("query", "key")))
                assert float(norms[r, h, c]) == pytest.approx(dist / 2, rel=1e-8, abs=1e-10)


# ---------------------------------------------------------------------------------------------
# rank of W_Q W_Kᵀ


def numpy_rank(m: np.ndarray, rtol: float, atol: float) -> int:
    s = np.linalg.svd(m, compute_uv=False)
    return int(((s > rtol * s[0]) & (s > atol)).sum())


def test_rank_metrics_equal_numpy_on_a_product_of_known_rank():
    model, params, x, _ = make()
    g = torch.Generator().manual_seed(3)
    q = torch.randn(len(SEEDS), H, E, K, generator=g, dtype=F64)
    key = torch.randn(len(SEEDS), H, K, E, generator=g, dtype=F64)
    q[:, 0, :, 2:] = 0                      # head 0: rank 2
    q[1, 1, :, 1:] = 0                      # run 1, head 1: rank 1; run 0, head 1: rank K = 4
    params = {**params, "query": q, "key": key}
    cfg = MetricsConfig()
    got = measure(model, params, cfg, x)
    for r in range(len(SEEDS)):
        per_head = [(params["query"][r, h] @ params["key"][r, h]).numpy() for h in range(H)]
        ranks = [numpy_rank(m, cfg.rank_rtol, cfg.rank_atol) for m in per_head]
        assert ranks == ([2, 4] if r == 0 else [2, 1])
        assert float(got["rank"][r]) == np.mean(ranks)
        for h, m in enumerate(per_head):
            assert float(got[f"rank.head{h}"][r]) == ranks[h]
            s = np.linalg.svd(m, compute_uv=False)
            assert float(got[f"stable_rank.head{h}"][r]) == pytest.approx((s**2).sum() / s[0] ** 2, rel=1e-9)
    np.testing.assert_allclose(got["balance"].numpy(), (q.pow(2).sum((1, 2, 3)) - key.pow(2).sum((1, 2, 3))).numpy())


def config(seed=0, wd=0.0, lr=0.2, batch_size=None, label_std=0.0, steps=60) -> Config:
    c = Config(model=AttentionConfig(tokens=2, heads=2, key_dim=3),
               data=TeacherDataConfig(teacher="mlp", dim=8, n=60, n_test=30, batch_size=batch_size), seed=seed)
    c.optim.lr, c.optim.weight_decay, c.noise.label_std = lr, wd, label_std
    c.train.steps, c.train.log_every, c.train.dtype, c.device = steps, 20, "float64", "cpu"
    return validate(c)


def test_logged_rank_is_the_numpy_rank_of_the_final_query_key_product():
    outcome = engine.train_pack([config(wd=0.1, steps=300)])[0]
    assert outcome.status == "finished"
    q, k = outcome.state["query"].numpy(), outcome.state["key"].numpy()   # (H, e, k), (H, k, e)
    cfg = MetricsConfig()
    ranks = [numpy_rank(q[h] @ k[h], cfg.rank_rtol, cfg.rank_atol) for h in range(q.shape[0])]
    assert outcome.rows[-1]["rank"] == np.mean(ranks)
    assert 0 < np.mean(ranks) < 3                                        # weight decay lowered it, not to 0
    assert outcome.rows[0]["rank"] == 3                                  # full rank (k = 3) at init


# ---------------------------------------------------------------------------------------------
# a run alone = the same run in a pack of 8


@pytest.mark.parametrize("batch_size", [None, 20], ids=["full-batch", "minibatch-label-noise"])
def test_a_run_inside_a_pack_of_8_equals_the_run_alone(batch_size):
    noisy = batch_size is not None
    target = config(seed=3, wd=0.02, batch_size=batch_size, label_std=0.2 if noisy else 0.0)
    others = [config(seed=s, wd=wd, lr=lr, batch_size=batch_size, label_std=0.5 if noisy and s % 2 else 0.0)
              for s, wd, lr in [(10, 0.0, 0.1), (11, 0.1, 0.2), (12, 0.01, 0.15), (13, 0.3, 0.2),
                                (14, 0.0, 0.05), (15, 0.05, 0.1), (16, 0.2, 0.2)]]
    pack = others[:5] + [target] + others[5:]
    alone, outcomes = engine.train_pack([target])[0], engine.train_pack(pack)
    packed = outcomes[5]
    assert alone.status == "finished" and {o.status for o in outcomes} == {"finished"}
    assert [r["step"] for r in alone.rows] == [r["step"] for r in packed.rows] == [0, 20, 40, 60]
    assert {"rank", "rank.head0", "rank.head1", "constraint_distance", "balance"} <= alone.rows[-1].keys()
    assert_same_run(alone, packed)
    # the pack-mates did train differently: the comparison is not vacuous
    assert outcomes[0].rows[-1]["train_loss"] != pytest.approx(alone.rows[-1]["train_loss"])


# ---------------------------------------------------------------------------------------------
# configuration


def test_tokens_that_do_not_divide_the_input_are_refused():
    with pytest.raises(ConfigError, match=r"model.tokens=5 must divide the input dimension 24"):
        build(AttentionConfig(tokens=5), 24, 1)
    assert build(AttentionConfig(tokens=6), 24, 1).e == 4


def test_tokens_refused_before_work_through_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match="model.tokens=3 must divide") as err:
        sweep.plan(["model=attention", "data.dim=10", "model.tokens=3"], tmp_path, single=True)
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())                                   # nothing written


@pytest.mark.parametrize("field", ["tokens", "heads", "key_dim"])
def test_non_positive_sizes_are_refused(field):
    c = Config(model=AttentionConfig(**{field: 0}), data=TeacherDataConfig())
    with pytest.raises(ConfigError, match=f"model.{field} must be >= 1, got 0"):
        validate(c)


def test_rank_falls_as_weight_decay_rises():
    """A grid of three weight decays in one pack (about two seconds): the mean rank of W_Q W_Kᵀ over
    heads is full (3) without weight decay and falls monotonically to 0, with the rotation mirrors'
    measured critical weight decay below λ where the rank is gone."""
    decays = [0.0, 0.1, 0.3]
    outcomes = engine.train_pack([config(seed=0, wd=wd, steps=300) for wd in decays])
    ranks = [o.rows[-1]["rank"] for o in outcomes]
    assert ranks[0] == 3 and ranks[-1] == 0
    assert all(a >= b for a, b in zip(ranks, ranks[1:])) and ranks[1] < 3
    assert outcomes[-1].rows[-1]["critical_wd_max.rotation"] < decays[-1]
