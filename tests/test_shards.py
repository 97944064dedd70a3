"""symrun.training.shards: a CPU pack trained as parts over threads, each part's step in chunks
of runs, gives every run the numbers the plain pack gives, whichever thread ran its evaluations
and λ_c; its checkpoint is the pack's whatever its parts, so it resumes on any number of threads;
the parts cover every run once, a seed's runs together; a finished part helps the others with
the pieces they share; a failure or an interruption in any part stops them all, with its own
error."""

import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_same_run
from symrun.models.nets import cpu
from symrun.models.nets.hadamard import Hadamard
from symrun.sweeping import sweep
from symrun.training import engine, memory, shards
from symrun.training.shards import Shards, Split


def _configs(*args: str):
    return list(sweep.plan(["device=cpu", "train.dtype=float64", *args], Path("unused")).configs.values())


CASES = {
    "mlp, minibatches, momentum, label flips": [
        "model=mlp", "model.width=12", "data=digits", "data.batch_size=16", "optim.momentum=0.9", "optim.lr=0.05",
        "noise.label_flip=0,0.2", "optim.weight_decay=0,0.01", "seed=range(0,5)", "train.steps=40", "train.log_every=20"],
    "factorization, full batch, diverging runs, Langevin noise": [
        "model=factorization", "optim.lr=0.05,3", "noise.temperature=0,0.001", "optim.weight_decay=0,0.01",
        "seed=range(0,5)", "train.steps=40", "train.log_every=10"],
    "hadamard, symmetry removal, adam": [
        "model=hadamard", "optim.name=adam", "optim.lr=0.01", "symmetry.remove=true", "optim.weight_decay=0,0.02",
        "seed=range(0,10)", "train.steps=30", "train.log_every=15"],
    "linear under DCS, adamw": [
        "experiment=dcs", "constraint.enforce=true", "optim.name=adamw", "optim.lr=0.01", "optim.weight_decay=0,0.1",
        "seed=range(0,10)", "train.steps=30", "train.log_every=15"],
}


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _cut(monkeypatch, bytes_per_chunk: int = 1):
    """Two parts of any pack (on two threads), their steps in chunks of about `bytes_per_chunk`
    (one run each by default: a run's step is more than a byte)."""
    monkeypatch.setattr(shards, "MIN_THREAD_RUNS", 1)
    monkeypatch.setattr(shards, "MIN_THREAD_BYTES", 1)
    monkeypatch.setattr(shards, "CHUNK_BYTES", bytes_per_chunk)


def _whole(monkeypatch):
    """One part, one chunk: the plain step over the whole pack."""
    monkeypatch.setattr(shards, "MIN_THREAD_RUNS", 10**9)
    monkeypatch.setattr(shards, "CHUNK_BYTES", 10**15)


def _spy(monkeypatch, cls) -> list:
    """Every instance of `cls` made from here on."""
    seen, real = [], cls.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self)

    monkeypatch.setattr(cls, "__init__", spy)
    return seen


@pytest.mark.parametrize("case", list(CASES))
def test_a_pack_trained_as_parts_in_chunks_equals_the_plain_pack(case, two_threads, monkeypatch):
    cfgs = _configs(*CASES[case])
    assert len(cfgs) >= 20
    _whole(monkeypatch)
    plain = engine.train_pack(cfgs)
    splits, chunked = _spy(monkeypatch, Split), _spy(monkeypatch, Shards)
    _cut(monkeypatch, bytes_per_chunk=10**4)
    # the MLP's batched products go through numpy's BLAS on one kernel thread each (the route a
    # CPU not made by Intel takes; taken here on any CPU)
    monkeypatch.setattr(cpu, "NUMPY_ROUTE", True)
    products = []
    apply = cpu._NumpyMatmul.apply
    monkeypatch.setattr(cpu._NumpyMatmul, "apply", lambda a, b: products.append(1) or apply(a, b))
    cut = engine.train_pack(cfgs)
    (split,) = splits
    assert split.threads == 2 and all(len(s.chunks) > 1 for s in chunked)    # really split, really chunked
    assert bool(products) == case.startswith("mlp")
    assert {o.status for o in plain} >= ({"finished", "diverged"} if "diverging" in case else {"finished"})
    for got, want in zip(cut, plain):
        assert got.diverged_at == want.diverged_at
        assert_same_run(got, want, rtol=1e-12, atol=1e-14)


