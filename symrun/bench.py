"""`make bench` / `symrun bench`: symrun against the ways a PyTorch user trains the same grid.

The headline (symrun.wholebench) times the user's command as a whole process — `symrun sweep`
with its start-up, planning, training, default metrics (λ_c included), tables and figures —
against, each as its own process with the same Python, a lean loop per run and PyTorch's
torch.func ensembling recipe (symrun.baselines), on W1 at 256 runs and on a Hadamard grid of
4,352 runs, with a cProfile of the sweep's process by phase.

Below it, the engine alone, in this process: the naive way is how a Hydra multirun job trains
each run: a plain `nn.Module`, `torch.optim.SGD(weight_decay=...)` and a standard loop over a
shuffling `DataLoader` (epochs, last partial batch dropped — the same sampling the packed engine
uses). A second naive variant ("lean") draws each minibatch with one index tensor instead of a
DataLoader. Each run of a grid costs the naive way the same (same model, data and steps), so the
naive cost per run is measured on `--naive-runs` runs and the grid's naive time is that times the
grid's size; the packed engine trains the whole grid, including its metric evaluation at the
first and last step, which the naive loops do not do.

Reported per engine workload: runs per second, the speed-up (packed / naive runs per second),
achieved matmul GFLOP/s (forward and backward matmuls of the model, the same count for both
ways), that as a fraction of this machine's fp32 matmul peak measured in the same run, and peak
memory. The results go to the terminal and, with `--write`, into BENCHMARKS.md between markers for
the device (`<!-- bench:cpu -->`), leaving the rest of the file — the analysis, other devices'
numbers — as it is.

    python -m symrun.bench [--device cpu|cuda] [--steps N] [--repeat 3] [--quick] [--write] [--profile] [--engine-only]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from symrun import data as data_mod
from symrun.training import engine
from symrun import wholebench
from symrun.config import (Config, DigitsDataConfig, FactorizationConfig, HadamardConfig, MLPConfig,
                           TeacherDataConfig, validate)

WDS_8 = [0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


# ---------------------------------------------------------------------------------------------
# Workloads


@dataclass
class Workload:
    name: str
    configs: list[Config]
    flops: float                     # matmul FLOPs per run and step (forward + backward)
    naive_model: Callable[[Config, int, int], nn.Module]
    tags: dict = field(default_factory=dict)


def grid(model, data, lr: float, wds: list[float], seeds: int, steps: int, device: str) -> list[Config]:
    """Weight decay × seed, every run logging (measuring) at its first and last step only."""
    out = []
    for wd, s in itertools.product(wds, range(seeds)):
        c = Config(model=model, data=data, seed=s, device=device)
        c.optim.lr, c.optim.weight_decay = lr, wd
        c.train.steps, c.train.log_every = steps, steps
        c.metrics.critical_mirrors = 0     # the timed work is training (+ two metric evaluations)
        out.append(validate(c))
    return out


def chain_flops(sizes: list[int], batch: int) -> float:
    """Matmul FLOPs of one step of a chain of linear maps sizes[0] → … → sizes[-1] on `batch`
    rows: forward 2·n·a·b per layer, backward the same for each weight gradient plus the input
    gradient of every layer but the first (the data needs none)."""
    layers = list(zip(sizes[:-1], sizes[1:]))
    forward = sum(2 * batch * a * b for a, b in layers)
    return 2 * forward + sum(2 * batch * a * b for a, b in layers[1:])


def mlp_naive(cfg: Config, in_dim: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, cfg.model.width), nn.Tanh(), nn.Linear(cfg.model.width, out_dim))


def factorization_naive(cfg: Config, in_dim: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, cfg.model.hidden, bias=False), nn.Linear(cfg.model.hidden, out_dim, bias=False))


class HadamardNaive(nn.Module):
    """f(x) = xᵀ(u ⊙ w), the rescaling-symmetric linear model."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.u = nn.Parameter(torch.randn(in_dim) / in_dim**0.5)
        self.w = nn.Parameter(torch.randn(in_dim) / in_dim**0.5)

    def forward(self, x):
        return (x @ (self.u * self.w)).unsqueeze(-1)


