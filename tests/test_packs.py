"""How much a run's numbers depend on the size of its pack: only through float rounding, within
the tolerance README's "Pack size" states.

Each run draws from its own streams, so the same run takes the same steps in any pack; but BLAS
picks its blocking, and so its summation order, by a matrix product's shape, and a pack of R runs
multiplies (R, …) stacks. Bit-for-bit equality would need one product per run (the packed
engine's speed-up gone), so it is not promised; this tolerance is, for packs of 1, 2 and 3 runs
against the same runs in a pack of 4, in float32 and float64. (A resumed or requeued pack is
trained again as it was, so those are bit for bit: tests/test_resume.py.)"""


import numpy as np
import pytest

from conftest import assert_a_seed_starts_its_runs_alike
from symrun import models
from symrun.config import HadamardConfig, MLPConfig
from symrun.training import engine
from symrun.sweeping import sweep

# |a − b| ≤ RTOL·|b| + ATOL, for every logged metric and every final parameter (README "Pack size")
TOLERANCE = {"float32": (1e-5, 1e-6), "float64": (1e-12, 1e-14)}

WORKLOADS = {   # the critical weight decay (the costly Hessian at a run's end) is measured on hadamard
    "hadamard-full-batch": ["model=hadamard", "optim.weight_decay=0.01,0.03,0.1,0.3"],
    "mlp-digits-minibatch-label-flips": ["model=mlp", "data=digits", "model.width=16", "data.batch_size=64",
                                         "optim.weight_decay=0,1e-4,1e-3,1e-2", "noise.label_flip=0.1",
                                         "metrics.critical_mirrors=0"],
    "factorization-label-noise": ["model=factorization", "data.teacher=low_rank", "data.out_dim=8", "data.batch_size=50",
                                  "optim.weight_decay=0,0.05,0.1,0.2", "noise.label_std=0.1", "metrics.critical_mirrors=0"],
}


def _configs(args, where):
    """The grid's run configs as `symrun sweep` plans them (nothing is written)."""
    return list(sweep.plan(args, sweep_dir=where / "sweep").configs.values())


@pytest.mark.parametrize("dtype", sorted(TOLERANCE))
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_packs_of_other_sizes_agree_within_the_stated_tolerance(workload, dtype, tmp_path):
    cfgs = _configs([*WORKLOADS[workload], "train.steps=150", "train.log_every=50", f"train.dtype={dtype}",
                     "device=cpu"], tmp_path)
    whole = engine.train_pack(cfgs)
    rtol, atol = TOLERANCE[dtype]
    for size in (1, 2, 3):
        parts = [o for i in range(0, len(cfgs), size) for o in engine.train_pack(cfgs[i:i + size])]
        for got, want in zip(parts, whole):
            assert got.status == want.status == "finished"
            assert [r["step"] for r in got.rows] == [r["step"] for r in want.rows]
            for a, b in zip(got.rows, want.rows):
                assert a.keys() == b.keys()
                for k in a:
                    np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{k}, pack of {size}")
            for k in want.state:
                np.testing.assert_allclose(got.state[k].double().numpy(), want.state[k].double().numpy(), rtol=rtol,
                                           atol=atol, err_msg=f"parameter {k}, pack of {size}")


def test_a_pack_is_checked_as_its_pack_keys_would(tmp_path):
    """engine.one_pack (fields a config shares with the first by identity skipped) answers what
    comparing every config's pack_key answers: on a plan's configs, and with a config that
    differs in a model setting, a training setting, a per-run setting, the model, a user
    module's argument (1 against 1.0), and a non-packing model's seed."""
    import dataclasses

    from symrun.models.module import ModuleConfig
    from symrun.models.resnet import ResNetConfig

    plan = sweep.plan(["model=mlp", "data=digits", "optim.weight_decay=0,0.1", "seed=0,1", "model.width=8"], tmp_path)
    cfgs = list(plan.configs.values())
    first = cfgs[0]
    replaced = lambda cfg, part, **kw: dataclasses.replace(cfg, **{part: dataclasses.replace(getattr(cfg, part), **kw)})  # noqa: E731
    module = dataclasses.replace(first, model=ModuleConfig(target="m.M", args={"h": 1}))
    resnet = dataclasses.replace(first, model=ResNetConfig())
    cases = {"the plan": cfgs,
             "a model setting": [*cfgs, replaced(first, "model", width=9)],
             "a training setting": [*cfgs, replaced(first, "train", steps=first.train.steps + 1)],
             "a per-run setting": [*cfgs, replaced(first, "optim", lr=0.5)],
             "another model": [*cfgs, module],
             "1 against 1.0": [module, dataclasses.replace(module, model=ModuleConfig(target="m.M", args={"h": 1.0}))],
             "a module's seeds": [module, dataclasses.replace(module, seed=5)],
             "a non-packing model's seeds": [resnet, dataclasses.replace(resnet, seed=5)]}
    answers = {name: engine.one_pack(c) for name, c in cases.items()}
    assert answers == {name: len({engine.pack_key(c) for c in cfgs_}) == 1 for name, cfgs_ in cases.items()}
    assert answers == {"the plan": True, "a model setting": False, "a training setting": False, "a per-run setting": True,
                       "another model": False, "1 against 1.0": False, "a module's seeds": True,
                       "a non-packing model's seeds": False}
    with pytest.raises(ValueError, match="may differ only in"):
        engine.train_pack(cases["a model setting"])


@pytest.mark.parametrize("model_cfg", [MLPConfig(width=6), HadamardConfig()], ids=["mlp", "hadamard"])
def test_runs_of_a_seed_start_alike_each_in_its_own_memory(model_cfg):
    """A seed's initialisation is drawn once for all its runs (a grid over weight decay repeats
    each seed)."""
    assert_a_seed_starts_its_runs_alike(models.build(model_cfg, 5, 1))
