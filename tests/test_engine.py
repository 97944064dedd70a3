"""The packed engine: a run's numbers do not depend on its pack, runs are isolated, and the packed
optimiser and noise follow the conventions of docs/theory.md §1.

Reference values come from training the same config alone, from torch.optim on a hand-written
forward pass, or from the noise formulas themselves, never from stored symrun output.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from symrun import data
from symrun import models
from symrun.training import engine, memory, noise
from symrun.config import (
    Config,
    DigitsDataConfig,
    EnsembleConfig,
    FactorizationConfig,
    HadamardConfig,
    MLPConfig,
    TeacherDataConfig,
    validate,
)
from symrun.training.engine import StepNoise
from conftest import assert_same_run
from symrun.models import build

CPU = torch.device("cpu")


def make(model, data_cfg, *, seed=0, opt="sgd", lr=0.05, wd=0.0, momentum=0.0, label_std=0.0,
         label_flip=0.0, temperature=0.0, steps=100, log_every=25) -> Config:
    """A validated float64 CPU config; keyword arguments cover the per-run settings."""
    c = Config(model=model, data=data_cfg, seed=seed)
    c.optim.name, c.optim.lr, c.optim.weight_decay, c.optim.momentum = opt, lr, wd, momentum
    c.noise.label_std, c.noise.label_flip, c.noise.temperature = label_std, label_flip, temperature
    c.train.steps, c.train.log_every, c.train.dtype = steps, log_every, "float64"
    c.device = "cpu"
    return validate(c)


# ---------------------------------------------------------------------------------------------
# 1. a run trained alone = the same run inside a pack of 16


def _hadamard_case(rng):
    model, data_cfg = HadamardConfig(), TeacherDataConfig(teacher="sparse_linear")
    target = make(model, data_cfg, seed=3, lr=0.1, wd=0.05)
    others = [make(model, data_cfg, seed=rng.randrange(100), lr=rng.choice([0.02, 0.05, 0.2]),
                   wd=rng.choice([0.0, 0.1, 0.5]), label_std=rng.choice([0.0, 0.3]),
                   temperature=rng.choice([0.0, 1e-3])) for _ in range(15)]
    return target, others


def _mlp_digits_case(rng):
    model, data_cfg = MLPConfig(width=16, activation="tanh"), DigitsDataConfig(batch_size=32)
    target = make(model, data_cfg, seed=5, lr=0.1, momentum=0.9, wd=1e-3, label_flip=0.1)
    others = [make(model, data_cfg, seed=rng.randrange(100), lr=rng.choice([0.05, 0.2]),
                   momentum=rng.choice([0.0, 0.5, 0.9]), wd=rng.choice([0.0, 1e-2]),
                   label_flip=rng.choice([0.0, 0.3])) for _ in range(15)]
    return target, others


def _factorization_case(rng):
    model = FactorizationConfig(hidden=6)
    data_cfg = TeacherDataConfig(teacher="low_rank", dim=8, out_dim=4, batch_size=50)
    target = make(model, data_cfg, seed=7, lr=0.1, wd=0.05, label_std=0.2, temperature=1e-3)
    others = [make(model, data_cfg, seed=rng.randrange(100), lr=rng.choice([0.05, 0.2]),
                   wd=rng.choice([0.0, 0.2]), label_std=rng.choice([0.0, 0.5]),
                   temperature=rng.choice([0.0, 1e-2])) for _ in range(15)]
    return target, others


def _ensemble_case(opt):
    def case(rng):
        model = EnsembleConfig(width=8, members=3, activation="tanh")
        data_cfg = TeacherDataConfig(teacher="mlp", dim=10, out_dim=2, batch_size=40)
        target = make(model, data_cfg, seed=11, opt=opt, lr=0.01, wd=0.05, label_std=0.1)
        others = [make(model, data_cfg, seed=rng.randrange(100), opt=opt, lr=rng.choice([0.003, 0.03]),
                       wd=rng.choice([0.0, 0.1]), label_std=rng.choice([0.0, 0.3])) for _ in range(15)]
        return target, others
    return case


PACK_CASES = {
    "hadamard-full-batch": _hadamard_case,
    "mlp-digits-momentum-label-flip": _mlp_digits_case,
    "factorization-label-noise-langevin": _factorization_case,
    "ensemble-adam": _ensemble_case("adam"),
    "ensemble-adamw": _ensemble_case("adamw"),
}


@pytest.mark.parametrize("case", list(PACK_CASES))
def test_a_run_inside_a_pack_of_16_equals_the_run_alone(case):
    target, others = PACK_CASES[case](random.Random(case))
    pack = others[:7] + [target] + others[7:]                # not at index 0, to catch index slips
    assert len(pack) == 16
    alone = engine.train_pack([target])[0]
    packed = engine.train_pack(pack)
    assert alone.status == "finished"
    assert [r["step"] for r in alone.rows] == [0, 25, 50, 75, 100]
    assert_same_run(packed[7], alone)


# ---------------------------------------------------------------------------------------------
# 2. determinism, 3. seeds matter


def _noisy_pack(seeds):
    model, data_cfg = MLPConfig(width=8), DigitsDataConfig(batch_size=32)
    return [make(model, data_cfg, seed=s, lr=0.1, momentum=0.9, wd=1e-3, label_flip=0.2, temperature=1e-4,
                 steps=50, log_every=10) for s in seeds]


def test_the_same_pack_twice_gives_identical_numbers():
    first, second = engine.train_pack(_noisy_pack([0, 1, 2])), engine.train_pack(_noisy_pack([0, 1, 2]))
    for a, b in zip(first, second):
        assert a.rows == b.rows                               # exact, not approximate
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def test_different_seeds_give_different_numbers():
    a, b = engine.train_pack(_noisy_pack([0, 1]))
    assert a.rows[0]["train_loss"] != b.rows[0]["train_loss"]            # different init
    for ra, rb in zip(a.rows[1:], b.rows[1:]):
        assert ra["train_loss"] != rb["train_loss"]
    assert not torch.allclose(a.state["layers.0.weight"], b.state["layers.0.weight"])


# ---------------------------------------------------------------------------------------------
# 4. a diverging run does not disturb its neighbours


def _divergence_case(name):
    if name == "hadamard-sgd":
        model, data_cfg, kw = HadamardConfig(), TeacherDataConfig(), {}
    else:
        # Momentum keeps non-finite values in the diverged run's buffer, and the factorization's
        # rank and rotation metrics call svd/eigh, which raise on non-finite input.
        model, kw = FactorizationConfig(hidden=4), {"momentum": 0.9}
        data_cfg = TeacherDataConfig(teacher="low_rank", dim=6, out_dim=3)
    good = [make(model, data_cfg, seed=s, lr=0.05, wd=wd, steps=60, log_every=10, **kw)
            for s, wd in [(0, 0.0), (1, 0.1), (2, 0.01)]]
    bad = make(model, data_cfg, seed=3, lr=1e4, steps=60, log_every=10, **kw)
    return good, bad


@pytest.mark.parametrize("name", ["hadamard-sgd", "factorization-momentum"])
def test_a_diverging_run_is_frozen_at_the_step_it_blew_up_and_isolated(name):
    good, bad = _divergence_case(name)
    outcomes = engine.train_pack(good[:1] + [bad] + good[1:])
    reference = engine.train_pack(good)

    flagged = outcomes[1]
    assert flagged.status == "diverged"
    at = flagged.diverged_at
    assert at is not None and 1 < at <= 60
    # `at` is exactly the step that produced a non-finite value: the run alone is finite one step
    # earlier and diverges at `at` too, frozen at the same, finite, parameters.
    steps = lambda n: dataclasses.replace(bad, train=dataclasses.replace(bad.train, steps=n))  # noqa: E731
    (alive,) = engine.train_pack([steps(at - 1)])
    (solo,) = engine.train_pack([steps(at)])
    assert alive.status == "finished"
    assert solo.status == "diverged" and solo.diverged_at == at
    assert all(torch.isfinite(t).all() for t in flagged.state.values())
    for k in solo.state:
        torch.testing.assert_close(flagged.state[k], solo.state[k], rtol=1e-12, atol=0)
    # Its rows are the finite ones logged before `at`: the last finite metrics are kept.
    assert [r["step"] for r in flagged.rows] == [s for s in range(0, 61, 10) if s < at]
    assert all(math.isfinite(v) for r in flagged.rows for v in r.values())
    for got, want in zip(flagged.rows, alive.rows):
        assert got == pytest.approx(want, rel=1e-12)

    others = outcomes[:1] + outcomes[2:]
    for got, want in zip(others, reference):
        assert got.status == "finished" and got.diverged_at is None
        assert [r["step"] for r in got.rows] == [0, 10, 20, 30, 40, 50, 60]
        assert_same_run(got, want)


def _chunk_cases():
    mlp_target, mlp_others = _mlp_digits_case(random.Random("chunks"))
    good, bad = _divergence_case("factorization-momentum")
    return {"mlp-digits (neural collapse)": (mlp_others[:5] + [mlp_target], data.load(mlp_target.data)),
            "factorization with a diverging run": (good[:1] + [bad] + good[1:], data.load(bad.data))}


@pytest.mark.parametrize("name", ["mlp-digits (neural collapse)", "factorization with a diverging run"])
def test_metrics_evaluated_in_chunks_of_runs_equal_one_pass_over_the_pack(name, monkeypatch):
    """A log step evaluates the runs in chunks (memory.EVAL_BYTES bounds runs × examples × the
    model's activations); the rows must not depend on the chunking, a diverged run included."""
    pack, ds = _chunk_cases()[name]
    whole = engine.train_pack(pack, ds)
    width = models.build(pack[0].model, ds.in_dim, ds.out_dim).example_width()
    monkeypatch.setattr(memory, "EVAL_BYTES", 2 * len(ds.x) * width * 8 * memory.EVAL_COPIES)   # chunks of 2 runs
    chunked = engine.train_pack(pack, ds)
    assert len(pack) > 2 and [o.status for o in chunked] == [o.status for o in whole]
    for got, want in zip(chunked, whole):
        assert_same_run(got, want)


def test_runs_that_start_as_one_network_share_one_evaluation_of_step_0(monkeypatch):
    """A grid over weight decay starts each seed's runs alike: step 0 evaluates each distinct
    network once (engine.distinct_runs). Every run's step-0 row is still its own network's, in
    its place in the pack: the rows equal those of the same pack evaluated run by run."""
    seeds, wds = [2, 0, 2, 1, 0, 2], [0.0, 0.01, 0.03, 0.0, 0.1, 0.3]
    pack = [make(MLPConfig(width=16, depth=2), DigitsDataConfig(), seed=s, wd=w, steps=20, log_every=10)
            for s, w in zip(seeds, wds)]
    ds = data.load(pack[0].data)
    evaluated = []
    evaluate = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda model, params, *a: evaluated.append(len(next(iter(params.values()))))
                        or evaluate(model, params, *a))
    shared = engine.train_pack(pack, ds)
    assert evaluated[0] == len(set(seeds))             # step 0: one evaluation per distinct network
    monkeypatch.setattr(engine, "distinct_runs", lambda theta: None)
    alone = engine.train_pack(pack, ds)
    for got, want in zip(shared, alone):
        assert_same_run(got, want)
    first = {s: shared[seeds.index(s)].rows[0] for s in set(seeds)}
    assert len({first[s]["train_loss"] for s in first}) == len(first)            # the seeds' networks differ
    for s, run in zip(seeds, shared):
        assert run.rows[0] == first[s]


