"""Memory a sweep will need, estimated before anything is allocated, against the memory there is.

A mistyped size (data.dim=1000000000) or a pack too large for the machine should be one line
before any work, not minutes of swapping ended by the kernel's out-of-memory killer. The
estimates count what grows with the settings — the data, the stacked parameters with their
gradients, optimizer state and copies, the activations of a training step and of an evaluation
chunk, and neural collapse's class-by-class matrices — to within a small factor: they refuse what
cannot fit, not what barely might.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from symrun.config import ConfigError

GIB = 2**30


class BudgetError(ConfigError):
    """More memory than the machine has; the message is one line."""


def available(device: torch.device | str = "cpu") -> int:
    """Bytes that can still be allocated: free CUDA memory on a GPU; else the kernel's
    MemAvailable, or less under a cgroup memory limit (a container, a SLURM job)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
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
                          f"{free / GIB:.3g} GiB available on {torch.device(device).type}; {hint}")


def check_pack(cfg, ds, model, runs: int, device: torch.device, eval_chunk: int) -> None:
    """Refuse a pack of `runs` runs of `cfg` (its data `ds`, its packed `model`) that cannot fit."""
    check(_pack_need(cfg, ds, model, runs, eval_chunk), f"a pack of {runs} run(s) of model={cfg.model.name}",
          "lower pack_size (more, smaller packs) or the model's or the data's size", device)


def fits(cfg, ds, model, runs: int, device: torch.device, eval_chunk: int) -> bool:
    """Whether a pack of `runs` runs fits, by the estimate `check_pack` refuses with."""
    return _pack_need(cfg, ds, model, runs, eval_chunk) <= available(device)


def _pack_need(cfg, ds, model, runs: int, eval_chunk: int) -> float:
    examples = len(ds.x) + (0 if ds.x_test is None else len(ds.x_test))
    return pack_bytes({k: s for k, (s, _) in model.shapes().items()}, runs, cfg.data.batch_size or len(ds.x), examples,
                      ds.in_dim, ds.out_dim, ds.n_classes or 0, 8 if cfg.train.dtype == "float64" else 4, eval_chunk)


def pack_bytes(shapes: dict[str, tuple[int, ...]], runs: int, batch: int, examples: int, in_dim: int, out_dim: int,
               classes: int, dtype_bytes: int, eval_chunk: int) -> float:
    """A pack's peak memory, estimated. `shapes`: one run's parameter shapes. Parameters count
    eight times (the parameters, their gradient, two optimizer buffers, the copy a run keeps of
    its last row, the composed θ, a checkpoint, Langevin noise); an example's activations are
    approximated by the sizes of every layer's output (each matrix's first axis) and the input
    and output; an evaluation chunk holds `eval_chunk` runs × examples of them in float64; neural
    collapse builds class × class matrices in float64."""
    params = sum(math.prod(s) for s in shapes.values())
    width = in_dim + out_dim + sum(s[0] for s in shapes.values() if len(s) >= 2)
    step = runs * (8 * params + 4 * batch * width) * dtype_bytes
    evaluation = min(eval_chunk, runs * examples) * width * 8 * 4
    collapse = 6 * classes**2 * 8 + runs * classes * width * 8
    data = examples * in_dim * dtype_bytes * 2
    return step + evaluation + collapse + data