def w1(seeds: int, steps: int, device: str, label_flip: float = 0.0) -> Workload:
    """The reference workload: 64-128-10 tanh MLP, digits, minibatch 64, SGD lr 0.05; with
    `label_flip`, each step's labels flipped with that probability (gradient noise, both ways)."""
    cfgs = grid(MLPConfig(width=128, depth=1), DigitsDataConfig(batch_size=64), 0.05, WDS_8, seeds, steps, device)
    for c in cfgs:
        c.noise.label_flip = label_flip
    noise = f", label flips p = {label_flip:g}" if label_flip else ""
    return Workload(f"W1 mlp 64-128-10 tanh, digits, batch 64{noise} — 8 wd × {seeds} seeds", cfgs,
                    chain_flops([64, 128, 10], 64), mlp_naive, {"seeds": seeds})


def other_workloads(steps: int, device: str) -> list[Workload]:
    """Full-batch gradient descent on teacher data: the rescaling and rotation models."""
    teacher = TeacherDataConfig()
    low_rank = TeacherDataConfig(teacher="low_rank", out_dim=10)
    fac = FactorizationConfig()
    return [
        Workload(f"hadamard d={teacher.dim}, n={teacher.n}, full batch GD — 16 wd × 4 seeds",
                 grid(HadamardConfig(), teacher, 0.3, [float(x) for x in torch.logspace(-3, 0.3, 16)], 4, steps, device),
                 4 * teacher.n * teacher.dim, lambda c, i, o: HadamardNaive(i)),
        Workload(f"factorization {low_rank.dim}-{fac.hidden}-{low_rank.out_dim}, n={low_rank.n}, full batch GD "
                 "— 16 wd × 4 seeds",
                 grid(fac, low_rank, 0.1, [float(x) for x in torch.logspace(-3, 0, 16)], 4, steps, device),
                 chain_flops([low_rank.dim, fac.hidden, low_rank.out_dim], low_rank.n), factorization_naive),
    ]


# ---------------------------------------------------------------------------------------------
# The two ways, timed


def naive(configs: list[Config], device: torch.device, model_fn, lean: bool) -> float:
    """Seconds to train each config on its own: nn.Module + torch.optim.SGD + a DataLoader loop
    (or, `lean`, one index tensor per minibatch)."""
    ds = data_mod.load(configs[0].data)
    classify = ds.task == "classification"
    x = torch.as_tensor(ds.x, dtype=torch.float32, device=device)
    y = torch.as_tensor(ds.y, dtype=torch.long if classify else torch.float32, device=device)
    loss_fn = nn.CrossEntropyLoss() if classify else (lambda out, t: 0.5 * (out - t).pow(2).sum(-1).mean())
    _sync(device)
    start = time.perf_counter()
    for cfg in configs:
        torch.manual_seed(cfg.seed)
        model = model_fn(cfg, ds.in_dim, ds.out_dim).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        for xb, yb in itertools.islice(_batches(x, y, cfg.data.batch_size, lean), cfg.train.steps):
            if cfg.noise.label_flip > 0:     # as the engine does: a flip goes to another class
                flip = torch.rand(yb.shape, device=device) < cfg.noise.label_flip
                yb = torch.where(flip, (yb + torch.randint(1, ds.out_dim, yb.shape, device=device)) % ds.out_dim, yb)
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
    _sync(device)
    return time.perf_counter() - start


def _batches(x, y, batch_size, lean: bool):
    """Endless minibatches, epoch by epoch (full batch when batch_size is None)."""
    if batch_size is None or batch_size >= len(x):
        while True:
            yield x, y
    if not lean:
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size,
                                             shuffle=True, drop_last=True)
        while True:
            yield from loader
    per_epoch = len(x) // batch_size
    while True:
        perm = torch.randperm(len(x), device=x.device)
        for k in range(per_epoch):
            idx = perm[k * batch_size: (k + 1) * batch_size]
            yield x[idx], y[idx]


def packed(configs: list[Config], device: torch.device) -> tuple[float, float]:
    """Seconds to train the whole grid as packs, and the peak memory in MiB while doing it."""
    dataset = data_mod.load(configs[0].data)
    reset_peak_memory(device)
    base = peak_memory_mib(device)
    _sync(device)
    start = time.perf_counter()
    for pack in _packs(configs):
        engine.train_pack(pack, dataset)
    _sync(device)
    return time.perf_counter() - start, peak_memory_mib(device) - (0.0 if device.type == "cuda" else base)