def test_distinct_runs_tells_networks_apart_by_their_bits():
    theta = {"w": torch.tensor([[0.0, 1.0], [-0.0, 1.0], [0.0, 1.0], [float("nan"), 2.0], [float("nan"), 2.0]]),
             "b": torch.tensor([[3.0], [3.0], [3.0], [4.0], [4.0]])}
    first, index = engine.distinct_runs(theta)
    groups = [int(first[i]) for i in index]             # each run → the first run holding its network
    assert groups == [0, 1, 0, 3, 3]                     # −0.0 is not +0.0; the same NaN is the same
    assert engine.distinct_runs({k: v[:3:2] for k, v in theta.items()}) is not None
    assert engine.distinct_runs({k: v[:2] for k, v in theta.items()}) is None      # all distinct: nothing to share


# ---------------------------------------------------------------------------------------------
# 5. the packed optimiser is torch.optim on each run


TORCH_OPTIMIZERS = {
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, weight_decay=c.weight_decay),
    "sgd-momentum": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, betas=tuple(c.betas), eps=c.eps, weight_decay=c.weight_decay),
}


@pytest.mark.parametrize("which", list(TORCH_OPTIMIZERS))
def test_packed_optimizer_matches_torch_optim(which):
    opt = "sgd" if which.startswith("sgd") else which
    lr = 0.05 if opt == "sgd" else 0.01
    model_cfg = MLPConfig(width=8, depth=1, activation="tanh", bias=True)
    data_cfg = TeacherDataConfig(teacher="mlp", dim=6, out_dim=2, n=100)
    cfg = make(model_cfg, data_cfg, seed=4, opt=opt, lr=lr, wd=0.1, momentum=0.9 if which == "sgd-momentum" else 0.0,
               steps=20, log_every=20)
    (outcome,) = engine.train_pack([cfg])

    ds = data.load(data_cfg)
    x, y = torch.as_tensor(ds.x), torch.as_tensor(ds.y)
    init = build(model_cfg, ds.in_dim, ds.out_dim).init_params([cfg.seed], CPU, torch.float64)
    names = ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    params = [torch.nn.Parameter(init[k][0, 0].detach().clone()) for k in names]     # run 0, member 0
    w0, b0, w1, b1 = params
    optimizer = TORCH_OPTIMIZERS[which](params, cfg.optim)
    for _ in range(cfg.train.steps):
        optimizer.zero_grad()
        out = torch.tanh(x @ w0.T + b0) @ w1.T + b1                                   # (n, 2)
        loss = 0.5 * (out - y).pow(2).sum(-1).mean()                                  # half-MSE (§1)
        loss.backward()
        optimizer.step()

    for k, p in zip(names, params):
        assert not torch.equal(p.detach(), init[k][0, 0].detach())                   # it did move
        torch.testing.assert_close(outcome.state[k], p.detach(), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# 6. per-step noise


def _noise_configs(**per_run):
    n = len(next(iter(per_run.values())))
    cfgs = []
    for i in range(n):
        c = Config(model=HadamardConfig(), data=TeacherDataConfig(), seed=100 + i)
        for key, values in per_run.items():
            setattr(c.noise, key, values[i])
        cfgs.append(validate(c))
    return cfgs


def test_langevin_noise_has_std_sqrt_2_lr_t_and_is_zero_at_t_zero():
    temperatures, lrs = [0.5, 0.0, 2.0, 1e-3], [0.1, 0.1, 1e-3, 0.3]
    cfgs = _noise_configs(temperature=temperatures)
    shapes = {"a": (300, 100), "b": (40_000,)}
    params = {k: torch.zeros(len(cfgs), *s, dtype=torch.float64) for k, s in shapes.items()}
    StepNoise(cfgs, CPU, torch.float64).langevin(params, torch.tensor(lrs, dtype=torch.float64), step=1)

    n = sum(math.prod(s) for s in shapes.values())
    for i, (t, lr) in enumerate(zip(temperatures, lrs)):
        xi = torch.cat([p[i].flatten() for p in params.values()])
        if t == 0:
            assert torch.count_nonzero(xi) == 0
            continue
        std = math.sqrt(2 * lr * t)
        # n = 70 000 draws: the sample std is within ~0.3% of σ, the mean within σ/√n ≈ 0.004σ.
        assert xi.std().item() == pytest.approx(std, rel=0.02)
        assert abs(xi.mean().item()) < 5 * std / math.sqrt(n)
        # Each parameter block gets the same scale (one draw per run covers all of them).
        assert params["a"][i].std().item() == pytest.approx(std, rel=0.02)

    # A run's noise comes from its own stream: the same draw when it is alone.
    alone = {k: torch.zeros(1, *s, dtype=torch.float64) for k, s in shapes.items()}
    StepNoise(cfgs[2:3], CPU, torch.float64).langevin(alone, torch.tensor(lrs[2:3], dtype=torch.float64), step=1)
    assert all(torch.equal(alone[k][0], params[k][2]) for k in shapes)


def test_label_noise_regression_std_and_classification_flips():
    b = 50_000
    cfgs = _noise_configs(label_std=[0.5, 0.0], label_flip=[0.0, 0.0])
    y = torch.zeros(b, 1, dtype=torch.float64)                       # shared targets (B, o)
    noisy = StepNoise(cfgs, CPU, torch.float64).labels(y, "regression", None, step=1)   # (R, B, o)
    assert noisy.shape == (2, b, 1)
    assert noisy[0].std().item() == pytest.approx(0.5, rel=0.02)
    assert torch.count_nonzero(noisy[1]) == 0

    cfgs = _noise_configs(label_std=[0.0, 0.0], label_flip=[0.3, 0.0])
    labels = torch.arange(b) % 10                                    # (B,)
    flipped = StepNoise(cfgs, CPU, torch.float64).labels(labels, "classification", 10, step=1)
    changed = flipped[0] != labels
    # A flip always goes to a *different* class, so the changed fraction is p itself (σ ≈ 0.002).
    assert changed.float().mean().item() == pytest.approx(0.3, abs=0.01)
    shift = (flipped[0][changed] - labels[changed]) % 10
    assert shift.min() >= 1 and torch.bincount(shift, minlength=10)[1:].min() > 0.8 * changed.sum() / 9
    assert torch.equal(flipped[1], labels)


@pytest.mark.parametrize("kind", ["regression", "classification", "langevin"])
def test_a_steps_noise_depends_on_the_run_and_the_step_only(kind):
    """Noise is drawn K steps at a time (symrun.training.noise.NoiseBlocks) from streams named by the block: the
    noise of step t is the same whether the steps before it were drawn or not (a resumed pack),
    whichever runs share the pack, and it changes from step to step, within and across blocks."""
    cfgs = _noise_configs(**({"temperature": [0.5, 0.0, 2.0]} if kind == "langevin" else
                             {"label_std": [0.5, 0.0, 1.0]} if kind == "regression" else
                             {"label_flip": [0.3, 0.0, 0.5]}))

    def draw(pack, step, noise=None):
        noise = noise or StepNoise(pack, CPU, torch.float64)
        if kind == "langevin":
            params = {"w": torch.zeros(len(pack), 30, 20, dtype=torch.float64)}
            noise.langevin(params, torch.full((len(pack),), 0.1, dtype=torch.float64), step)
            return params["w"]
        if kind == "regression":
            return noise.labels(torch.zeros(40, 2, dtype=torch.float64), "regression", None, step)
        return noise.labels(torch.arange(400) % 10, "classification", 10, step)

    through = StepNoise(cfgs, CPU, torch.float64)
    seen = {1: draw(cfgs, 1, through)}
    k = (through.langevin_blocks or through.label_blocks).k           # steps per block
    assert k > 2
    steps = [1, 2, k, k + 1, 3 * k + 5]
    seen.update({t: draw(cfgs, t, through) for t in range(2, steps[-1] + 1)})
    for t in steps:
        fresh = draw(cfgs, t)
        assert torch.equal(fresh, seen[t]), t                               # resumed at t
        assert torch.equal(draw(cfgs[2:], t)[0], seen[t][2]), t            # alone
        quiet = draw(cfgs[1:2], t)               # a pack that draws no noise keeps shared targets shared
        assert torch.equal(seen[t][1], quiet[0] if quiet.dim() == seen[t].dim() else quiet)   # untouched
    for a, b in zip(steps, steps[1:]):
        assert not torch.equal(seen[a][0], seen[b][0]) and not torch.equal(seen[a][0], seen[a][2]), (a, b)


def test_a_large_noise_block_filled_over_threads_equals_one_thread(monkeypatch):
    """Big CPU blocks (Langevin noise of every weight) are filled by several threads, each run's
    row from its own generator: the values are those one thread draws."""
    def block():
        return noise.NoiseBlocks(list(range(40)), "langevin", (30_000,), False, CPU, torch.float32)
    assert block().k * 40 * 30_000 >= 2**20                           # large enough to be threaded
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    threaded = [block().at(t) for t in (1, 3)]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    serial = [block().at(t) for t in (1, 3)]
    assert all(torch.equal(a, b) for a, b in zip(threaded, serial))


# ---------------------------------------------------------------------------------------------
# Symmetry removal: a fixed random offset b, θ_eff = θ + b, weight decay on θ (symmetry.remove)


def _hadamard(wd, offset_std, seed=0):
    c = Config(model=HadamardConfig(), data=TeacherDataConfig(), seed=seed)
    c.symmetry.remove, c.symmetry.remove_std = offset_std > 0, offset_std
    c.optim.lr, c.optim.weight_decay = 0.3, wd
    c.train.steps, c.train.log_every, c.train.dtype = 1500, 1500, "float64"
    return validate(c)


def test_offset_removes_the_sparsity_weight_decay_would_impose():
    (plain,), (offset,) = engine.train_pack([_hadamard(2.0, 0.0)]), engine.train_pack([_hadamard(2.0, 0.5)])
    assert plain.rows[-1]["sparsity"] == 1.0                 # λ = 2 > λ_max ≈ 0.95: every pair dead
    assert offset.rows[-1]["sparsity"] == 0.0                # with b the zero point is no longer a mirror's
    coefficients = offset.state["u"] * offset.state["w"]    # the saved θ + b: no coefficient is exactly 0
    assert coefficients.abs().min() > 1e-6                   # (a product of two N(0, σ²) draws may be small)
    assert (plain.state["u"] * plain.state["w"]).abs().max() < 1e-12
    # θ decays to 0 under strong weight decay, so the network ends at b: ‖θ + b‖ ≈ ‖b‖ ≈ σ_b √(2d)
    expected = 0.5 * (2 * 20) ** 0.5
    assert offset.rows[-1]["weight_norm"] == pytest.approx(expected, rel=0.3)
    assert offset.rows[0]["weight_norm"] != pytest.approx(plain.rows[0]["weight_norm"])


def test_offset_is_fixed_per_run_and_independent_of_the_pack():
    alone = engine.train_pack([_hadamard(0.1, 0.3, seed=5)])[0]
    packed = engine.train_pack([_hadamard(0.1, 0.3, seed=s) for s in (1, 5, 9)])[1]
    for key, value in alone.state.items():
        torch.testing.assert_close(packed.state[key], value, rtol=1e-9, atol=1e-12)


def test_a_pack_refuses_configs_that_differ_in_shape():
    with pytest.raises(ValueError, match="may differ only in"):
        engine.train_pack([_hadamard(0.1, 0.0), _hadamard(0.1, 0.5)])


def test_float32_run_without_momentum_is_unchanged_by_pack_mates_with_momentum():
    def cfg(seed, momentum):
        c = Config(model=MLPConfig(width=16), data=DigitsDataConfig(batch_size=32), seed=seed)
        c.optim.lr, c.optim.momentum = 0.05, momentum
        c.train.steps, c.train.log_every = 300, 300
        return validate(c)

    # Two packs of the same shape, whose only difference is the pack-mates' momentum: the
    # batched matmuls are then identical (BLAS may round differently for another pack size on
    # many threads), so any difference comes from the update. Two update formulas differ by
    # ~1e-6 in float32 after 300 steps: the run must take the same path whatever its mates do.
    plain = engine.train_pack([cfg(1, 0.0), cfg(4, 0.0), cfg(2, 0.0)])[1]
    mixed = engine.train_pack([cfg(1, 0.9), cfg(4, 0.0), cfg(2, 0.5)])[1]
    for key, value in plain.state.items():
        torch.testing.assert_close(mixed.state[key], value, rtol=0, atol=1e-7)


@pytest.mark.parametrize("members", [1, 3])
def test_evaluation_reuses_its_forward_features_and_measures_what_a_fresh_pass_does(members):
    """evaluate hands the penultimate features of its own forward passes to the metrics (neural
    collapse on the training set, representation on the probe); they must equal a fresh pass,
    and a non-finite run among them must leave its neighbours' values alone."""
    from symrun.analysis import metrics
    from symrun.sweeping import sweep

    model_args = ["model=mlp"] if members == 1 else ["model=ensemble", f"model.members={members}"]
    cfg = sweep.compose_one([*model_args, "data=digits", "model.width=12", "metrics.probe_size=100"])
    ds = data.load(cfg.data)
    x, y = torch.as_tensor(ds.x, dtype=torch.float32), torch.as_tensor(ds.y)
    xt, yt = torch.as_tensor(ds.x_test, dtype=torch.float32), torch.as_tensor(ds.y_test)
    probe = xt[:100]                       # what evaluate reads representations on (probe_inputs)
    assert torch.equal(engine.probe_inputs(x, xt, cfg), probe)
    model = build(cfg.model, ds.in_dim, ds.out_dim)
    params = {k: v.detach() for k, v in model.init_params([0, 1, 2], torch.device("cpu"), torch.float32).items()}
    row = engine.evaluate(model, params, cfg, "classification", x, y, xt, yt)
    fresh = metrics.measure(model, params, cfg.metrics, probe, (x, y, ds.out_dim))
    assert {"feature_rank", "dead_units", "nc1", "nc4"} <= set(fresh) if members == 1 else "nc1" not in fresh
    for k, v in fresh.items():
        torch.testing.assert_close(row[k], v, rtol=1e-5, atol=1e-6, msg=k)
    broken = {k: v.clone() for k, v in params.items()}
    broken["layers.0.weight"][1, 0, 0, 0] = float("nan")
    row_broken = engine.evaluate(model, broken, cfg, "classification", x, y, xt, yt)
    for k, v in fresh.items():
        assert math.isnan(row_broken[k][1]), k
        torch.testing.assert_close(row_broken[k][[0, 2]], v[[0, 2]], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("model_cfg", [HadamardConfig(), FactorizationConfig(hidden=6),
                                       FactorizationConfig(hidden=8, residual=True), MLPConfig(width=7, depth=2)],
                         ids=["hadamard", "factorization", "factorization-residual", "mlp"])
def test_a_shared_input_gives_what_the_same_input_given_to_each_run_gives(model_cfg):
    """Full batch, the input is shared, (B, d), and the models take it in one GEMM for every run;
    per-run minibatches, (R, B, d), go through batched GEMMs. Outputs and gradients must agree."""
    model = build(model_cfg, 8, 1 if isinstance(model_cfg, HadamardConfig) else 3)
    params = model.init_params([0, 1, 2, 3], CPU, torch.float64)
    x = torch.randn(11, 8, dtype=torch.float64)
    shared, each = model.forward(params, x), model.forward(params, x.expand(4, 11, 8))
    assert shared.shape == each.shape == (4, 11, model.forward(params, x[:1]).shape[-1])
    torch.testing.assert_close(shared, each, rtol=1e-12, atol=1e-14)
    for a, b in zip(torch.autograd.grad(shared.pow(2).sum(), list(params.values())),
                    torch.autograd.grad(each.pow(2).sum(), list(params.values()))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 2.5e-7), (torch.float64, 5e-16)])
