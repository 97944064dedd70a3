"""How many runs fit in memory at once: a pack's size and the passes of the end-of-run λ_c.

Both are read off autograd itself, from the bytes a pass saves for its backward. The budgets are
fixed numbers, not the free memory of the machine at hand: a sweep's packs (and the checkpoint
names that hash them) must come out the same on every machine that plans or resumes it.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import torch

from symrun import models
from symrun.training import reparam
from symrun.training.loss import loss_per_run
from symrun.training.noise import NOISE_BLOCK, NOISE_STEPS
from symrun.config import Config, to_dict

PACK_BYTES = 2 * 2**30     # one pack's training: every run's state and one step's graph
PASS_BYTES = 512 * 2**20   # one batched Hessian pass of λ_c (symrun.analysis.critical), all its virtual runs
FALLBACK_PACK = 256        # runs per pack when a model's step cannot be measured


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves for backward while `fn()` runs (each storage once:
    views of one tensor, e.g. a shared input broadcast to every run, are counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def per_run_bytes(step: Callable[[int], Any]) -> int:
    """What one more run adds to the graph `step(runs)` builds: saved bytes at 2 runs minus at 1,
    so what every run shares (the data, a shared input) is not charged per run."""
    return max(1, saved_bytes(lambda: step(2)) - saved_bytes(lambda: step(1)))


def pack_size(cfg: Config) -> int:
    """Runs per pack for the configs of `cfg`'s shape: `cfg.pack_size` when the user set one, else
    as many as PACK_BYTES holds (`run_bytes`). resnet18 trains each run alone: 1."""
    if cfg.pack_size is not None:
        return cfg.pack_size
    if not models.spec(cfg.model.name).packs:
        return 1
    try:
        return max(1, PACK_BYTES // run_bytes(cfg))
    except Exception:  # noqa: BLE001 — sizing is an estimate: a model that cannot take the probe
        return FALLBACK_PACK  # step fails in its own pack, where the failure is recorded per run


def run_bytes(cfg: Config) -> int:
    """What one run of a pack holds while it trains: its parameters with their gradient, two
    optimiser buffers and the update's temporary (5 copies); its blocks of label and Langevin
    noise (engine.NoiseBlocks: K steps at a time); and twice what a training step saves for its
    backward, measured on the model itself (the backward pass allocates about as much again)."""

    x, y, task, in_dim, out_dim = _probe_batch(json.dumps(to_dict(cfg)["data"], sort_keys=True, default=str), cfg.data)
    dtype = getattr(torch, cfg.train.dtype)
    model = models.build(cfg.model, in_dim, out_dim)
    rp = reparam.build(cfg, model)
    shared = cfg.data.batch_size is None or cfg.data.batch_size >= len(x)
    xs, ys = x.to(dtype), (y if task == "classification" else y.to(dtype))

    def step(runs: int):
        raw = rp.init_params(list(range(runs)), torch.device("cpu"), dtype)
        # a minibatch is gathered per run (R, B, d); a full batch is one input every run shares
        xb = xs if shared else xs.expand(runs, *xs.shape).clone()
        loss = loss_per_run(model.forward(rp.network(raw), xb), ys, task)
        return torch.autograd.grad(loss.sum(), list(raw.values()))

    params = sum(math.prod(s) for s in rp.raw_shapes().values())
    label = (2 if task == "classification" else 1) * ys.numel()       # a step's draws, per run
    noise = sum(max(1, min(NOISE_STEPS, NOISE_BLOCK // n)) * n for n in (label, params))   # K·n, as NoiseBlocks
    return (5 * params + noise) * (torch.finfo(dtype).bits // 8) + 2 * per_run_bytes(step)


_PROBES: dict[str, tuple] = {}


def _probe_batch(key: str, cfg) -> tuple:
    """(x, y, task, in_dim, out_dim): one training batch of the data `cfg` describes (all of it
    for full-batch GD), as torch tensors; kept per distinct data config (`key`, its JSON)."""
    from symrun import data as data_mod     # loading data imports this package's budget

    if key not in _PROBES:
        ds = data_mod.load(cfg)
        b = len(ds.x) if cfg.batch_size is None else min(cfg.batch_size, len(ds.x))
        _PROBES[key] = (torch.as_tensor(ds.x[:b]), torch.as_tensor(ds.y[:b]), ds.task, ds.in_dim, ds.out_dim)
    return _PROBES[key]
