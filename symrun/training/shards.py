"""A CPU pack's training step in chunks of runs, spread over one thread per core.

On a CPU, torch splits each op of a step over its intra-op threads; for a pack's small batched
GEMMs and elementwise ops that split costs more than it gains, and a pack of hundreds of runs
outgrows the caches (W1 on this project's 2-core machine: 256 runs take 14 ms a step on 2
intra-op threads, 21 ms on one, while 64 runs take 4.1 ms on one). Runs are independent, so the
forward, backward and update of a step go instead as chunks of runs (about CHUNK_BYTES each),
each chunk's three done one after another while its tensors are in cache, the chunks shared out
over one Python thread per intra-op thread (at most MAX_THREADS), each with one intra-op thread
(or the cores shared out): torch releases the GIL inside its kernels and autograd's engine, so
the threads run side by side. Everything else of a step (minibatches, label and Langevin noise,
checkpoints) stays one pass over the pack. A log step's evaluation and λ_c at the end go over the
same threads (`map`), in chunks of runs.

A chunk's parameters are views of the pack's (no copy), updated in place. They are made through
`.data`, so that each has its own version counter: a chunk updating its runs in place must not
look, to autograd, like a change to what another chunk's forward saved (it is not: chunks share
no parameter memory).

A run's numbers do not depend on the chunks: each run's forward, backward and update are its
own slices of batched ops, as they are in a pack of another size.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from symrun.models.nets.cpu import one_thread_blas

Params = dict[str, torch.Tensor]
T, R = TypeVar("T"), TypeVar("R")

CHUNK_BYTES = 32 * 2**20       # a chunk's parameters (4 copies: ρ, gradient, buffers) and activations
MIN_THREAD_RUNS = 32           # fewer runs than this per thread are not worth a thread's handoff,
MIN_THREAD_BYTES = 4 * 2**20   # nor less work than this (Hadamard, 64 runs, 1.1 MiB: 0.37 ms a step
                               # plain, 0.98 ms over 2 threads; W1, 64 runs, 15 MiB: 4.0 → 3.1 ms)
MAX_THREADS = 8                # Python threads at most (their kernels' Python share the GIL); on a
                               # machine with more cores each gets cores // threads intra-op threads

LossAndGrads = Callable[[Params, slice], tuple[torch.Tensor, list[torch.Tensor]]]
Update = Callable[[Params, list[torch.Tensor], torch.Tensor, slice], torch.Tensor]


class Shards:
    """How a pack's step is cut: `threads` threads, each taking its `plan[i]` chunks of runs.
    One chunk on one thread is the plain step over the whole pack."""

    def __init__(self, runs: int, device: torch.device, run_bytes: int, allowed: bool = True):
        """`run_bytes`: what one run's step touches (`chunk_bytes`); `allowed`: whether the model's
        forward may run on several threads at once (PackedModel.threadsafe)."""
        self.cpu = device.type == "cpu" and allowed
        threads = max(1, min(torch.get_num_threads(), MAX_THREADS, runs // MIN_THREAD_RUNS,
                             runs * run_bytes // MIN_THREAD_BYTES)) if self.cpu else 1
        # whole rounds of one chunk per thread, each chunk within CHUNK_BYTES where it can be
        rounds = max(1, -(-runs * run_bytes // (CHUNK_BYTES * threads))) if self.cpu else 1
        chunks = min(runs, rounds * threads)
        self.threads = threads
        bounds = [i * runs // chunks for i in range(chunks + 1)]
        ranges = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        self.plan = [ranges[i::threads] for i in range(threads)]
        self._pool: ThreadPoolExecutor | None = None
        self.intra = torch.get_num_threads()           # the machine's intra-op threads (`active` sets them)

    @property
    def each(self) -> int:
        """Intra-op threads of each thread's kernels: the machine's, shared out."""
        return max(1, self.intra // self.threads)

    @property
    def plain(self) -> bool:
        return self.threads == 1 and len(self.plan[0]) == 1

    @contextmanager
    def active(self) -> Iterator["Shards"]:
        """While a pack trains: the threads after the first (the caller's), and `each` intra-op
        threads for each (the machine's again afterwards, for the metrics)."""
        with one_thread_blas() if self.cpu and self.each == 1 else nullcontext():
            if self.plain:
                yield self
                return
            torch.set_num_threads(self.each)
            if self.threads > 1:
                self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="symrun-shard")
            try:
                yield self
            finally:
                if self._pool is not None:
                    self._pool.shutdown()
                    self._pool = None
                torch.set_num_threads(self.intra)

    @contextmanager
    def every_thread(self) -> Iterator[None]:
        """Work inside the step loop that is one pass over the pack (a log step's metrics, a
        checkpoint): on every intra-op thread, as outside it."""
        if self.plain:
            yield
            return
        torch.set_num_threads(self.intra)
        try:
            yield
        finally:
            torch.set_num_threads(self.each)

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """[fn(item) for item in items], the items shared out over the threads, `each` intra-op
        threads each (a log step's evaluation in chunks of runs); in order. Plain: one after another."""
        items = list(items)
        if self._pool is None or len(items) < 2:
            return [fn(item) for item in items]
        intra = torch.get_num_threads()
        torch.set_num_threads(self.each)
        try:
            done = self._on_threads(lambda part: [fn(item) for item in part],
                                    [items[i::self.threads] for i in range(self.threads)])
        finally:
            torch.set_num_threads(intra)
        return [done[i % self.threads][i // self.threads] for i in range(len(items))]

    def _on_threads(self, work: Callable[[T], R], parts: list[T]) -> list[R]:
        """[work(part) for part in parts], part i on thread i (the first on the caller's); once
        every thread has stopped, the first error any of them raised is raised."""
        futures = [self._pool.submit(work, part) for part in parts[1:]] if self._pool else []
        try:
            mine = work(parts[0])
        finally:
            errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error
        return [mine] + [f.result() for f in futures]

    def step(self, loss_and_grads: LossAndGrads, update: Update, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step of the pack: (loss (R,), the runs updated (R,) bool).

        Each chunk takes loss_and_grads(ρ of its runs, their slice) — their per-run losses and
        the gradients of their sum, one per parameter, in order — then update(ρ of its runs,
        their gradients, their losses, their slice), which updates those parameters in place and
        returns the runs it updated."""
        if self.plain:
            loss, grads = loss_and_grads(params, slice(None))
            return loss, update(params, grads, loss, slice(None))
        first = next(iter(params.values()))
        loss = torch.empty(first.shape[0], dtype=first.dtype, device=first.device)
        updated = torch.empty(first.shape[0], dtype=torch.bool, device=first.device)

        def chunks(ranges: list[slice]) -> None:
            for runs in ranges:
                leaves = {k: v.data[runs].requires_grad_() for k, v in params.items()}
                loss[runs], grads = loss_and_grads(leaves, runs)
                updated[runs] = update(leaves, grads, loss[runs], runs)

        self._on_threads(chunks, self.plan)
        return loss, updated


def chunk_bytes(params: int, activations: int, dtype_bytes: int) -> int:
    """What one run's step touches: its `params` four times (ρ, gradient, the update's
    temporaries) and its batch's `activations` (batch × the model's example_width)."""
    return (4 * params + activations) * dtype_bytes