def _packs(configs: list[Config]) -> list[list[Config]]:
    packs: dict[str, list[Config]] = {}
    for c in configs:
        packs.setdefault(engine.pack_key(c), []).append(c)
    return list(packs.values())


def matmul_peak(device: torch.device) -> float:
    """Best fp32 GFLOP/s of a large square matmul (all threads), measured now."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = 0.0
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        try:
            Path("/proc/self/clear_refs").write_text("5")      # resets VmHWM (Linux ≥ 4.0)
        except OSError:
            pass


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: peak allocated by torch. CPU: the process's peak resident set (VmHWM), NaN off Linux."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024
    except (OSError, AttributeError):
        return float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# The report


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = _cpu_model() + f", {os.cpu_count()} logical cores"
    return f"{what}; torch {torch.__version__}, {torch.get_num_threads()} threads, Python {platform.python_version()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run(device: torch.device, steps: Optional[int], quick: bool, naive_runs: int, profile: bool, repeat: int = 1,
        whole: bool = True) -> str:
    """Every measurement; returns the markdown section (also printed as it goes). `steps`: of
    every workload (None: the whole-process grids' own, 1000 and 500, and 1000 for the engine's)."""
    from rich.console import Console

    console = Console()
    say = lambda msg: console.print(msg, highlight=False)  # noqa: E731
    head = []
    if whole:
        head = ["### The user's command, as a whole process", "", wholebench.run(str(device), quick, steps, repeat, say),
                "", "### The engine alone, in one process", ""]
    steps = steps or 1000
    peak = matmul_peak(device)
    say(f"[bold]{machine(device)}[/bold]; fp32 matmul peak {peak:.0f} GFLOP/s")
    header = ["workload", "runs", "naive runs/s", "naive (lean) runs/s", "packed runs/s", "speed-up",
              "speed-up vs lean", "packed GFLOP/s", "of peak", "peak MiB"]
    rows = []
    seeds_list = [1, 4] if quick else [1, 4, 8, 32]
    wls = ([w1(s, steps, str(device)) for s in seeds_list] + [w1(seeds_list[-2], steps, str(device), label_flip=0.1)]
           + other_workloads(steps, str(device)))
    per_run: dict[str, tuple[float, float]] = {}         # naive seconds per run, by workload kind
    packed(wls[0].configs[:2], device)                   # warm-up: allocator, kernels, data cache
    naive(wls[0].configs[:1], device, wls[0].naive_model, lean=False)
    for w in wls:
        kind = w.name.split(" — ")[0]
        if kind not in per_run:
            sample = w.configs[: min(naive_runs, len(w.configs))]
            per_run[kind] = tuple(min(naive(sample, device, w.naive_model, lean=lean) for _ in range(repeat)) / len(sample)
                                  for lean in (False, True))
        t_naive, t_lean = per_run[kind]
        timings = [packed(w.configs, device) for _ in range(repeat)]
        t_packed, mem = min(t for t, _ in timings), max(m for _, m in timings)
        runs = len(w.configs)
        gflops = runs * steps * w.flops / t_packed / 1e9 if w.flops else float("nan")
        row = [w.name, str(runs), f"{1 / t_naive:.2f}", f"{1 / t_lean:.2f}", f"{runs / t_packed:.2f}",
               f"**{t_naive * runs / t_packed:.1f}×**", f"{t_lean * runs / t_packed:.1f}×",
               _num(gflops, ".1f"), _num(gflops / peak, ".0%"), f"{mem:.0f}"]
        rows.append(row)
        say(" | ".join(row))
    scaling = pack_scaling(device, min(steps, 200), [1, 4, 16, 64] if quick else [1, 4, 16, 64, 256, 1024], peak, repeat)
    for r in scaling:
        say("scaling: " + " | ".join(r))
    parts = [f"Machine: {machine(device)}.", "", *head,
             f"fp32 matmul peak measured in this run: **{peak:.0f} GFLOP/s**.",
             f"{steps} steps per run; naive cost per run measured on {naive_runs} runs per workload; "
             f"each time the fastest of {repeat} repeat{'s' if repeat > 1 else ''}, both ways.", "",
             markdown_table(header, rows), "",
             f"Pack-size scaling (W1 model and data, {min(steps, 200)} steps, one pack of N runs, "
             f"the fastest of {repeat}):", "",
             markdown_table(["runs in the pack", "packed runs/s", "run-steps/s", "GFLOP/s", "of peak", "peak MiB"],
                            scaling)]
    if profile:
        parts += ["", "Where a packed W1 step (256 runs) spends its time (torch profiler, self time, 20 training steps):", "",
                  profile_step(device)]
    return "\n".join(parts)


def pack_scaling(device: torch.device, steps: int, sizes: list[int], peak: float, repeat: int = 1) -> list[list[str]]:
    flops = chain_flops([64, 128, 10], 64)
    rows = []
    for n in sizes:
        cfgs = w1(max(1, n // 8), steps, str(device)).configs[:n]     # 8 weight decays × n/8 seeds
        timings = [packed(cfgs, device) for _ in range(repeat)]
        t, mem = min(t for t, _ in timings), max(m for _, m in timings)
        g = len(cfgs) * steps * flops / t / 1e9
        rows.append([str(len(cfgs)), f"{len(cfgs) / t:.2f}", f"{len(cfgs) * steps / t:.0f}", f"{g:.1f}",
                     f"{g / peak:.0%}", f"{mem:.0f}"])
    return rows


def profile_step(device: torch.device, steps: int = 30) -> str:
    """Self time per op of W1 training steps at 256 runs: steps 5–24 of 30, so neither the
    metric evaluation at step 0 nor the one at the end is in it."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from symrun.models.nets.cpu import NUMPY_OP, _NumpyMatmul
    from symrun.models.nets.mlp import _NumpyTanh

    cfgs = w1(32, steps, str(device)).configs
    dataset = data_mod.load(cfgs[0].data)
    engine.train_pack(cfgs[:8], dataset)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, schedule=schedule(wait=2, warmup=2, active=steps - 10, repeat=1)) as prof:
        engine.train_pack(cfgs, dataset, on_step=lambda n: prof.step())
    # aten ops, and the CPU tanh and batched products where they run in numpy: under their
    # autograd Functions' names, or symrun::numpy where a hand-written step calls numpy itself
    numpy_ops = {_NumpyTanh.__name__, _NumpyMatmul.__name__, NUMPY_OP}
    events = [e for e in prof.key_averages() if e.key.startswith("aten::") or e.key in numpy_ops]
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr) for e in events)
    top = sorted(events, key=lambda e: -getattr(e, attr))[:12]
    return markdown_table(["op", "share", "calls"], [[e.key, f"{getattr(e, attr) / total:.0%}", str(e.count)] for e in top])


