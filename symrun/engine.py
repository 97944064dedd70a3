"""The packed trainer: every run of a pack trained at once, as one batched model.

Runs of a pack share shapes (model, data, batch size, steps); what differs per run — seed, lr,
momentum, weight decay, label noise, temperature — is held as (R,) tensors. Each run's
randomness (init, minibatch order, label noise, Langevin noise) comes from its own
(seed, purpose) stream, so a run's numbers do not depend on which pack it ran in. The loss of the
pack is the *sum* of per-run losses: runs are disjoint slices, so each gets exactly its own gradient.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from symrun import checkpoint as ckpt_mod
from symrun import data as data_mod
from symrun import critical, metrics, models, reparam
from symrun.config import (PER_RUN_KEYS, Config, ConfigError, flatten, to_dict, total_steps)
from symrun.data import BatchOrder, Dataset
from symrun.seeds import derive_seed, generator
from symrun.optim import PackedOptimizer, per_run


EVAL_CHUNK = 65536      # runs × training examples per metric evaluation pass (bounds its memory)


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda when available; asking for cuda without one is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available (use device=cpu or device=auto)")
    return torch.device(name)


def pack_key(cfg: Config) -> str:
    """Runs with equal keys share every shape and setting but PER_RUN_KEYS: one batched model.
    A model that does not pack (its spec's `packs`) keys on every setting: each run is a pack of one."""
    flat = flatten(to_dict(cfg))
    alone = not models.spec(cfg.model.name).packs
    shared = {k: v for k, v in flat.items() if (alone or k not in PER_RUN_KEYS) and k not in ("name", "pack_size")}
    return json.dumps(shared, sort_keys=True, default=str)


@dataclass
class RunOutcome:
    status: str                                    # finished | diverged
    rows: list[dict] = field(default_factory=list)  # one per logged step: {"step": s, metric: value}
    state: Optional[dict[str, torch.Tensor]] = None
    diverged_at: Optional[int] = None
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)   # model.run_arrays, for the run's figures
    resumed_from: int = 0                          # the checkpoint's step when the pack was resumed