def test_a_part_helped_by_a_finished_part_gets_the_numbers_of_the_plain_pack(two_threads, monkeypatch):
    cfgs = _configs(*CASES["mlp, minibatches, momentum, label flips"])
    _whole(monkeypatch)
    plain = engine.train_pack(cfgs)
    splits = _spy(monkeypatch, Split)
    _cut(monkeypatch, bytes_per_chunk=10**4)
    monkeypatch.setattr(memory, "EVAL_BYTES", 2**20)     # evaluations and λ_c in several chunks of runs
    # the caller's part starts once the other has finished: that thread is free the whole time
    second_done, real = threading.Event(), engine._train_part

    def train_part(pack, i):
        if i == 0:
            assert second_done.wait(60)
        try:
            return real(pack, i)
        finally:
            second_done.set()
    monkeypatch.setattr(engine, "_train_part", train_part)
    helped = engine.train_pack(cfgs)
    (split,) = splits
    assert split.threads == 2 and split.helped > 0
    for got, want in zip(helped, plain):
        assert_same_run(got, want, rtol=1e-12, atol=1e-14)


def _part_threads() -> list[str]:
    """The names of the parts' threads still alive."""
    return [t.name for t in threading.enumerate() if t.name.startswith("symrun-part")]


def _two_parts(monkeypatch) -> Split:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    split = Split([0, 1], torch.device("cpu"), 10**9)
    monkeypatch.setattr(split, "threads", 2)
    monkeypatch.setattr(split, "_barrier", threading.Barrier(2))
    return split


def test_shared_pieces_come_back_in_order_some_run_by_the_finished_part(monkeypatch):
    split = _two_parts(monkeypatch)
    ran, helper_started = {}, threading.Event()

    def piece(k: int) -> int:
        ran[k] = threading.current_thread().name
        if ran[k] == "MainThread":
            helper_started.set()
        else:                          # the offering part holds on until the finished one has taken one
            helper_started.wait(10)
        return k * k

    def train(i: int):
        return [] if i == 0 else split.share([lambda k=k: piece(k) for k in range(6)])

    assert split.run(train) == [[], [k * k for k in range(6)]]
    assert set(ran) == set(range(6)) and "MainThread" in ran.values() and "symrun-part-1" in ran.values()
    assert split.helped == list(ran.values()).count("MainThread")
    assert _part_threads() == []


def test_a_shared_piece_that_fails_on_the_helping_thread_fails_the_part_that_offered_it(monkeypatch):
    split = _two_parts(monkeypatch)
    helper_failed = threading.Event()

    def piece(k: int) -> int:
        if threading.current_thread().name == "MainThread":
            helper_failed.set()
            raise FloatingPointError("piece failed")
        helper_failed.wait(10)
        return k

    def train(i: int):
        return [] if i == 0 else split.share([lambda k=k: piece(k) for k in range(4)])

    with pytest.raises(FloatingPointError, match="piece failed"):
        split.run(train)
    assert helper_failed.is_set()
    assert _part_threads() == []


def test_a_part_stops_taking_its_shared_pieces_once_another_has_failed(monkeypatch):
    split = _two_parts(monkeypatch)
    ran = []

    def piece(k: int) -> int:
        ran.append(k)
        time.sleep(0.01)
        return k

    def train(i: int):
        if i == 0:
            time.sleep(0.1)
            raise FloatingPointError("part failed")
        return split.share([lambda k=k: piece(k) for k in range(500)])    # 5 s, one after another

    with pytest.raises(FloatingPointError, match="part failed"):
        split.run(train)
    taken = len(ran)
    time.sleep(0.05)
    assert 0 < taken == len(ran) < 100
    assert _part_threads() == []


class Stop(Exception):
    pass


def _stop_at(steps: int):
    """An on_step that raises Stop once `steps` steps are done."""
    seen = [0]

    def on_step(n: int) -> None:
        seen[0] += n
        if seen[0] == steps:
            raise Stop
    return on_step


