"""The packed trainer: every run of a pack trained at once, as one batched model.

Runs of a pack share shapes (model, data, batch size, steps); what differs per run — seed, lr,
momentum, weight decay, label noise, temperature — is held as (R,) tensors. Each run's
randomness (init, minibatch order, label noise, Langevin noise) comes from its own
(seed, purpose) stream, so a run's numbers do not depend on which pack it ran in. The loss of the
pack is the *sum* of per-run losses: runs are disjoint slices, so each gets exactly its own gradient.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from symrun import data as data_mod
from symrun import models
from symrun.analysis import critical, metrics
from symrun.config import PER_RUN_KEYS, Config, ConfigError, flattened, flattened_field, total_steps
from symrun.data import BatchOrder, Dataset
from symrun.models.nets.base import PackedModel
from symrun.seeds import derive_seed
from symrun.training import checkpoint as ckpt_mod
from symrun.training import memory, reparam
from symrun.training.loss import loss_per_run
from symrun.training.noise import NoiseBlocks, StepNoise  # noqa: F401 — NoiseBlocks: engine.NoiseBlocks stays
from symrun.training.optim import PackedOptimizer, Schedule, per_run
from symrun.training.shards import Shards, Split, chunk_bytes


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
    return _key(flattened(cfg), not models.spec(cfg.model.name).packs)


def _key(flat: dict, alone: bool) -> str:
    """The pack key of these settings of a flattened config."""
    shared = {k: v for k, v in flat.items() if (alone or k not in PER_RUN_KEYS) and k not in ("name", "pack_size")}
    return json.dumps(shared, sort_keys=True, default=str)


def one_pack(cfgs: list[Config]) -> bool:
    """Whether every config has the first's pack_key, compared field by field: a field a config
    shares with the first config by identity is equal to it. A plan's configs share all their
    fields but the per-run ones (seed, optim), so only those are compared: for 4,352 runs,
    0.08 s instead of 0.25 s of pack keys."""
    first, fields = cfgs[0], [f.name for f in dataclasses.fields(cfgs[0])]
    alone = {c.model.name for c in cfgs} != {first.model.name} or not models.spec(first.model.name).packs
    if alone:
        return len({pack_key(c) for c in cfgs}) == 1
    mine: dict[str, str] = {}
    for c in cfgs[1:]:
        for name in fields:
            if getattr(c, name) is getattr(first, name):
                continue
            if name not in mine:
                mine[name] = _key(flattened_field(first, name), False)
            if _key(flattened_field(c, name), False) != mine[name]:
                return False
    return True


@dataclass
class RunOutcome:
    status: str                                    # finished | diverged
    rows: list[dict] = field(default_factory=list)  # one per logged step: {"step": s, metric: value}
    state: Optional[dict[str, torch.Tensor]] = None
    diverged_at: Optional[int] = None
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)   # model.run_arrays, for the run's figures
    resumed_from: int = 0                          # the checkpoint's step when the pack was resumed
    train_seconds: float = 0.0                     # the pack's time in its training steps (not its metrics)


def train_pack(cfgs: list[Config], dataset: Optional[Dataset] = None,
               on_step: Optional[Callable[[int], None]] = None, checkpoint: Optional[Path] = None) -> list[RunOutcome]:
    """Train every config of a pack together; one RunOutcome per config, in order.

    The configs must share everything but config.PER_RUN_KEYS (symrun.sweeping.sweep groups them so).
    `on_step(n)` is called as steps complete (for a progress bar). With a `checkpoint` path the pack
    continues from the state saved there, if any, and saves it every `train.checkpoint_every` steps.
    On a CPU the pack trains as parts, one per core, side by side (symrun.training.shards.Split);
    a part that has finished helps the others with their evaluations and λ_c (`Split.share`).
    """
    if not one_pack(cfgs):
        raise ValueError("the configs of a pack may differ only in " + ", ".join(PER_RUN_KEYS))
    first = cfgs[0]
    device, dtype = resolve_device(first.device), getattr(torch, first.train.dtype)
    ds = dataset if dataset is not None else data_mod.load(first.data)
    model = models.build(first.model, ds.in_dim, ds.out_dim)
    # The optimiser trains ρ; the network uses θ = g(ρ): θ itself, θ + b under symmetry removal,
    # or DCS's (I − OOᵀ)w + O(u⊙v) on constrained parameters. Weight decay acts on ρ.
    rp = reparam.build(first, model)
    pack = _Pack(cfgs, ds, model, rp, device, dtype, on_step, checkpoint)
    n = len(pack.task_data(0)[0])
    batch = n if first.data.batch_size is None else min(n, first.data.batch_size)
    pack.run_bytes = chunk_bytes(sum(math.prod(s) for s in rp.raw_shapes().values()), batch * model.example_width(),
                                 dtype.itemsize)
    pack.split = Split([c.seed for c in cfgs], device, pack.run_bytes, model.threadsafe)
    if checkpoint is not None:
        pack.saved = ckpt_mod.load(checkpoint, cfgs, device)
    with pack.split.active():
        done = pack.split.run(lambda i: _train_part(pack, i))
    outcomes: list = [None] * len(cfgs)
    seconds = max(s for _, s in done)               # the pack's time in its steps, its parts side by side
    for runs, (part, _) in zip(pack.split.parts, done):
        for r, outcome in zip(runs, part):
            outcome.train_seconds, outcomes[r] = seconds, outcome
    return outcomes


@dataclass
class _Pack:
    """What the parts of a pack share (symrun.training.shards.Split); each trains its own runs."""

    cfgs: list[Config]
    ds: Dataset
    model: PackedModel
    rp: reparam.Reparam
    device: torch.device
    dtype: torch.dtype
    on_step: Optional[Callable[[int], None]]       # called by the first part, for the pack
    checkpoint: Optional[Path]
    run_bytes: int = 0                             # what one run's step touches (shards.chunk_bytes)
    split: Optional[Split] = None
    saved: Optional[dict] = None                   # the checkpoint's state, when the pack resumes
    tasks: dict = field(default_factory=dict)      # task k → its tensors, made once for every part
    lock: threading.Lock = field(default_factory=threading.Lock)

    def task_data(self, k: int) -> tuple:
        """(x, y, x_test, y_test, probe) of task k, on the pack's device: made by the first part
        that asks, then shared (read only)."""
        with self.lock:
            if k not in self.tasks:
                first = self.cfgs[0]
                t = data_mod.for_task(self.ds, first.tasks.change, first.data.seed, k)
                tensor = lambda a, dt=self.dtype: None if a is None else torch.as_tensor(a, device=self.device, dtype=dt)  # noqa: E731
                ydt = torch.long if self.ds.task == "classification" else self.dtype
                x, x_test = tensor(t.x), tensor(t.x_test)
                self.tasks[k] = (x, tensor(t.y, ydt), x_test, tensor(t.y_test, ydt), probe_inputs(x, x_test, first))
            return self.tasks[k]

    def save(self, i: int, step: int, state: ckpt_mod.PackState) -> None:
        """Part i's state after `step` steps, saved with the other parts' as the pack's checkpoint
        once every part has reached that step."""
        self.split.meet(i, ckpt_mod.snapshot(step, state),
                        lambda states: ckpt_mod.save(self.checkpoint, self.cfgs, ckpt_mod.join(states, self.split.parts)))


def _train_part(pack: _Pack, i: int) -> tuple[list[RunOutcome], float]:
    """Train the pack's runs split.parts[i], from the checkpoint's state if there is one: their
    outcomes, in order, and the seconds spent in training steps (not the logged rows' metrics,
    nor checkpoints)."""
    part = pack.split.parts[i]
    cfgs, model, ds, device, dtype = [pack.cfgs[r] for r in part], pack.model, pack.ds, pack.device, pack.dtype
    first, tasks, task = cfgs[0], cfgs[0].tasks, 0
    x, y, x_test, y_test, probe = pack.task_data(0)
    hp = lambda get: torch.tensor([get(c) for c in cfgs], device=device, dtype=dtype)  # noqa: E731
    lr, wd = hp(lambda c: c.optim.lr), hp(lambda c: c.optim.weight_decay)
    rp = copy.copy(pack.rp)         # its own offsets b under symmetry removal, for these runs
    params = rp.init([c.seed for c in cfgs], device, dtype)
    net = lambda: rp.network(params)  # noqa: E731
    opt = PackedOptimizer(first.optim, params, lr, wd, hp(lambda c: c.optim.momentum))
    schedule = Schedule([c.optim for c in cfgs], total_steps(first), lr)     # writes each step's lr into `lr`
    noise = StepNoise(cfgs, device, dtype)
    bs = first.data.batch_size
    order = BatchOrder(len(x), bs, [c.seed for c in cfgs], device) if bs is not None and bs < len(x) else None
    record = Recorder(len(cfgs), device)
    on_step = pack.on_step if i == 0 else None

    def log(step: int) -> None:
        with torch.no_grad():
            theta = net()
            # At step 0 the runs of a seed are one network (a grid over weight decay, lr or noise
            # starts them alike): each distinct network is evaluated once and its row given to
            # every run that holds it. A model with running statistics (model.stats) keeps them
            # per run, outside θ, so its runs are always evaluated one by one.
            twins = distinct_runs(theta) if step == 0 and not getattr(model, "stats", None) else None
            if twins is not None:
                theta = {k: v[twins[0]] for k, v in theta.items()}
            # Runs are independent, so they are evaluated in chunks whose training-set passes fit
            # memory.EVAL_BYTES (neural collapse holds every example's features, in float64),
            # which a thread whose part has finished may take (Split.share).
            chunk = max(1, memory.eval_items(model.example_width()) // len(x))

            @torch.no_grad()       # on whichever thread runs it: grad mode is a thread's own
            def evaluated(j: int) -> dict[str, torch.Tensor]:
                return evaluate(model, {k: v[j:j + chunk] for k, v in theta.items()}, first, ds.task, x, y, x_test, y_test)

            parts = pack.split.share([functools.partial(evaluated, j) for j in range(0, len(next(iter(theta.values()))), chunk)])
            row = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            if twins is not None:
                row = {k: v[twins[1]] for k, v in row.items()}
            if tasks.count > 1:
                row["task"] = torch.full_like(row["train_loss"], task)
            record(step, {**row, **rp.measure(params, first.metrics)})
            record.keep(params, getattr(model, "stats", {}))

    # model.stats: running statistics a model updates as it trains (resnet18's BatchNorm), if any
    pack_state = ckpt_mod.PackState(params, opt, lr, order, record, getattr(model, "stats", {}))
    start = ckpt_mod.restore(ckpt_mod.part(pack.saved, part), pack_state) if pack.saved is not None else 0
    steps, log_every, every = first.train.steps, first.train.log_every, first.train.checkpoint_every
    total = total_steps(first)
    shards = Shards(len(cfgs), device, pack.run_bytes)       # the part's step in chunks that fit the cache
    if start == 0:
        log(0)
    else:   # resumed: back to the task the checkpoint was taken in (its switch already applied)
        task = min(start // steps, tasks.count - 1)
        if task:
            x, y, x_test, y_test, probe = pack.task_data(task)
        for outcome in record.outcomes:
            outcome.resumed_from = start
        if on_step is not None:
            on_step(start)
    train_seconds = 0.0
    for step in range(start + 1, total + 1):
        pack.split.check()                         # another part failed, or the caller was interrupted
        begun = time.perf_counter()
        schedule.set(lr, step, record.alive)   # η_t of every run (docs/theory.md §1), 0 once frozen
        # full batch: one input shared by every run; else each run's minibatch (R, B)
        idx = None if order is None else order.next()
        yb = noise.labels(y if idx is None else take(y, idx), ds.task, ds.n_classes, step)   # (R, B[, o])
        per_run_y = yb.dim() > y.dim()

        def loss_and_grads(raw: dict[str, torch.Tensor], runs: slice) -> tuple[torch.Tensor, list[torch.Tensor]]:
            xb = x if idx is None else take(x, idx[runs])                         # (runs, B, d)
            yr = yb[runs] if per_run_y else yb
            # the model's own backward (PackedModel.loss_and_grads), if it has one here and θ's
            # gradient is ρ's (not under DCS's reparametrisation)
            if rp.plain_gradient:
                with torch.no_grad():
                    done = model.loss_and_grads(rp.network(raw, runs), xb, yr, ds.task)
                if done is not None:
                    return done[0], [done[1][k] for k in raw]
            loss = loss_per_run(model.forward(rp.network(raw, runs), xb), yr, ds.task)        # (runs,)
            return loss.detach(), list(torch.autograd.grad(loss.sum(), list(raw.values())))

        def update(raw: dict[str, torch.Tensor], grads: list[torch.Tensor], losses: torch.Tensor,
                   runs: slice) -> torch.Tensor:
            return opt.update(raw, dict(zip(raw, grads)), record.alive[runs] & losses.isfinite(), runs)

        # A run diverges at the step that produced a non-finite value: the parameters of step − 1
        # whose loss is non-finite, or a non-finite update, which is not applied. Either way the
        # run is frozen at its last finite parameters. Bookkeeping stays on the device; the
        # optimiser reads back one bool per step.
        opt.advance(params)
        loss, updated = shards.step(loss_and_grads, update, params)
        record.check(step - 1, loss.isfinite())
        record.check(step, updated)
        lr.masked_fill_(~record.alive, 0.0)     # no Langevin noise for a frozen run
        noise.langevin(params, lr, step)
        train_seconds += time.perf_counter() - begun
        if step % log_every == 0 or step % steps == 0:
            log(step)
            lr.masked_fill_(~record.alive, 0.0)
        if step % steps == 0 and task + 1 < tasks.count:       # the next task of the sequence
            task += 1
            x, y, x_test, y_test, probe = pack.task_data(task)
            shrink_and_perturb(rp, params, cfgs, task, record.alive)
        if pack.checkpoint is not None and every and step % every == 0 and step < total:
            pack.save(i, step, pack_state)
        if on_step is not None:
            on_step(1)
    thresholds = critical.at_end(model, rp, params, x, y, ds.task, first.metrics, record.alive,   # {column: (R,)}
                                 pack.split.share)
    final = net()
    with torch.no_grad():
        arrays = model.run_arrays(final, probe)                      # {name: (R, ...)}: the run's figures
        kept = rp.network(record.kept) if not bool(record.alive.all()) else final
    for r, outcome in enumerate(record.outcomes):
        if outcome.status == "finished":
            outcome.state = model.run_state(final, r)
            outcome.arrays = {k: v[r].cpu() for k, v in arrays.items()}
            outcome.rows[-1].update({k: float(v[r]) for k, v in thresholds.items()})
        elif outcome.rows:   # diverged: the parameters of its last row, which is its row in runs.csv
            outcome.state = {**model.run_state(kept, r), **{k: v[r].cpu().clone() for k, v in record.kept_stats.items()}}
    return record.outcomes, train_seconds


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


def distinct_runs(theta: dict[str, torch.Tensor]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(the first run holding each distinct network, the index of each run's network among
    those) when some runs hold bit-for-bit the same parameters (θ (R, ...) per name), else None.
    Bits, not values: +0.0 and −0.0 are different networks here, and so are two NaNs of different
    bits. Runs with the same sums of their bits are compared whole with the first of them (a run
    that differs keeps its own evaluation), in chunks of runs: θ is never copied whole."""
    bits = [v.detach().reshape(len(v), -1).view(_BITS[v.element_size()]) for v in theta.values()]
    sums = torch.stack([b.sum(1, dtype=torch.int64) for b in bits], dim=1).tolist()     # (R, names)
    seen: dict[tuple, int] = {}
    twin = torch.tensor([seen.setdefault(tuple(key), run) for run, key in enumerate(sums)], device=bits[0].device)
    runs = torch.arange(len(twin), device=twin.device)
    if bool((twin == runs).all()):
        return None
    step = max(1, memory.EVAL_BYTES // max(1, sum(b.shape[1] * (b.element_size() + 1) for b in bits)))   # a gathered copy, a bool
    for start in range(0, len(twin), step):
        part = slice(start, start + step)
        same = torch.stack([(b[part] == b[twin[part]]).all(1) for b in bits]).all(0)
        twin[part] = torch.where(same, twin[part], runs[part])
    firsts, index = torch.unique(twin, return_inverse=True)      # sorted: each network's first run
    return (firsts, index) if len(firsts) < len(twin) else None


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}   # a value's bits, as an integer of its size


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
        row["train_accuracy"] = (metrics.top(out) == y).double().flatten(1).mean(-1)
    probe_features = features
    if x_test is not None:
        out_test, probe_features = model.forward_penultimate(params, x_test)
        row["test_loss"] = loss_per_run(out_test, y_test, task)
        if task == "classification":
            row["accuracy"] = (metrics.top(out_test) == y_test).double().flatten(1).mean(-1)
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