def _num(v: float, fmt: str) -> str:
    return "–" if v != v else format(v, fmt)


def write_section(path: Path, device: torch.device, body: str) -> None:
    """Replace this device's section of BENCHMARKS.md (between its markers), keep the rest."""
    start, end = f"<!-- bench:{device.type} -->", f"<!-- /bench:{device.type} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="symrun bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of every workload (default: 1000 for W1 and the engine, 500 for the Hadamard grid)")
    parser.add_argument("--naive-runs", type=int, default=16, help="runs the naive way is timed on, per workload")
    parser.add_argument("--repeat", type=int, default=3,
                        help="time each way this many times (the whole processes in rounds, one of each back to back), "
                             "keep the fastest")
    parser.add_argument("--quick", action="store_true", help="small grids: a smoke run, not a measurement")
    parser.add_argument("--profile", action="store_true", help="add a profile of one packed W1 step")
    parser.add_argument("--write", nargs="?", const="BENCHMARKS.md", default=None, metavar="FILE",
                        help="write the results into FILE's section for this device (default BENCHMARKS.md)")
    parser.add_argument("--engine-only", action="store_true", help="skip the whole-process comparison")
    args = parser.parse_args(argv)
    if min(args.steps or 1, args.naive_runs, args.repeat) < 1:
        parser.error("--steps, --naive-runs and --repeat must be >= 1")
    device = engine.resolve_device(args.device)
    body = run(device, args.steps, args.quick, args.naive_runs, args.profile, args.repeat, whole=not args.engine_only)
    if args.write:
        write_section(Path(args.write), device, body)
        print(f"wrote {args.write}")


if __name__ == "__main__":
    main()
