"""Memory: one estimate of what a pack needs, used to size packs and to refuse, before any work,
what cannot fit on the machine at hand.

A run of a pack holds, while it trains (`run_bytes`):
- its parameters ρ with their gradient, two optimiser buffers and the update's temporary (5 copies);
- its blocks of label and Langevin noise (symrun.training.noise.NoiseBlocks: K steps at a time);
- the activations a training step keeps: twice what autograd saves for backward (the backward
  pass allocates about as much again), *measured* on the model itself (`per_run_bytes`), or,
  before anything may be allocated, approximated by 2 × batch × the activations one example
  produces (the model's `example_width`: about what autograd saves).
Outside the step it also keeps 3 more copies (the last logged row, the composed θ, a
checkpoint), and the pack shares the data, an evaluation pass and neural collapse's class-by-class
matrices (`pack_bytes`).

**One evaluation budget.** Whatever runs without training — the metric passes of a log step
(symrun.training.engine), a real network's forward over a whole training set in chunks of examples
(symrun.models.nets.base.in_chunks), a batched Hessian pass of λ_c (symrun.analysis.critical) —
holds at most EVAL_BYTES at a time: each splits its runs or examples into chunks from the
bytes one (run, example) needs (`eval_items`), or one run's Hessian graph. Chunks change how
much is computed at once, never a run's numbers: runs and examples are independent there.

Two uses, one estimate:
- **pack size** (`pack_size`): runs per pack = PACK_BYTES // the measured `run_bytes`. PACK_BYTES is
  a fixed number, not the free memory of the machine at hand: a sweep's packs (and the checkpoint
  names that hash them) must come out the same on every machine that plans or resumes it.
- **refusal** (`check_pack`, `check`): a mistyped size (data.dim=1000000000) or a pack too large
  for the machine is one `error:` line before any work, not minutes of swapping ended by the
  kernel's out-of-memory killer. Here the step's activations are the width approximation, so
  nothing is allocated; the estimate is right to within a small factor: it refuses what cannot
  fit, not what barely might.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from symrun.config import Config, ConfigError, to_dict

if TYPE_CHECKING:       # torch is imported where a function needs it: a data file's check needs none
    import torch

GIB = 2**30
PACK_BYTES = 2 * 2**30     # one pack's training: every run's state and one step's graph
EVAL_BYTES = 512 * 2**20   # one evaluation pass: a log step's metrics, a chunked forward, a Hessian pass of λ_c
EVAL_COPIES = 4            # an evaluation keeps an example's activations about four times over, in float64
FALLBACK_PACK = 256        # runs per pack when a model's step cannot be measured
STATE_COPIES = 5           # ρ, its gradient, two optimiser buffers, the update's temporary
KEPT_COPIES = 3            # outside the step: the last logged row, the composed θ, a checkpoint


class BudgetError(ConfigError):
    """More memory than the machine has; the message is one line."""


# -- what the machine has ---------------------------------------------------------------------

def available(device: torch.device | str = "cpu") -> int:
    """Bytes that can still be allocated: free CUDA memory on a GPU; else the kernel's
    MemAvailable, or less under a cgroup memory limit (a container, a SLURM job)."""
    if _kind(device) == "cuda":
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit, used = (Path("/sys/fs/cgroup", f).read_text().strip() for f in ("memory.max", "memory.current"))
        if limit != "max":
            free = min(free, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return free


def check(need: float, what: str, hint: str, device: torch.device | str = "cpu") -> None:
    """Refuse, with one line, a need of `need` bytes beyond what is available on `device`."""
    free = available(device)
    if need > free:
        raise BudgetError(f"{what} would need about {need / GIB:.3g} GiB of memory, more than the "
                          f"{free / GIB:.3g} GiB available on {_kind(device)}; {hint}")


def _kind(device: torch.device | str) -> str:
    """'cpu' or 'cuda' (torch.device(device).type, without importing torch for a string)."""
    return device.split(":")[0] if isinstance(device, str) else device.type


# -- the estimate -----------------------------------------------------------------------------

def state_bytes(raw_shapes: dict[str, tuple[int, ...]], label_draws: int, dtype_bytes: int) -> int:
    """One run's optimiser state and noise blocks: STATE_COPIES × its parameters (ρ's shapes,
    `raw_shapes`), plus K·n values per noise block as NoiseBlocks draws them (n = `label_draws`
    for label noise, the parameters for Langevin noise)."""
    from symrun.training.noise import NOISE_BLOCK, NOISE_STEPS

    params = sum(math.prod(s) for s in raw_shapes.values())
    noise = sum(max(1, min(NOISE_STEPS, NOISE_BLOCK // n)) * n for n in (label_draws, params))
    return (STATE_COPIES * params + noise) * dtype_bytes


def eval_items(width: int) -> int:
    """(run, example) pairs one evaluation pass holds within EVAL_BYTES, each example `width`
    activations kept EVAL_COPIES times in float64."""
    return max(1, EVAL_BYTES // (max(1, width) * 8 * EVAL_COPIES))


def pack_bytes(runs: int, per_run: float, params: int, width: int, examples: int, in_dim: int, classes: int,
               dtype_bytes: int) -> float:
    """A pack's peak: `runs` × (`per_run`, what a run's training step holds, plus KEPT_COPIES of
    its `params`), plus what the runs share: the data (and a copy), an evaluation pass (at most
    EVAL_BYTES; less when all its runs × examples, each `width` activations, take less) and
    neural collapse's class × class matrices in float64."""
    evaluation = min(eval_items(width), runs * examples) * width * 8 * EVAL_COPIES
    collapse = 6 * classes**2 * 8 + runs * classes * width * 8
    data = examples * in_dim * dtype_bytes * 2
    return runs * (per_run + KEPT_COPIES * params * dtype_bytes) + evaluation + collapse + data


