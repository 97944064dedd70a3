"""symrun.training.shards: a CPU pack's step in chunks of runs over threads gives every run the
numbers the plain step over the whole pack gives; the chunks cover every run once; a failure in
any chunk's thread fails the step."""

import threading
from pathlib import Path

import pytest
import torch

from conftest import assert_same_run
from symrun.models.nets import cpu
from symrun.models.nets.hadamard import Hadamard
from symrun.sweeping import sweep
from symrun.training import engine, shards
from symrun.training.shards import Shards


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


def _chunked(monkeypatch, bytes_per_chunk: int = 1):
    """Chunks of about one run each (a run's step is more than a byte), over 2 threads."""
    monkeypatch.setattr(shards, "MIN_THREAD_RUNS", 1)
    monkeypatch.setattr(shards, "MIN_THREAD_BYTES", 1)
    monkeypatch.setattr(shards, "CHUNK_BYTES", bytes_per_chunk)


@pytest.mark.parametrize("case", list(CASES))
def test_a_pack_stepped_in_chunks_over_threads_equals_the_plain_step(case, two_threads, monkeypatch):
    cfgs = _configs(*CASES[case])
    assert len(cfgs) >= 20
    monkeypatch.setattr(shards, "MIN_THREAD_RUNS", 10**9)        # one thread, one chunk: the plain step
    monkeypatch.setattr(shards, "CHUNK_BYTES", 10**15)
    plain = engine.train_pack(cfgs)
    seen = []
    real = Shards.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        seen.append(self)

    monkeypatch.setattr(Shards, "__init__", spy)
    _chunked(monkeypatch, bytes_per_chunk=10**4)
    # the MLP's batched products go through numpy's BLAS on one kernel thread each (the route a
    # CPU not made by Intel takes; taken here on any CPU)
    monkeypatch.setattr(cpu, "NUMPY_ROUTE", True)
    products = []
    apply = cpu._NumpyMatmul.apply
    monkeypatch.setattr(cpu._NumpyMatmul, "apply", lambda a, b: products.append(1) or apply(a, b))
    chunked = engine.train_pack(cfgs)
    (cut,) = seen
    assert cut.threads == 2 and sum(map(len, cut.plan)) > 2                # really cut, really threaded
    assert bool(products) == case.startswith("mlp")
    assert {o.status for o in plain} >= ({"finished", "diverged"} if "diverging" in case else {"finished"})
    for got, want in zip(chunked, plain):
        assert got.diverged_at == want.diverged_at
        assert_same_run(got, want, rtol=1e-12, atol=1e-14)


def test_a_chunked_pack_resumes_from_its_checkpoint_as_if_never_stopped(two_threads, monkeypatch, tmp_path):
    _chunked(monkeypatch, bytes_per_chunk=10**4)
    cfgs = _configs(*CASES["mlp, minibatches, momentum, label flips"], "train.checkpoint_every=10")
    whole = engine.train_pack(cfgs)
    ckpt = tmp_path / "pack.pt"

    class Stop(Exception):
        pass

    def stop_at(n, seen=[0]):                                                # noqa: B006 — a counter
        seen[0] += n
        if seen[0] == 25:
            raise Stop
    with pytest.raises(Stop):
        engine.train_pack(cfgs, on_step=stop_at, checkpoint=ckpt)
    resumed = engine.train_pack(cfgs, checkpoint=ckpt)
    assert all(o.resumed_from == 20 for o in resumed)
    for got, want in zip(resumed, whole):
        assert_same_run(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("runs, run_bytes, threads", [(1, 10, 2), (31, 10, 2), (64, 10, 2), (64, 17_000, 2),
                                                      (64, 250_000, 2), (256, 250_000, 2), (1000, 250_000, 2),
                                                      (4352, 17_000, 4), (7, 10**9, 1)])
def test_the_chunks_cover_every_run_once_in_whole_rounds_of_the_threads(runs, run_bytes, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    cut = Shards(runs, torch.device("cpu"), run_bytes)
    covered = sorted(r for ranges in cut.plan for s in ranges for r in range(runs)[s])
    assert covered == list(range(runs))
    assert cut.threads == max(1, min(threads, runs // shards.MIN_THREAD_RUNS, runs * run_bytes // shards.MIN_THREAD_BYTES))
    sizes = [s.stop - s.start for ranges in cut.plan for s in ranges]
    assert max(sizes) - min(sizes) <= 1                                      # balanced
    assert len({len(ranges) for ranges in cut.plan}) == 1                    # every thread, as many chunks
    if len(sizes) > threads:                                                 # cut for the cache, not only the threads
        assert max(sizes) * run_bytes <= 1.01 * shards.CHUNK_BYTES + run_bytes
    assert Shards(runs, torch.device("cpu"), run_bytes, allowed=False).plain


def test_a_failure_in_any_chunks_thread_fails_the_step_with_its_own_error(two_threads, monkeypatch):
    _chunked(monkeypatch)
    cfgs = _configs("model=hadamard", "seed=range(0,8)", "train.steps=5", "train.log_every=5")
    real, trained = Hadamard.loss_and_grads, []

    def loss_and_grads(self, params, *args):                            # a training chunk: one run each
        trained.append(threading.current_thread().name)
        if len(trained) == 5:                     # a chunk of step 1 on whichever thread takes it
            raise FloatingPointError("chunk 5 failed")
        return real(self, params, *args)

    monkeypatch.setattr(Hadamard, "loss_and_grads", loss_and_grads)
    with pytest.raises(FloatingPointError, match="chunk 5 failed"):
        engine.train_pack(cfgs)
    assert len(set(trained)) == 2                                            # both threads trained
    assert torch.get_num_threads() == 2                                      # the machine's threads again