def test_cpu_tanh_is_torch_tanh_to_an_ulp_with_first_and_second_derivatives(dtype, bound):
    """symrun.models.nets.mlp.tanh (numpy's SIMD kernel on CPU) against the exact value, near 0 included, and its
    gradient and Hessian-vector product against torch.tanh's (symrun.analysis.critical and symrun check
    differentiate twice through it)."""
    from symrun.models.nets.mlp import tanh

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g, dtype=dtype) * 4, torch.logspace(-30, -1, 300, dtype=dtype),
                   -torch.logspace(-30, 1.5, 300, dtype=dtype), torch.tensor([0.0, 20.0, -40.0], dtype=dtype)])
    exact = torch.tanh(x.double())
    rel = (tanh(x).double() - exact).abs() / exact.abs().clamp_min(1e-300)
    assert rel.max() <= bound
    v = torch.randn(x.shape, generator=g, dtype=dtype)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    (d_ours,) = torch.autograd.grad(tanh(ours), ours, v, create_graph=True)
    (d_ref,) = torch.autograd.grad(torch.tanh(ref), ref, v, create_graph=True)
    # 1 − y² cancels where |y| → 1: an ulp of y is an absolute error of ~2 ulp(1)·|v| in v(1 − y²)
    scale = v.abs().max().item()
    torch.testing.assert_close(d_ours, d_ref, rtol=4 * bound, atol=4 * bound * scale)
    (h_ours,) = torch.autograd.grad(d_ours, ours, v)
    (h_ref,) = torch.autograd.grad(d_ref, ref, v)
    torch.testing.assert_close(h_ours, h_ref, rtol=8 * bound, atol=8 * bound * scale**2)
    assert torch.autograd.gradgradcheck(tanh, (torch.randn(6, dtype=torch.float64, requires_grad=True),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_matmul_through_numpy_is_torch_matmul_with_first_and_second_derivatives(dtype, monkeypatch):
    """symrun.models.nets.cpu.matmul inside one_thread_blas (numpy's BLAS, one thread) against
    torch.matmul: the product, strided and expanded operands included, its gradients and a
    Hessian-vector product through it; numpy's BLAS is on one thread inside and as before after.
    The numpy route is the one a CPU not made by Intel takes; here it is taken on any CPU."""
    from threadpoolctl import threadpool_info

    from symrun.models.nets import cpu

    monkeypatch.setattr(cpu, "NUMPY_ROUTE", True)

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 1, 7, 4, generator=g, dtype=dtype)
    b = torch.randn(5, 6, 4, generator=g, dtype=dtype).mT.unsqueeze(1)          # a transposed view, as _layer_t's
    wide = torch.randn(5, 4, 6, generator=g, dtype=dtype).unsqueeze(1).expand(5, 3, 4, 6)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-13}
    before, threads = blas_threads(), torch.get_num_threads()
    torch.set_num_threads(1)
    calls = []
    apply = cpu._NumpyMatmul.apply
    try:
        with cpu.one_thread_blas():
            assert set(blas_threads()) <= {1}
            cpu._NumpyMatmul.apply = lambda x, y: calls.append(1) or apply(x, y)
            torch.testing.assert_close(cpu.matmul(a, b), torch.matmul(a, b), **tol)
            torch.testing.assert_close(cpu.matmul(a.expand(5, 3, 7, 4), wide), torch.matmul(a.expand(5, 3, 7, 4), wide), **tol)
            a_t = torch.randn(5, 1, 4, 7, generator=g, dtype=dtype).mT                 # the other operand transposed,
            torch.testing.assert_close(cpu.matmul(a_t, b.contiguous()), torch.matmul(a_t, b), **tol)   # the larger: (bᵀaᵀ)ᵀ
            torch.testing.assert_close(cpu.matmul(a_t, b), torch.matmul(a_t, b), **tol)    # both: a product of transposes
            torch.testing.assert_close(cpu.matmul(a[0, 0], b[0, 0]), torch.matmul(a[0, 0], b[0, 0]), **tol)   # matrices
            assert len(calls) == 5                        # all went through numpy
            # a hand-written backward's products; the last as an output layer's weight gradient, a few
            # outputs' δ by the transposed activations: (bᵀaᵀ)ᵀ, its result copied row by row
            delta, h = torch.randn(5, 1, 2, 7, generator=g, dtype=dtype), torch.randn(5, 1, 9, 7, generator=g, dtype=dtype)
            for p, q in [(a, b), (a_t, b.contiguous()), (a.contiguous(), b), (delta, h.mT)]:
                rows = cpu.matmul_rows(p, q)
                assert rows.is_contiguous()
                torch.testing.assert_close(rows, torch.matmul(p, q), **tol)
            x, w = a.clone().requires_grad_(), b.clone().requires_grad_()
            v = torch.randn(5, 1, 7, 6, generator=g, dtype=dtype)
            loss = lambda f: (f(x, w).tanh() * v).sum()   # noqa: E731 — curved, so the Hessian is not zero
            d_ours = torch.autograd.grad(loss(cpu.matmul), (x, w), create_graph=True)
            d_ref = torch.autograd.grad(loss(torch.matmul), (x, w), create_graph=True)
            for ours, ref in zip(d_ours, d_ref):
                torch.testing.assert_close(ours, ref, **tol)
            h_ours = torch.autograd.grad(sum((d * d).sum() for d in d_ours), (x, w))
            h_ref = torch.autograd.grad(sum((d * d).sum() for d in d_ref), (x, w))
            for ours, ref in zip(h_ours, h_ref):                # float32: two products' rounding, compounded
                torch.testing.assert_close(ours, ref, **({k: 10 * t for k, t in tol.items()} if dtype == torch.float32 else tol))
            if dtype == torch.float64:
                assert torch.autograd.gradgradcheck(cpu.matmul, (x.detach().requires_grad_(), w.detach().requires_grad_()))
            assert len(calls) > 10                        # the derivatives went through numpy too
    finally:
        cpu._NumpyMatmul.apply = apply
        torch.set_num_threads(threads)
    assert blas_threads() == before
    calls.clear()
    assert torch.equal(cpu.matmul(a, b), torch.matmul(a, b)) and not calls   # outside: torch.matmul itself


