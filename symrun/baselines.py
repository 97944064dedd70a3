"""The scripts a PyTorch user would write to train a sweep's grid, for `symrun bench` to time as
whole processes beside `symrun sweep` on the same grid (symrun.wholebench).

- LEAN: one plain loop per run — `nn.Module`, `torch.optim.SGD(weight_decay=λ)`, a fresh
  `randperm` per epoch and one index tensor per minibatch (no DataLoader): the strictest
  one-run-at-a-time baseline. It reports the seconds it spent training, so a subset of the runs
  can be timed and scaled.
- TORCH_FUNC: PyTorch's model-ensembling recipe (the `torch.func` ensembling tutorial):
  `stack_module_state` + `functional_call` + `vmap(grad(loss))`, every run's minibatches at once,
  and the per-run weight decay in a hand-written SGD step.

Both read the same data a symrun sweep of the workload reads (scikit-learn's digits, 80/20 split,
or a sparse linear teacher: 200 × 20, Gaussian), train the grid weight decay × seed with the same
model, lr, batch and steps, and write each run's final training loss to a CSV, as the user would.
They import nothing from symrun: `python SCRIPT --help` runs them anywhere.
"""

from __future__ import annotations

COMMON = '''
import argparse, csv, time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

p = argparse.ArgumentParser()
p.add_argument("--model", choices=["mlp", "hadamard"], default="mlp")
p.add_argument("--wds", default="0,0.0001,0.001,0.01")
p.add_argument("--seeds", type=int, default=2)
p.add_argument("--steps", type=int, default=100)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--batch", type=int, default=0, help="0: full batch")
p.add_argument("--runs", type=int, default=0, help="train only the first RUNS runs of the grid (0: all)")
p.add_argument("--out", default="results.csv")
p.add_argument("--device", default="cpu")
a = p.parse_args()
dev = torch.device(a.device)


def data(model):
    """digits / 16 with an 80/20 split (the training part), or y = X w* + noise, w* 5-sparse."""
    if model == "mlp":
        from sklearn.datasets import load_digits
        d = load_digits()
        order = np.random.default_rng(0).permutation(len(d.data))
        train = order[: len(order) - int(0.2 * len(order))]
        return torch.tensor(d.data[train] / 16.0, dtype=torch.float32), torch.tensor(d.target[train])
    g = np.random.default_rng(0)
    x, w = g.standard_normal((200, 20)), np.zeros(20)
    w[:5] = g.standard_normal(5)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(x @ w + 0.1 * g.standard_normal(200), dtype=torch.float32)[:, None]


class Hadamard(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.u, self.w = nn.Parameter(torch.randn(d) / d ** 0.5), nn.Parameter(torch.randn(d) / d ** 0.5)

    def forward(self, x):
        return (x @ (self.u * self.w))[:, None]


def make(model, d, o):
    return nn.Sequential(nn.Linear(d, 128), nn.Tanh(), nn.Linear(128, o)) if model == "mlp" else Hadamard(d)


def loss_fn(out, y):
    return F.cross_entropy(out, y) if a.model == "mlp" else 0.5 * (out - y).pow(2).sum(-1).mean()


x, y = (t.to(dev) for t in data(a.model))
d, o = x.shape[1], (10 if a.model == "mlp" else 1)
grid = [(float(wd), seed) for wd in a.wds.split(",") for seed in range(a.seeds)]
grid = grid[: a.runs or len(grid)]
n = len(x)
b = a.batch or n
per_epoch = n // b
'''

LEAN = COMMON + '''
trained, rows = 0.0, []
for wd, seed in grid:
    start = time.perf_counter()
    torch.manual_seed(seed)
    net = make(a.model, d, o).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=a.lr, weight_decay=wd)
    for step in range(a.steps):
        if b < n and step % per_epoch == 0:
            perm = torch.randperm(n, device=dev)
        if b < n:
            idx = perm[(step % per_epoch) * b: (step % per_epoch + 1) * b]
            xb, yb = x[idx], y[idx]
        else:
            xb, yb = x, y
        loss = loss_fn(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        rows.append((wd, seed, loss_fn(net(x), y).item()))
    trained += time.perf_counter() - start
with open(a.out, "w", newline="") as f:
    csv.writer(f).writerows([("weight_decay", "seed", "train_loss"), *rows])
print(f"runs={len(grid)} train_seconds={trained:.6f}")
'''

TORCH_FUNC = COMMON + '''
import copy

from torch.func import functional_call, grad, stack_module_state, vmap

start = time.perf_counter()
models = []
for wd, seed in grid:
    torch.manual_seed(seed)
    models.append(make(a.model, d, o).to(dev))
params, buffers = stack_module_state(models)
base = copy.deepcopy(models[0]).to("meta")


def run_loss(p, buf, xb, yb):
    return loss_fn(functional_call(base, (p, buf), (xb,)), yb)


per_run_batches = vmap(grad(run_loss))                          # each run its own minibatch
shared_batch = vmap(grad(run_loss), in_dims=(0, 0, None, None))  # full batch: one input for all
wd = torch.tensor([w for w, _ in grid], device=dev)
for step in range(a.steps):
    if b < n:
        if step % per_epoch == 0:
            perms = torch.argsort(torch.rand(len(grid), n, device=dev), dim=1)
        idx = perms[:, (step % per_epoch) * b: (step % per_epoch + 1) * b]
        grads = per_run_batches(params, buffers, x[idx], y[idx])
    else:
        grads = shared_batch(params, buffers, x, y)
    with torch.no_grad():
        for k, p_ in params.items():
            p_.sub_(a.lr * (grads[k] + wd.view(-1, *[1] * (p_.dim() - 1)) * p_))
with torch.no_grad():
    final = vmap(run_loss, in_dims=(0, 0, None, None))(params, buffers, x, y).tolist()   # waits for the device
trained = time.perf_counter() - start
with open(a.out, "w", newline="") as f:
    csv.writer(f).writerows([("weight_decay", "seed", "train_loss"), *[(w, s, v) for (w, s), v in zip(grid, final)]])
print(f"runs={len(grid)} train_seconds={trained:.6f}")
'''

SCRIPTS = {"lean": LEAN, "torch_func": TORCH_FUNC}
