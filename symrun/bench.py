"""`make bench`: packed training vs the naive way (one nn.Module + torch.optim loop per run).

Both do the same work per run and step (same model, data, batch size, optimiser, weight decay);
the packed engine also evaluates every metric at the first and last step, the naive loop does
not, so the ratio is conservative. The naive way is timed on a subset of the grid's runs (its
cost is linear in the number of runs) and both are reported per run-step and as a ratio.

    python -m symrun.bench [--device cpu|cuda] [--steps N] [--quick]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from torch import nn

from symrun import data as data_mod
from symrun import engine
from symrun.config import Config, DigitsDataConfig, HadamardConfig, MLPConfig, TeacherDataConfig, validate


@dataclass
class Workload:
    name: str
    configs: list[Config]
    naive_runs: int          # how many of the grid's runs the naive loop trains (linear in runs)


def _grid(model, data, lr: float, wds: list[float], seeds: int, steps: int, device: str) -> list[Config]:
    out = []
    for wd in wds:
        for s in range(seeds):
            c = Config(model=model, data=data, seed=s, device=device)
            c.optim.lr, c.optim.weight_decay = lr, wd
            c.train.steps, c.train.log_every = steps, steps
            out.append(validate(c))
    return out


def workloads(steps: int, device: str, quick: bool) -> list[Workload]:
    seeds = 4 if quick else 32
    return [
        Workload("mlp 64-128-10 tanh, digits, batch 64, sgd (8 wd × %d seeds)" % seeds,
                 _grid(MLPConfig(width=128, depth=1), DigitsDataConfig(batch_size=64), 0.05,
                       [0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1], seeds, steps, device), 8 if quick else 16),
        Workload("hadamard d=20, full batch, gd (16 wd × 4 seeds)",
                 _grid(HadamardConfig(), TeacherDataConfig(), 0.3, [float(x) for x in torch.logspace(-3, 0.3, 16)],
                       4, steps, device), 16),
    ]


def _naive_model(cfg: Config, in_dim: int, out_dim: int) -> nn.Module:
    if isinstance(cfg.model, MLPConfig):
        return nn.Sequential(nn.Linear(in_dim, cfg.model.width), nn.Tanh(), nn.Linear(cfg.model.width, out_dim))

    class Hadamard(nn.Module):
        def __init__(self):
            super().__init__()
            self.u = nn.Parameter(torch.randn(in_dim) / in_dim**0.5)
            self.w = nn.Parameter(torch.randn(in_dim) / in_dim**0.5)

        def forward(self, x):
            return (x @ (self.u * self.w)).unsqueeze(-1)

    return Hadamard()


def naive(configs: list[Config], device: torch.device) -> float:
    """Seconds to train each config on its own, the usual way."""
    ds = data_mod.load(configs[0].data)
    classify = ds.task == "classification"
    x = torch.as_tensor(ds.x, dtype=torch.float32, device=device)
    y = torch.as_tensor(ds.y, dtype=torch.long if classify else torch.float32, device=device)
    loss_fn = nn.CrossEntropyLoss() if classify else (lambda out, t: 0.5 * (out - t).pow(2).sum(-1).mean())
    _sync(device)
    start = time.perf_counter()
    for cfg in configs:
        torch.manual_seed(cfg.seed)
        model = _naive_model(cfg, ds.in_dim, ds.out_dim).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
        bs = cfg.data.batch_size
        for _ in range(cfg.train.steps):
            if bs is None:
                xb, yb = x, y
            else:
                idx = torch.randint(len(x), (bs,), device=device)
                xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
    _sync(device)
    return time.perf_counter() - start


def packed(configs: list[Config], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    engine.train_pack(configs)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="small grids (a smoke run, not a measurement)")
    args = parser.parse_args(argv)
    device = engine.resolve_device(args.device)
    table = Table(title=f"packed vs naive — {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
                        f"{args.steps} steps", title_justify="left")
    for col in ("workload", "runs", "naive ms / run-step", "packed ms / run-step", "speed-up"):
        table.add_column(col, justify="right" if col != "workload" else "left")
    for w in workloads(args.steps, str(device), args.quick):
        packed([c for c in w.configs[:2]], device)          # warm-up (allocator, kernels)
        naive(w.configs[:1], device)
        t_naive = naive(w.configs[: w.naive_runs], device) / (w.naive_runs * args.steps)
        t_packed = packed(w.configs, device) / (len(w.configs) * args.steps)
        table.add_row(w.name, str(len(w.configs)), f"{1e3 * t_naive:.4f}", f"{1e3 * t_packed:.4f}",
                      f"{t_naive / t_packed:.1f}×")
    Console().print(table)


if __name__ == "__main__":
    main()