def test_sgd_step_with_gradients_that_share_storage_updates_each_parameter_from_the_same_gradient():
    """Autograd hands the same buffer to both inputs of an add: the decay of one parameter must not
    be written into the gradient the other one reads (the in-place shortcut is for owned buffers)."""
    from symrun.config import OptimConfig
    from symrun.training.optim import PackedOptimizer

    a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
    lr, wd = torch.tensor([0.1, 0.2]), torch.tensor([0.5, 1.0])
    shared = torch.full((2, 3), 3.0)
    opt = PackedOptimizer(OptimConfig(name="sgd"), {"a": a, "b": b}, lr, wd, torch.zeros(2))
    opt.step({"a": a, "b": b}, {"a": shared, "b": shared}, torch.ones(2, dtype=torch.bool))
    for p, start in ((a, 1.0), (b, 2.0)):
        expected = start - lr[:, None] * (3.0 + wd[:, None] * start)
        torch.testing.assert_close(p, expected.expand(2, 3))
    assert torch.equal(shared, torch.full((2, 3), 3.0))
    before = {"a": a.clone(), "b": b.clone()}                # separate buffers (the in-place path): same rule
    opt.step({"a": a, "b": b}, {"a": torch.full((2, 3), 3.0), "b": torch.full((2, 3), 3.0)},
             torch.ones(2, dtype=torch.bool))
    for k, p in (("a", a), ("b", b)):
        torch.testing.assert_close(p, before[k] - lr[:, None] * (3.0 + wd[:, None] * before[k]))
