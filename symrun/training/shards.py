"""A CPU pack's training cut two ways: into parts, one per core, each trained as its own loop
side by side (`Split`); and each part's step into chunks of runs that fit the cache (`Shards`).

On a CPU, torch splits each op of a step over its intra-op threads; for a pack's small batched
GEMMs and elementwise ops that split costs more than it gains, and a pack of hundreds of runs
outgrows the caches (W1 on this project's 2-core machine: 256 runs take 14 ms a step on 2
intra-op threads, 21 ms on one, while 64 runs take 4.1 ms on one). Runs are independent — a
run's numbers never depend on the runs it trains beside (symrun.training.engine) — so a pack on T
threads trains as T parts, each its whole training loop over its own runs (every step, the
evaluations, λ_c at the end) on one Python thread with the cores shared out as intra-op threads:
torch releases the GIL inside its kernels, so the parts run side by side. They meet only where
the pack must be whole, at a checkpoint (`Split.meet`).

Parts, rather than the pack's step handed out to the threads in chunks and gathered every step:
then the threads wait for each other a thousand times, a step's own bookkeeping (minibatches,
labels, divergence checks) runs on one thread while the others idle, and on a virtual machine a
core that idles every few milliseconds comes back to cold caches. W1, 256 runs, 1,000 steps on 2
cores: 9.3–10.3 s of steps stepped together, 7.2–8.2 s as two parts.

Runs of a seed go to one part where they can: they share a minibatch stream, and a grid over
weight decay starts them as one network, evaluated once at step 0.

Parts are even in runs, not in time: on a shared virtual machine one core may run 10–15 % slower
than the other for a whole pack, so one part can end its steps a second after the other. A part's
work that comes as independent pieces — its evaluations in chunks of runs, λ_c in chunks of runs —
is offered to the other threads (`Split.share`): a thread whose part has finished takes pieces
of the parts still going, instead of idling while they end. A piece gives the same numbers on
any thread (each runs its kernels on `each` intra-op threads).

Within a part, its step goes as chunks of runs (about CHUNK_BYTES each), each chunk's forward,
backward and update one after another while its tensors are in cache. A chunk's parameters are
views of the part's (no copy), updated in place, made through `.data` so that each has its own
version counter: a chunk updating its runs in place must not look, to autograd, like a change
to what another chunk's forward saved (it is not: chunks share no parameter memory).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch

from symrun.models.nets.cpu import one_thread_blas
from symrun.seeds import by_seed

Params = dict[str, torch.Tensor]
R = TypeVar("R")

CHUNK_BYTES = 32 * 2**20       # a chunk's parameters (4 copies: ρ, gradient, buffers) and activations
MIN_THREAD_RUNS = 32           # fewer runs than this per part are not worth a thread,
MIN_THREAD_BYTES = 4 * 2**20   # nor less work than this per step
MAX_THREADS = 8                # parts at most (their Python shares the GIL); on a machine with
                               # more cores each part gets cores // parts intra-op threads

LossAndGrads = Callable[[Params, slice], tuple[torch.Tensor, list[torch.Tensor]]]
Update = Callable[[Params, list[torch.Tensor], torch.Tensor, slice], torch.Tensor]


class Stopped(Exception):
    """Raised in a part when another part has failed or been interrupted (`Split.check`)."""


class Split:
    """A pack's parts: `parts[i]`, the runs (indices into the pack, ascending) thread i trains.
    One part on a GPU, for a model whose forward must not run on two threads at once, and for a
    pack too small to be worth a thread."""

    def __init__(self, seeds: list[int], device: torch.device, run_bytes: int, allowed: bool = True):
        """`seeds`: each run's; `run_bytes`: what one run's step touches (`chunk_bytes`);
        `allowed`: whether the model's forward may run on several threads at once
        (PackedModel.threadsafe)."""
        runs = len(seeds)
        self.cpu = device.type == "cpu" and allowed
        self.intra = torch.get_num_threads()           # the machine's intra-op threads (`active` shares them out)
        self.threads = max(1, min(self.intra, MAX_THREADS, runs // MIN_THREAD_RUNS,
                                  runs * run_bytes // MIN_THREAD_BYTES)) if self.cpu else 1
        place = by_seed(seeds)[1]                      # each run's seed's place among the pack's seeds
        grouped = sorted(range(runs), key=place.__getitem__)
        bounds = [i * runs // self.threads for i in range(self.threads + 1)]
        self.parts = [sorted(grouped[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        self._stop = threading.Event()
        self._barrier = threading.Barrier(self.threads, action=self._act)
        self._offered = threading.Condition()          # guards _shared and _training
        self._shared: list[_Pieces] = []               # pieces parts have offered (`share`)
        self._training = 0                             # parts not yet finished (`run`)
        self.helped = 0                                # pieces run by a thread other than their part's
        self._met: list[Any] = [None] * self.threads
        self._action: Callable[[list[Any]], None] = lambda values: None

    @property
    def each(self) -> int:
        """Intra-op threads of each part's kernels: the machine's, shared out."""
        return max(1, self.intra // self.threads)

    @contextmanager
    def active(self) -> Iterator["Split"]:
        """While a pack trains: `each` intra-op threads (the machine's again afterwards), and
        where that is one, numpy's BLAS on one thread too (symrun.models.nets.cpu)."""
        with one_thread_blas() if self.cpu and self.each == 1 else nullcontext():
            if self.threads == 1:
                yield self
                return
            torch.set_num_threads(self.each)
            try:
                yield self
            finally:
                torch.set_num_threads(self.intra)

    def run(self, train: Callable[[int], R]) -> list[R]:
        """[train(i) for each part i], part i on thread i (the first on the caller's), side by
        side; a thread whose part has finished helps the others with what they `share`. A part
        that raises stops the others at their next step (`check`), meeting or shared piece; once
        every thread has stopped, the first error raised (a Ctrl-C in the caller's included) is
        raised."""
        if self.threads == 1:
            return [train(0)]
        done: list[Any] = [None] * self.threads
        errors: list[BaseException] = []
        finished = [threading.Event() for _ in range(1, self.threads)]
        self._training = self.threads

        def part(i: int) -> None:
            try:
                done[i] = train(i)
            except BaseException as e:  # noqa: BLE001 — handed to the caller's thread below
                errors.append(e)
                self._halt()
            finally:
                with self._offered:
                    self._training -= 1
                    self._offered.notify_all()
            self._help()

        def other(i: int) -> None:
            try:
                part(i)
            finally:
                finished[i - 1].set()

        threads = [threading.Thread(target=other, args=(i,), name=f"symrun-part-{i}") for i in range(1, self.threads)]
        for t in threads:
            t.start()
        # The caller waits on events, not on Thread.join: a join that a Ctrl-C interrupts marks
        # its thread as ended while it still runs (Python 3.11), and a second join returns at once.
        try:
            part(0)
            for f in finished:
                f.wait()
        except BaseException:           # a Ctrl-C while the caller waits for the others: stop them too
            self._halt()
            for f in finished:
                f.wait()
            raise
        finally:
            for t in threads:           # each has handed its part in: it ends at once
                t.join()
        if errors:      # the first cause, not a part stopped by it
            raise next((e for e in errors if not isinstance(e, (Stopped, threading.BrokenBarrierError))), errors[0])
        return done

    def check(self) -> None:
        """Raise Stopped when another part has failed: called by each part once a step."""
        if self._stop.is_set():
            raise Stopped

    def share(self, pieces: list[Callable[[], R]]) -> list[R]:
        """[piece() for piece in pieces], called by a part for independent pieces of its work:
        it runs them in order, and threads whose parts have finished take some. The first error
        a piece raised is raised here; Stopped if another part fails meanwhile."""
        if self.threads == 1 or len(pieces) < 2:
            return [piece() for piece in pieces]
        offer = _Pieces(pieces)
        with self._offered:
            self._shared.append(offer)
            self._offered.notify_all()
        try:
            while (k := self._take(offer)) is not None:
                self._run(offer, k)
            with self._offered:
                while not offer.complete():
                    if self._stop.is_set():
                        raise Stopped
                    self._offered.wait()
        finally:
            with self._offered:
                self._shared.remove(offer)
        return offer.results()

    def _take(self, offer: "_Pieces") -> Optional[int]:
        """The next piece of `offer` for the part that offered it; None once all are taken, or
        when a part has failed (`share` then raises Stopped)."""
        with self._offered:
            return None if self._stop.is_set() else offer.take()

    def _run(self, offer: "_Pieces", k: int) -> None:
        """Piece k of `offer`, its result or error kept for the part that offered it; an error
        that is not an Exception (a Ctrl-C on the thread running it) also goes on up this
        thread."""
        error: Optional[BaseException] = None
        try:
            out = offer.pieces[k]()
        except BaseException as e:  # noqa: BLE001 — handed to the part that offered it
            error = e
        with self._offered:
            offer.end(k, None if error is not None else out, error)
            self._offered.notify_all()
        if error is not None and not isinstance(error, Exception):
            raise error

    def _help(self) -> None:
        """Run pieces other parts offer until every part has finished or one has failed."""
        while True:
            with self._offered:
                while True:
                    if self._stop.is_set() or self._training == 0:
                        return
                    found = next(((o, k) for o in self._shared if (k := o.take()) is not None), None)
                    if found is not None:
                        break
                    self._offered.wait()
                self.helped += 1
            self._run(*found)

    def _halt(self) -> None:
        """Stop every part at its next step, meeting or wait for a shared piece."""
        self._stop.set()
        self._barrier.abort()
        with self._offered:
            self._offered.notify_all()

    def meet(self, i: int, value: Any, action: Callable[[list[Any]], None]) -> None:
        """Part i hands `value` over and waits for every part to hand theirs; then one of them
        runs action([value of part 0, part 1, …]) while the others wait, and all go on."""
        self._met[i], self._action = value, action
        self._barrier.wait()

    def _act(self) -> None:
        self._action(self._met)


class _Pieces:
    """Pieces a part has offered (`Split.share`): which are taken, and each one's result or error.
    Taken under the split's lock; run outside it."""

    def __init__(self, pieces: list[Callable[[], Any]]):
        self.pieces, self.next, self.ended = pieces, 0, 0
        self.out: list[Any] = [None] * len(pieces)
        self.error: Optional[BaseException] = None

    def take(self) -> Optional[int]:
        if self.next == len(self.pieces) or self.error is not None:
            return None
        self.next += 1
        return self.next - 1

    def end(self, k: int, out: Any, error: Optional[BaseException]) -> None:
        self.ended += 1
        self.out[k] = out
        self.error = self.error or error

    def complete(self) -> bool:
        return self.ended == self.next and (self.next == len(self.pieces) or self.error is not None)

    def results(self) -> list[Any]:
        if self.error is not None:
            raise self.error
        return self.out


class Shards:
    """A part's step in chunks of runs, each within CHUNK_BYTES, one after another on its thread.
    One chunk is the plain step over the whole part (a GPU's)."""

    def __init__(self, runs: int, device: torch.device, run_bytes: int):
        chunks = max(1, min(runs, -(-runs * run_bytes // CHUNK_BYTES))) if device.type == "cpu" else 1
        bounds = [i * runs // chunks for i in range(chunks + 1)]
        self.chunks = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def step(self, loss_and_grads: LossAndGrads, update: Update, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """One training step: (loss (R,), the runs updated (R,) bool).

        Each chunk takes loss_and_grads(ρ of its runs, their slice) — their per-run losses and
        the gradients of their sum, one per parameter, in order — then update(ρ of its runs,
        their gradients, their losses, their slice), which updates those parameters in place and
        returns the runs it updated."""
        if len(self.chunks) == 1:
            loss, grads = loss_and_grads(params, slice(None))
            return loss, update(params, grads, loss, slice(None))
        first = next(iter(params.values()))
        loss = torch.empty(first.shape[0], dtype=first.dtype, device=first.device)
        updated = torch.empty(first.shape[0], dtype=torch.bool, device=first.device)
        for runs in self.chunks:
            leaves = {k: v.data[runs].requires_grad_() for k, v in params.items()}
            loss[runs], grads = loss_and_grads(leaves, runs)
            updated[runs] = update(leaves, grads, loss[runs], runs)
        return loss, updated


def chunk_bytes(params: int, activations: int, dtype_bytes: int) -> int:
    """What one run's step touches: its `params` four times (ρ, gradient, the update's
    temporaries) and its batch's `activations` (batch × the model's example_width)."""
    return (4 * params + activations) * dtype_bytes