def check_pack(cfg: Config, ds, model, runs: int, device: torch.device) -> None:
    """Refuse a pack of `runs` runs of `cfg` (its data `ds`, its packed `model`) that cannot fit."""
    check(_pack_need(cfg, ds, model, runs), f"a pack of {runs} run(s) of model={cfg.model.name}",
          "lower pack_size (more, smaller packs) or the model's or the data's size", device)


def fits(cfg: Config, ds, model, runs: int, device: torch.device) -> bool:
    """Whether a pack of `runs` runs fits, by the estimate `check_pack` refuses with."""
    return _pack_need(cfg, ds, model, runs) <= available(device)


def _pack_need(cfg: Config, ds, model, runs: int) -> float:
    """The estimate with the step's activations approximated, so that nothing is allocated."""
    import torch

    from symrun.training import reparam

    raw = reparam.build(cfg, model).raw_shapes()
    dtype_bytes = torch.finfo(getattr(torch, cfg.train.dtype)).bits // 8
    batch = cfg.data.batch_size or len(ds.x)
    label = (2 if ds.task == "classification" else 1) * batch * (1 if ds.task == "classification" else ds.out_dim)
    width = model.example_width()
    per_run = state_bytes(raw, label, dtype_bytes) + 2 * batch * width * dtype_bytes
    examples = len(ds.x) + (0 if ds.x_test is None else len(ds.x_test))
    return pack_bytes(runs, per_run, sum(math.prod(s) for s in raw.values()), width, examples, ds.in_dim,
                      ds.n_classes or 0, dtype_bytes)


# -- the measured step, for pack sizes --------------------------------------------------------

def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves for backward while `fn()` runs (each storage once:
    views of one tensor, e.g. a shared input broadcast to every run, are counted once)."""
    import torch

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
    from symrun import models

    if cfg.pack_size is not None:
        return cfg.pack_size
    if not models.spec(cfg.model.name).packs:
        return 1
    try:
        return max(1, PACK_BYTES // run_bytes(cfg))
    except Exception:  # noqa: BLE001 — sizing is an estimate: a model that cannot take the probe
        return FALLBACK_PACK  # step fails in its own pack, where the failure is recorded per run


def run_bytes(cfg: Config) -> int:
    """What one run of a pack holds while it trains (`state_bytes` and the step's activations),
    with the activations measured on a step of the model itself."""
    import torch

    from symrun import models
    from symrun.training import reparam
    from symrun.training.loss import loss_per_run

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

    label = (2 if task == "classification" else 1) * ys.numel()       # a step's draws, per run
    return state_bytes(rp.raw_shapes(), label, torch.finfo(dtype).bits // 8) + 2 * per_run_bytes(step)


_PROBES: dict[str, tuple] = {}


def _probe_batch(key: str, cfg) -> tuple:
    """(x, y, task, in_dim, out_dim): one training batch of the data `cfg` describes (all of it
    for full-batch GD), as torch tensors; kept per distinct data config (`key`, its JSON)."""
    import torch

    from symrun import data as data_mod     # loading data checks its size here (`check`)

    if key not in _PROBES:
        ds = data_mod.load(cfg)
        b = len(ds.x) if cfg.batch_size is None else min(cfg.batch_size, len(ds.x))
        _PROBES[key] = (torch.as_tensor(ds.x[:b]), torch.as_tensor(ds.y[:b]), ds.task, ds.in_dim, ds.out_dim)
    return _PROBES[key]