def loss_per_run(out: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Half-MSE (1/2n)Σ‖f − y‖² or mean cross-entropy, per run: out (R, B, o) → (R,). A sequence
    model's (R, B, T, classes) with targets (B, T) takes the mean over every position."""
    if task == "regression":
        return 0.5 * (out - y).pow(2).sum(-1).mean(-1)
    # log-sum-exp written out: F.cross_entropy over a 10-wide last axis costs ~4× more on CPU here
    shift = out - out.detach().amax(dim=-1, keepdim=True)
    picked = shift.gather(-1, y.expand(out.shape[:-1]).unsqueeze(-1)).squeeze(-1)    # (R, B[, T])
    return (shift.exp().sum(dim=-1).log() - picked).flatten(1).mean(dim=-1)


NOISE_BLOCK = 65536     # values per run and draw of noise: a draw covers up to NOISE_STEPS steps
NOISE_STEPS = 64


class NoiseBlocks:
    """One kind of per-step noise for the runs that draw it, counter-based at block granularity.

    Steps (b·K, (b+1)·K] of a run form block b, drawn in one call from the generator of the
    (seed, "<purpose>/<b>") stream; K = min(NOISE_STEPS, NOISE_BLOCK // values per step) depends
    only on the run's own shapes. A step's noise is therefore a function of the run's seed and
    the step alone: the same whichever runs share the pack and wherever a resumed pack restarts
    (nothing to checkpoint), and a pack draws once per run every K steps, not every step."""

    def __init__(self, seeds: list[int], purpose: str, shape: tuple[int, ...], uniform: bool,
                 device: torch.device, dtype: torch.dtype):
        self.seeds, self.purpose, self.shape, self.uniform = seeds, purpose, shape, uniform
        self.k = max(1, min(NOISE_STEPS, NOISE_BLOCK // max(1, math.prod(shape))))
        self.device, self.dtype = device, dtype
        self.block, self.values = -1, None

    def at(self, step: int) -> torch.Tensor:
        """Step `step`'s (≥ 1) draws: standard normal, or uniform on [0, 1): (runs, *shape)."""
        b, i = divmod(step - 1, self.k)
        if b != self.block:
            self.values = torch.empty(len(self.seeds), self.k, *self.shape, device=self.device, dtype=self.dtype)

            def fill(rows: range) -> None:
                for r in rows:
                    g = generator(self.seeds[r], f"{self.purpose}/{b}", self.device)
                    self.values[r].uniform_(generator=g) if self.uniform else self.values[r].normal_(generator=g)

            # A generator fills on one core; large CPU blocks (Langevin noise of every weight) are
            # split over torch's threads, each filling its own runs' rows: the values do not change.
            n, threads = len(self.seeds), torch.get_num_threads()
            if self.device.type == "cpu" and threads > 1 and self.values.numel() >= 2**20:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(fill, [range(t, n, threads) for t in range(threads)]))
            else:
                fill(range(n))
            self.block = b
        return self.values[:, i]


class StepNoise:
    """Per-run label noise and Langevin noise, each from the run's own streams (`NoiseBlocks`).

    A run draws only the noise its own config asks for, and what it draws at a step depends on
    its seed and that step alone, so it is the same whether it trains alone or beside other runs.
    """

    def __init__(self, cfgs: list[Config], device: torch.device, dtype: torch.dtype):
        self.label_std = torch.tensor([c.noise.label_std for c in cfgs], device=device, dtype=dtype)
        self.flip = torch.tensor([c.noise.label_flip for c in cfgs], device=device, dtype=dtype)
        self.temperature = torch.tensor([c.noise.temperature for c in cfgs], device=device, dtype=dtype)
        self.seeds = [c.seed for c in cfgs]
        # the runs that draw each kind, as indices (None: every run), and their streams, made at the first draw
        self.label_runs = self._runs([c.noise.label_std > 0 or c.noise.label_flip > 0 for c in cfgs], device)
        self.langevin_runs = self._runs([c.noise.temperature > 0 for c in cfgs], device)
        self.label_blocks: Optional[NoiseBlocks] = None
        self.langevin_blocks: Optional[NoiseBlocks] = None
        self.device, self.dtype = device, dtype

    @staticmethod
    def _runs(draws: list[bool], device) -> Optional[torch.Tensor]:
        if all(draws):
            return None
        return torch.tensor([i for i, d in enumerate(draws) if d], dtype=torch.long, device=device)

    def _blocks(self, runs: Optional[torch.Tensor], purpose: str, shape, uniform: bool) -> NoiseBlocks:
        seeds = self.seeds if runs is None else [self.seeds[i] for i in runs.tolist()]
        return NoiseBlocks(seeds, purpose, tuple(shape), uniform, self.device, self.dtype)

    def labels(self, y: torch.Tensor, task: str, n_classes: Optional[int], step: int) -> torch.Tensor:
        """Targets with step `step`'s noise: regression y + σ_r ξ, classification labels flipped to
        a random other class with probability p_r. y: shared (B, ...) or per run (R, B, ...)."""
        runs = self.label_runs
        if runs is not None and len(runs) == 0:
            return y
        r = len(self.seeds)
        if y.dim() == (2 if task == "regression" else 1):    # shared targets → one copy per run
            y = y.expand(r, *y.shape)
        shape = y.shape[1:] if task == "regression" else (2, *y.shape[1:])   # a flip's two uniforms
        if self.label_blocks is None or self.label_blocks.shape != tuple(shape):
            self.label_blocks = self._blocks(runs, "label-noise", shape, uniform=task != "regression")
        u = self.label_blocks.at(step)
        if task == "regression":
            if runs is None:
                return y + per_run(self.label_std, y) * u
            return y.index_add(0, runs, per_run(self.label_std[runs], u) * u)
        mine = y if runs is None else y.index_select(0, runs)
        flip = u[:, 0] < per_run(self.flip if runs is None else self.flip[runs], u[:, 0])
        shift = 1 + (u[:, 1] * (n_classes - 1)).long().clamp_max(n_classes - 2)   # uniform on 1..C−1
        noisy = torch.where(flip, (mine + shift) % n_classes, mine)
        return noisy if runs is None else y.index_copy(0, runs, noisy)

    @torch.no_grad()
    def langevin(self, params: dict[str, torch.Tensor], lr: torch.Tensor, step: int) -> None:
        """θ ← θ + √(2·lr·T)·ξ for the runs with T > 0 (one draw per run covering all its parameters)."""
        runs = self.langevin_runs
        if runs is not None and len(runs) == 0:
            return
        sizes = [p[0].numel() for p in params.values()]
        if self.langevin_blocks is None:
            self.langevin_blocks = self._blocks(runs, "langevin", (sum(sizes),), uniform=False)
        xi = self.langevin_blocks.at(step)                                    # (runs, Σ sizes)
        scale = (2 * lr * self.temperature).sqrt()
        if runs is not None:
            scale = scale[runs]
        for p, chunk in zip(params.values(), xi.split(sizes, dim=1)):
            chunk = chunk.reshape(-1, *p.shape[1:])          # a view: each run's slice is contiguous
            if runs is None:
                p.addcmul_(per_run(scale, p), chunk)         # θ + scale·ξ in one pass
            else:
                p.index_add_(0, runs, per_run(scale, chunk) * chunk)


def train_pack(cfgs: list[Config], dataset: Optional[Dataset] = None,
               on_step: Optional[Callable[[int], None]] = None, checkpoint: Optional[Path] = None) -> list[RunOutcome]:
    """Train every config of a pack together; one RunOutcome per config, in order.

    The configs must share everything but config.PER_RUN_KEYS (symrun.sweep groups them so).
    `on_step(n)` is called as steps complete (for a progress bar). With a `checkpoint` path the pack
    continues from the state saved there, if any, and saves it every `train.checkpoint_every` steps.
    """
    if len({pack_key(c) for c in cfgs}) > 1:
        raise ValueError("the configs of a pack may differ only in " + ", ".join(PER_RUN_KEYS))
    first = cfgs[0]
    device, dtype = resolve_device(first.device), getattr(torch, first.train.dtype)
    ds = dataset if dataset is not None else data_mod.load(first.data)
    tensor = lambda a, dt=dtype: None if a is None else torch.as_tensor(a, device=device, dtype=dt)  # noqa: E731
    ydt = torch.long if ds.task == "classification" else dtype
    tasks = first.tasks

    def task_data(k: int):
        t = data_mod.for_task(ds, tasks.change, first.data.seed, k)
        x_t, x_test_t = tensor(t.x), tensor(t.x_test)
        return x_t, tensor(t.y, ydt), x_test_t, tensor(t.y_test, ydt), probe_inputs(x_t, x_test_t, first)

    x, y, x_test, y_test, probe = task_data(0)
    model = models.build(first.model, ds.in_dim, ds.out_dim)
    hp = lambda get: torch.tensor([get(c) for c in cfgs], device=device, dtype=dtype)  # noqa: E731
    lr, wd = hp(lambda c: c.optim.lr), hp(lambda c: c.optim.weight_decay)
    # The optimiser trains ρ; the network uses θ = g(ρ): θ itself, θ + b under symmetry removal,
    # or DCS's (I − OOᵀ)w + O(u⊙v) on constrained parameters. Weight decay acts on ρ.
    rp = reparam.build(first, model)
    params = rp.init([c.seed for c in cfgs], device, dtype)
    net = lambda: rp.network(params)  # noqa: E731
    opt = PackedOptimizer(first.optim, params, lr, wd, hp(lambda c: c.optim.momentum))
    noise = StepNoise(cfgs, device, dtype)
    bs = first.data.batch_size
    order = BatchOrder(len(x), bs, [c.seed for c in cfgs], device) if bs is not None and bs < len(x) else None
    record = Recorder(len(cfgs), device)
    task = 0

    def log(step: int) -> None:
        with torch.no_grad():
            theta = net()
            # Runs are independent, so they are evaluated in chunks that bound the memory of the
            # training-set passes (neural collapse holds every example's features, in float64).
            chunk = max(1, EVAL_CHUNK // len(x))
            parts = [evaluate(model, {k: v[i:i + chunk] for k, v in theta.items()}, first, ds.task, x, y, x_test, y_test)
                     for i in range(0, len(cfgs), chunk)]
            row = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            if tasks.count > 1:
                row["task"] = torch.full_like(row["train_loss"], task)
            record(step, {**row, **rp.measure(theta, first.metrics)})
            record.keep(params, getattr(model, "stats", {}))

    # model.stats: running statistics a model updates as it trains (resnet18's BatchNorm), if any
    pack_state = ckpt_mod.PackState(params, opt, lr, order, record, getattr(model, "stats", {}))
    start = ckpt_mod.restore(checkpoint, cfgs, pack_state) if checkpoint is not None else 0
    steps, log_every, every = first.train.steps, first.train.log_every, first.train.checkpoint_every
    total = total_steps(first)
    if start == 0:
        log(0)
    else:   # resumed: back to the task the checkpoint was taken in (its switch already applied)
        task = min(start // steps, tasks.count - 1)
        if task:
            x, y, x_test, y_test, probe = task_data(task)
        for outcome in record.outcomes:
            outcome.resumed_from = start
        if on_step is not None:
            on_step(start)
    for step in range(start + 1, total + 1):
        if order is None:                       # full batch: one input shared by every run
            xb, yb = x, y
        else:
            idx = order.next()                  # (R, B)
            xb, yb = take(x, idx), take(y, idx)  # (R, B, d), (R, B[, o])
        yb = noise.labels(yb, ds.task, ds.n_classes, step)
        loss = loss_per_run(model.forward(net(), xb), yb, ds.task)        # (R,)
        grads = torch.autograd.grad(loss.sum(), list(params.values()))
        # A run diverges at the step that produced a non-finite value: the parameters of step − 1
        # whose loss is non-finite, or a non-finite update, which is not applied. Either way the
        # run is frozen at its last finite parameters. Bookkeeping stays on the device; the
        # optimiser reads back one bool per step.
        record.check(step - 1, loss.isfinite())
        record.check(step, opt.step(params, dict(zip(params, grads)), record.alive))
        lr.masked_fill_(~record.alive, 0.0)     # no Langevin noise for a frozen run
        noise.langevin(params, lr, step)
        if step % log_every == 0 or step % steps == 0:
            log(step)
            lr.masked_fill_(~record.alive, 0.0)
        if step % steps == 0 and task + 1 < tasks.count:       # the next task of the sequence
            task += 1
            x, y, x_test, y_test, probe = task_data(task)
            shrink_and_perturb(rp, params, cfgs, task, record.alive)
        if checkpoint is not None and every and step % every == 0 and step < total:
            ckpt_mod.save(checkpoint, step, cfgs, pack_state)
        if on_step is not None:
            on_step(1)
    thresholds = critical.at_end(model, rp, params, x, y, ds.task, first.metrics, record.alive)   # {column: (R,)}
    final = net()
    with torch.no_grad():
        arrays = model.run_arrays(final, probe)                      # {name: (R, ...)}: the run's figures
        kept = rp.network(record.kept) if not bool(record.alive.all()) else final
    for i, outcome in enumerate(record.outcomes):
        if outcome.status == "finished":
            outcome.state = model.run_state(final, i)
            outcome.arrays = {k: v[i].cpu() for k, v in arrays.items()}
            outcome.rows[-1].update({k: float(v[i]) for k, v in thresholds.items()})
        elif outcome.rows:   # diverged: the parameters of its last row, which is its row in runs.csv
            outcome.state = {**model.run_state(kept, i), **{k: v[i].cpu().clone() for k, v in record.kept_stats.items()}}
    return record.outcomes


@torch.no_grad()
def shrink_and_perturb(model, params: dict[str, torch.Tensor], cfgs: list[Config], task: int,
                       alive: torch.Tensor) -> None:
    """θ ← shrink·θ + perturb·θ₀' for every live run at the switch to `task` (config.TasksConfig);
    θ₀' is a fresh initialisation from the run's own (seed, task) stream. shrink = 1, perturb = 0
    leave θ exactly as it is. `model` draws it (the engine passes its reparam.Reparam, so the
    trained parameters ρ are the ones shrunk and perturbed)."""
    p0 = next(iter(params.values()))
    shrink = torch.tensor([c.tasks.shrink for c in cfgs], device=p0.device, dtype=p0.dtype)
    perturb = torch.tensor([c.tasks.perturb for c in cfgs], device=p0.device, dtype=p0.dtype)
    shrink, perturb = torch.where(alive, shrink, 1.0), torch.where(alive, perturb, 0.0)
    fresh = None
    if bool((perturb > 0).any()):
        fresh = model.init_params([derive_seed(c.seed, f"perturb-{task}") for c in cfgs], p0.device, p0.dtype)
    for k, p in params.items():
        p.mul_(per_run(shrink, p))
        if fresh is not None:
            p.add_(per_run(perturb, p) * fresh[k].detach())


def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[idx] for row indices idx (R, B): index_select is ~7× faster than advanced indexing on CPU."""
    return t.index_select(0, idx.reshape(-1)).view(*idx.shape, *t.shape[1:])


class Recorder:
    """Each run's logged rows and whether it is still alive. A run stops at step t when the
    parameters after t steps have a non-finite loss (the training step's, or at a log step the
    train_loss or weight_norm) or when the update of step t is non-finite (`check`, every step,
    on the device). It is marked diverged at t; its rows end with the last finite ones, and
    `kept` holds each run's trained parameters (and running statistics) at its last row, so a
    diverged run's saved parameters are the ones its last row describes."""

    def __init__(self, runs: int, device: torch.device):
        self.outcomes = [RunOutcome("finished") for _ in range(runs)]
        self.alive = torch.ones(runs, dtype=torch.bool, device=device)
        self.stopped_at = torch.full((runs,), -1, dtype=torch.long, device=device)
        self.kept: dict[str, torch.Tensor] = {}          # (R, ...) each, as the trained parameters
        self.kept_stats: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def keep(self, params: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
        """After a row is logged: copy the live runs' parameters and statistics (a stopped run
        keeps those of its last row)."""
        for kept, live in ((self.kept, params), (self.kept_stats, stats)):
            for k, t in live.items():
                if k not in kept:
                    kept[k] = t.detach().clone()
                elif bool(self.alive.all()):
                    kept[k].copy_(t)
                else:
                    kept[k].copy_(torch.where(per_run(self.alive, t), t, kept[k]))

    def check(self, step: int, ok: torch.Tensor) -> None:
        """Runs alive but not `ok` ((R,) bool) stop at `step`."""
        self.stopped_at.masked_fill_(self.alive & ~ok, step)
        self.alive.logical_and_(ok)

    def __call__(self, step: int, row: dict[str, torch.Tensor]) -> None:
        """Append `row` ({metric: (R,)}) for the live runs; mark the runs that stopped diverged."""
        self.check(step, torch.isfinite(row["train_loss"]) & torch.isfinite(row["weight_norm"]))
        values = {k: v.double().cpu().tolist() for k, v in row.items()}
        alive, stopped_at = self.alive.tolist(), self.stopped_at.tolist()
        for i, outcome in enumerate(self.outcomes):
            if alive[i]:
                outcome.rows.append({"step": step, **{k: v[i] for k, v in values.items()}})
            elif outcome.status == "finished":
                outcome.status, outcome.diverged_at = "diverged", stopped_at[i]


def probe_inputs(x: torch.Tensor, x_test: Optional[torch.Tensor], cfg: Config) -> torch.Tensor:
    """The inputs representation metrics and a run's figures are read on: the first
    metrics.probe_size test inputs (training inputs when there is no test set)."""
    return (x_test if x_test is not None else x)[: cfg.metrics.probe_size]


def evaluate(model, params, cfg: Config, task: str, x, y, x_test, y_test) -> dict[str, torch.Tensor]:
    """Losses, accuracy and structure metrics of every run: {name: (R,)}. The penultimate
    features of the forward passes here are handed to the metrics, which would otherwise
    recompute them on the training set (neural collapse) and on the probe (`probe_inputs`, the
    first rows of the test set, else of the training set)."""
    out, features = model.forward_penultimate(params, x)
    row = {"train_loss": loss_per_run(out, y, task)}
    if task == "classification":
        row["train_accuracy"] = (out.argmax(-1) == y).double().flatten(1).mean(-1)
    probe_features = features
    if x_test is not None:
        out_test, probe_features = model.forward_penultimate(params, x_test)
        row["test_loss"] = loss_per_run(out_test, y_test, task)
        if task == "classification":
            row["accuracy"] = (out_test.argmax(-1) == y_test).double().flatten(1).mean(-1)
    # svd/eigh raise on non-finite input, so a run that diverged (its train_loss says so; a run
    # frozen at huge finite parameters would overflow its Gram matrices) is measured at zero and
    # gets NaN metrics: one bad run must not stop its whole pack.
    finite = metrics.finite_runs(params) & row["train_loss"].isfinite() & metrics.weight_norm(params).pow(2).isfinite()
    zero = (lambda t: t) if bool(finite.all()) else (lambda t: metrics.zero_runs(t, finite))  # noqa: E731
    safe = {k: zero(p) for k, p in params.items()}
    probe = probe_inputs(x, x_test, cfg)
    given = {}
    if task == "classification" and features is not None:
        given["train"] = tuple(map(zero, features))
    if probe_features is not None:
        given["probe"] = (zero(probe_features[0][:, : len(probe)]), zero(probe_features[1]))
    labelled = (x, y, int(out.shape[-1])) if task == "classification" else None
    for k, v in metrics.measure(model, safe, cfg.metrics, probe, labelled, given).items():
        row[k] = torch.where(finite, v, torch.full_like(v, float("nan")))
    return row
