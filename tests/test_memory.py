"""symrun.training.memory: what autograd saves, counted by storage; pack sizes; the estimate
that refuses, before any work, a pack that cannot fit."""

import math

import pytest
import torch

from symrun.training import memory, reparam


def test_saved_bytes_counts_what_backward_keeps_once_per_storage():
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    assert memory.saved_bytes(lambda: torch.tanh(x)) == 8000              # tanh keeps its output
    assert memory.saved_bytes(lambda: x * x) == 8000                      # x twice: one storage
    w = torch.randn(3, 1000, dtype=torch.float64, requires_grad=True)
    assert memory.saved_bytes(lambda: w * x.expand(3, 1000)) == 8000 + 24000   # a broadcast view once
    with torch.no_grad():
        assert memory.saved_bytes(lambda: torch.tanh(x)) == 0


def test_run_bytes_grow_linearly_with_the_batch():
    from symrun.bench import w1

    sizes = []
    for b in (16, 32, 48):
        cfg = w1(1, 10, "cpu").configs[0]
        cfg.data.batch_size = b
        sizes.append(memory.run_bytes(cfg))
    assert sizes[0] < sizes[1] < sizes[2]
    assert sizes[2] - sizes[1] == sizes[1] - sizes[0]            # activations per example, per run


def test_pack_size_is_the_users_cap_or_what_the_budget_holds(tmp_path, monkeypatch):
    from symrun.sweeping import sweep

    grid = ["model=mlp", "data=digits", "data.batch_size=64", "seed=range(0,8)"]
    assert sorted(len(p) for p in sweep.plan([*grid, "pack_size=3"], tmp_path / "a").packs) == [2, 3, 3]
    assert [len(p) for p in sweep.plan(grid, tmp_path / "b").packs] == [8]          # null: all fit
    one = memory.run_bytes(next(iter(sweep.plan(grid, tmp_path / "c").configs.values())))
    monkeypatch.setattr(memory, "PACK_BYTES", 3 * one + 1)
    assert sorted(len(p) for p in sweep.plan(grid, tmp_path / "d").packs) == [2, 3, 3]


def test_a_model_whose_step_cannot_be_measured_gets_the_fallback_pack(monkeypatch):
    from symrun.bench import w1

    cfg = w1(1, 10, "cpu").configs[0]

    def broken(*args, **kwargs):
        raise RuntimeError("a forward pass that fails")

    monkeypatch.setattr(memory, "run_bytes", broken)
    assert memory.pack_size(cfg) == memory.FALLBACK_PACK
    cfg.pack_size = 7
    assert memory.pack_size(cfg) == 7


@pytest.mark.parametrize("preset", ["rescaling_sparsity", "dead_neurons", "rotation_low_rank", "neural_collapse", "dcs",
                                    "permutation_homogeneity", "attention_rank", "transformer_rank"])
def test_the_estimate_before_allocating_is_within_a_small_factor_of_the_measured_step(preset, tmp_path, monkeypatch):
    """One estimate, two ways to count a step's activations: the refusal's width approximation
    (nothing allocated) against what a real step of the model saves (which sizes packs). For
    layered nets they agree to a small factor, so a pack the sizing accepts is not refused."""
    from symrun.sweeping import sweep

    cfg = next(iter(sweep.plan([f"experiment={preset}"], tmp_path / "s").configs.values()))
    ds, model = sweep.build(cfg)
    params = sum(math.prod(s) for s in reparam.build(cfg, model).raw_shapes().values())
    dtype_bytes = torch.finfo(getattr(torch, cfg.train.dtype)).bits // 8
    # one more run's share of the refusal's estimate, less what lives outside the training step
    monkeypatch.setattr(memory, "EVAL_BYTES", 0)                 # the evaluation pass: one example, shared
    approx = (memory._pack_need(cfg, ds, model, 2) - memory._pack_need(cfg, ds, model, 1)
              - memory.KEPT_COPIES * params * dtype_bytes)
    assert 0.5 <= approx / memory.run_bytes(cfg) <= 3


@pytest.mark.parametrize("depth, members", [(1, 1), (2, 1), (2, 3)])
def test_the_mlps_declared_width_is_what_the_same_network_as_torch_modules_produces(depth, members):
    """One evaluation budget, one count of activations: the built-in MLP's `example_width`
    equals the width measured on the same network written as nn.Sequential (members side by side)."""
    from symrun import models
    from symrun.models.mlp import EnsembleConfig, MLPConfig
    from symrun.models.nets.base import module_width

    cfg = EnsembleConfig(width=7, depth=depth, members=members) if members > 1 else MLPConfig(width=7, depth=depth)
    sizes = [5] + [7] * depth + [3]
    layers = []
    for l, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [torch.nn.Linear(a, b)] + ([torch.nn.Tanh()] if l < depth else [])
    one = module_width(torch.nn.Sequential(*layers), torch.zeros(1, 5))
    assert models.build(cfg, 5, 3).example_width() == 5 + members * (one - 5)


def test_an_evaluation_budget_bounds_every_chunk_and_a_tiny_one_still_evaluates():
    assert memory.eval_items(1) * 8 * memory.EVAL_COPIES <= memory.EVAL_BYTES
    assert memory.eval_items(10**12) == 1                      # a huge example: one at a time, never none
