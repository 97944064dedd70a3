"""symrun.analysis.linalg: batched small eigenproblems spread over threads give torch.linalg's answers."""

import torch

from symrun.analysis import linalg


def test_spread_eigenvalues_and_vectors_equal_torch_linalg():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, 6, 6, generator=g, dtype=torch.float64)
    a = a @ a.mT                                                              # (5, 7) batch of 6 × 6
    values = linalg.eigvalsh(a)
    assert values.shape == (5, 7, 6)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(a), rtol=1e-12, atol=1e-12)
    lam, vec = linalg.eigh(a)
    assert lam.shape == (5, 7, 6) and vec.shape == (5, 7, 6, 6)
    torch.testing.assert_close(vec @ torch.diag_embed(lam) @ vec.mT, a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(vec.mT @ vec, torch.eye(6, dtype=torch.float64).expand(5, 7, 6, 6), rtol=0, atol=1e-12)
    one = a[0, 0]                                                             # a single matrix: as is
    torch.testing.assert_close(linalg.eigvalsh(one), torch.linalg.eigvalsh(one))
    torch.testing.assert_close(linalg.eigvalsh(a[:1, :1]), torch.linalg.eigvalsh(a[:1, :1]))


def test_a_forked_child_gets_its_own_workers():
    import multiprocessing

    a = torch.randn(4, 3, 3, dtype=torch.float64)
    a = a @ a.mT
    linalg.eigvalsh(a)                                   # the parent's workers exist now
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:                            # would wait forever on the parent's dead threads
        values = pool.apply_async(linalg.eigvalsh, (a,)).get(timeout=60)
    torch.testing.assert_close(values, torch.linalg.eigvalsh(a), rtol=1e-12, atol=1e-12)


def test_each_worker_solves_on_one_intra_op_thread_and_the_caller_keeps_its_own():
    """A worker left at torch's thread count let MKL start an OpenMP team under it, which slowed
    every later torch op of the process about threefold: each worker runs on one thread, and the
    caller's count is what it was."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    seen = []

    def solve(part):
        seen.append(torch.get_num_threads())
        return torch.linalg.eigvalsh(part)

    try:
        a = torch.randn(8, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(linalg._spread(solve, a @ a.mT), torch.linalg.eigvalsh(a @ a.mT))
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
