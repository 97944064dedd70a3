"""Learning-rate schedules (optim.schedule, docs/theory.md §1): each step's lr against its
formula, through the engine, per run within one pack."""

import math
from pathlib import Path

import pytest
import torch

from symrun.sweeping import sweep
from symrun.training import engine, optim
from symrun.config import ConfigError, OptimConfig


def test_the_lr_of_each_step_is_its_formula():
    T = 10
    step = OptimConfig(lr=0.4, schedule="step", milestones=[3, 6], gamma=0.5, warmup=2)
    # warm-up t/2 for t ≤ 2; ×0.5 after step 3 and again after step 6
    assert [optim.lr_at(step, t, T) for t in range(1, T + 1)] == pytest.approx(
        [0.2, 0.4, 0.4, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.1])
    cosine = OptimConfig(lr=1.0, schedule="cosine", lr_min=0.1, warmup=0)
    expected = [0.1 + 0.9 * (1 + math.cos(math.pi * t / T)) / 2 for t in range(1, T + 1)]
    assert [optim.lr_at(cosine, t, T) for t in range(1, T + 1)] == pytest.approx(expected)
    assert optim.lr_at(cosine, T, T) == pytest.approx(0.1)
    warm = OptimConfig(lr=1.0, schedule="cosine", warmup=4)
    # warm-up to step 4, then the cosine over the 6 steps left: t = 4 is its start (factor 1)
    assert [optim.lr_at(warm, t, T) for t in (1, 2, 4, 7, 10)] == pytest.approx(
        [0.25, 0.5, 1.0, (1 + math.cos(math.pi * 3 / 6)) / 2, 0.0])
    assert [optim.lr_at(OptimConfig(lr=0.3), t, T) for t in (1, 5, 10)] == [0.3, 0.3, 0.3]


def test_the_engine_steps_each_run_at_its_own_schedule(monkeypatch):
    args = ["model=hadamard", "optim.schedule=constant,step,cosine", "optim.lr=0.1,0.2", "optim.warmup=3",
            "optim.milestones=[5]", "optim.gamma=0.1", "optim.lr_min=0.01", "train.steps=12", "train.log_every=4"]
    plan = sweep.plan(args, Path("unused"))
    assert len(plan.packs) == 1                      # schedules are per-run settings: one batched model
    cfgs = list(plan.configs.values())
    seen = []
    real = optim.PackedOptimizer.advance

    def advance(self, params):             # once a step, after the step's lr is set
        seen.append(self.lr.clone())
        return real(self, params)

    monkeypatch.setattr(optim.PackedOptimizer, "advance", advance)
    engine.train_pack(cfgs)
    got = torch.stack(seen)                                                # (steps, R)
    want = torch.tensor([[optim.lr_at(c.optim, t, 12) for c in cfgs] for t in range(1, 13)], dtype=got.dtype)
    assert got.shape == (12, 6) and torch.allclose(got, want, rtol=1e-6, atol=0)
    drop = [i for i, c in enumerate(cfgs) if c.optim.schedule == "step"]
    assert all(float(got[5, i]) == pytest.approx(0.1 * float(got[4, i])) for i in drop)   # step 6: dropped


@pytest.mark.parametrize("override, words", [
    ("optim.schedule=exponential", "optim.schedule must be one of constant, step, cosine"),
    ("optim.warmup=-1", "optim.warmup must be >= 0"),
    ("optim.gamma=0", "optim.gamma must be > 0"),
    ("optim.milestones=[0]", "optim.milestones steps >= 1"),
    ("optim.lr_min=-0.1", "optim.lr_min must be a number >= 0"),
])
def test_bad_schedules_are_refused(override, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[")):
        sweep.plan(["model=hadamard", override], Path("unused"))


def test_a_sweep_over_schedules_trains_each_run_at_its_own(cli, tmp_path):
    """Schedules are per-run settings: runs with different ones share a pack, and the pack job
    reads each run's back (a word among numbers) from the command line."""
    from conftest import sweep_dirs
    from symrun.sweeping import results

    cli("sweep", "--outputs", "out", "model=hadamard", "train.steps=20", "train.log_every=10",
        "optim.schedule=constant,cosine", "optim.lr_min=0.01", "optim.weight_decay=0,0.1")
    (folder,) = sweep_dirs(tmp_path / "out")
    runs = results.read_csv(folder / "runs.csv")
    assert len(runs) == 4 and (runs["status"] == "finished").all() and runs["pack"].nunique() == 1
    assert sorted(runs["optim.schedule"]) == ["constant", "constant", "cosine", "cosine"]
    final = runs.set_index(["optim.schedule", "optim.weight_decay"])["train_loss"]
    assert final[("constant", 0.1)] != final[("cosine", 0.1)]      # the two schedules trained differently