@pytest.mark.parametrize("parts_before, parts_after", [(2, 2), (2, 1), (1, 2)])
def test_a_pack_resumes_from_its_checkpoint_as_if_never_stopped_on_any_number_of_threads(
        parts_before, parts_after, two_threads, monkeypatch, tmp_path):
    cfgs = _configs(*CASES["mlp, minibatches, momentum, label flips"], "train.checkpoint_every=10")
    _whole(monkeypatch)
    whole = engine.train_pack(cfgs)
    ckpt = tmp_path / "pack.pt"
    splits = _spy(monkeypatch, Split)
    _cut(monkeypatch, bytes_per_chunk=10**4) if parts_before == 2 else _whole(monkeypatch)
    with pytest.raises(Stop):
        engine.train_pack(cfgs, on_step=_stop_at(25), checkpoint=ckpt)
    _cut(monkeypatch, bytes_per_chunk=10**4) if parts_after == 2 else _whole(monkeypatch)
    resumed = engine.train_pack(cfgs, checkpoint=ckpt)
    assert [s.threads for s in splits] == [parts_before, parts_after]
    assert all(o.resumed_from == 20 for o in resumed)
    for got, want in zip(resumed, whole):
        assert_same_run(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("seeds, run_bytes, threads", [
    (list(range(1)), 10, 2), (list(range(31)), 10, 2), ([s for _ in range(8) for s in range(8)], 10, 2),
    (list(range(64)), 17_000, 2), ([s for _ in range(8) for s in range(32)], 250_000, 2),
    ([s for s in range(5) for _ in range(200)], 250_000, 2), ([s for _ in range(17) for s in range(256)], 17_000, 4),
    (list(range(7)), 10**9, 1)])
def test_the_parts_cover_every_run_once_a_seeds_runs_together(seeds, run_bytes, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    runs = len(seeds)
    split = Split(seeds, torch.device("cpu"), run_bytes)
    assert sorted(r for part in split.parts for r in part) == list(range(runs))
    assert all(part == sorted(part) for part in split.parts)
    assert split.threads == len(split.parts) == max(1, min(threads, runs // shards.MIN_THREAD_RUNS,
                                                           runs * run_bytes // shards.MIN_THREAD_BYTES))
    sizes = [len(part) for part in split.parts]
    assert max(sizes) - min(sizes) <= 1                                      # balanced
    # a seed is cut only where a boundary between parts falls inside its runs
    parts_of = {s: {i for i, part in enumerate(split.parts) for r in part if seeds[r] == s} for s in seeds}
    assert sum(len(p) - 1 for p in parts_of.values()) <= split.threads - 1
    assert Split(seeds, torch.device("cpu"), run_bytes, allowed=False).threads == 1
    chunked = Shards(runs, torch.device("cpu"), run_bytes)
    assert [r for s in chunked.chunks for r in range(runs)[s]] == list(range(runs))
    if len(chunked.chunks) > 1:                                              # cut for the cache
        assert max(s.stop - s.start for s in chunked.chunks) * run_bytes <= 1.01 * shards.CHUNK_BYTES + run_bytes


def test_a_failure_in_any_part_stops_the_pack_with_its_own_error(two_threads, monkeypatch):
    _cut(monkeypatch)
    cfgs = _configs("model=hadamard", "seed=range(0,8)", "train.steps=50", "train.log_every=50")
    real, trained = Hadamard.loss_and_grads, []

    def loss_and_grads(self, params, *args):                            # a training chunk: one run each
        trained.append(threading.current_thread().name)
        if trained.count("symrun-part-1") == 9:   # in the second part's third step
            raise FloatingPointError("chunk failed")
        return real(self, params, *args)

    monkeypatch.setattr(Hadamard, "loss_and_grads", loss_and_grads)
    with pytest.raises(FloatingPointError, match="chunk failed"):
        engine.train_pack(cfgs)
    assert len(set(trained)) == 2                                            # both parts trained
    assert len(trained) < 4 * 50                                             # the first stopped within a few steps
    assert torch.get_num_threads() == 2                                      # the machine's threads again
    assert _part_threads() == []


def test_an_interruption_in_the_callers_part_stops_every_part_before_the_error_is_raised(two_threads, monkeypatch):
    _cut(monkeypatch, bytes_per_chunk=10**15)
    cfgs = _configs("model=hadamard", "seed=range(0,8)", "train.steps=2000", "train.log_every=2000")
    real, trained, other_started = Hadamard.loss_and_grads, [], threading.Event()

    def loss_and_grads(self, params, *args):
        name = threading.current_thread().name
        trained.append(name)
        if name != "MainThread":
            other_started.set()
        elif trained.count(name) == 5:      # the interruption comes while both parts train (a busy host
            other_started.wait(30)          # can start the other's thread after the caller's 5 steps)
        return real(self, params, *args)

    monkeypatch.setattr(Hadamard, "loss_and_grads", loss_and_grads)
    with pytest.raises(Stop):                                        # as a Ctrl-C would, in the caller's thread
        engine.train_pack(cfgs, on_step=_stop_at(5))
    assert trained.count("MainThread") == 5
    assert 0 < trained.count("symrun-part-1") < 2000                          # stopped, not run to its end
    assert _part_threads() == []


def test_an_interruption_while_the_caller_waits_for_the_other_parts_stops_them(monkeypatch):
    split = _two_parts(monkeypatch)
    steps = []

    def train(i: int) -> None:
        for _ in range(0 if i == 0 else 1000):          # the caller's part ends at once; the other takes 10 s
            split.check()
            steps.append(i)
            time.sleep(0.01)

    def interrupt(*_):
        raise Stop
    before = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.2)                       # as a Ctrl-C would, in the caller's thread
    try:
        with pytest.raises(Stop):
            split.run(train)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
    taken = len(steps)
    time.sleep(0.1)
    assert 0 < taken == len(steps) < 500                                     # stopped, not run to its end
    assert _part_threads() == []
