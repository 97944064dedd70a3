"""A batched matmul through numpy's BLAS, for a CPU pack's step when each thread runs one kernel thread.

A pack's batched products are many small GEMMs: W1's step multiplies, per run, 128 × 64 by
64 × 64 (and its gradients). On a 2-core AMD EPYC, one thread each, torch's CPU
`bmm` (MKL) does these at 40–65 GFLOP/s and numpy's `matmul` (OpenBLAS, one `gemm` per matrix)
at 80–110, the same shapes back to back; together the five products of a 128-run W1 chunk take
6.3 ms through torch and 3.4 ms through numpy. numpy releases the GIL in `matmul`, so the
parts' threads (symrun.training.shards) run side by side as they do in torch's kernels. The
same holds for an evaluation's larger products (symrun.training.engine.evaluate, in chunks of runs
on the same threads): the full-batch first layer, 3,584 × 64 by 64 × 1,797, takes 21 ms through
torch and 9 ms through numpy.

On an Intel CPU, where MKL is at home, torch's products are as fast as numpy's (W1's five
products of a 128-run chunk: 3.4 ms either way on a 2-core Xeon with AMX), and a hand-written
step (MLP.loss_and_grads) is faster through torch: 6.6 against 7.8 ms a chunk, as numpy's route
copies the transposed operand that MKL reads as it is. So the numpy route is skipped where
torch's BLAS is MKL on an Intel CPU (`NUMPY_ROUTE`); elsewhere it is taken only inside
`one_thread_blas`, which a pack enters when its parts run one kernel thread each
(symrun.training.shards.Split.active): there numpy's BLAS is held to one thread too, as torch's
are. Outside it (a pack on every core, a GPU, `symrun check`) `matmul` is torch.matmul. Its backward is `matmul` again, so products through it differentiate
twice (Hessian-vector products) as torch.matmul does.
"""

from __future__ import annotations

import math
import platform
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

_ONE_THREAD = False     # inside one_thread_blas: numpy's BLAS is held to one thread
NUMPY_OP = "symrun::numpy"  # what a profile calls the numpy kernels a hand-written step calls directly


def _vendor() -> str:
    """The CPU's vendor string (GenuineIntel, AuthenticAMD, …), or "" where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "GenuineIntel" if "intel" in platform.processor().lower() else ""


NUMPY_ROUTE = not (torch.backends.mkl.is_available() and _vendor() == "GenuineIntel")


def _transposed(a: np.ndarray) -> bool:
    """Whether each matrix of `a` is stored column by column (a transposed view), not row by row."""
    if a.ndim < 2 or a.shape[-1] == 1 or a.shape[-2] == 1:
        return False
    return a.strides[-2] == a.itemsize and a.strides[-1] != a.itemsize


def _product(a: np.ndarray, b: np.ndarray, rows: bool = False) -> np.ndarray:
    """a @ b through numpy. OpenBLAS runs a small GEMM with exactly one transposed operand at
    about half speed, so then the fewer values are copied first: the transposed operand, row by
    row (W1's first layer, 128 × 64 by a transposed 64 × 64 batch: 2.2 ms for 128 runs, against
    1.3 ms after a 0.2 ms copy), or the other, to compute (bᵀ aᵀ)ᵀ (an evaluation's (R, N, 128)
    features, stored feature-major, by (R, 128, 30): 23 ms as they are, 12 ms so). Two
    transposed operands (a product of transposes) go as they are. `rows`: the result row by row,
    as np.matmul makes it, so (bᵀ aᵀ)ᵀ also copies its result: W1's output-layer gradient, 10 × 64
    by the transposed 128 × 64 activations, goes that way (128 runs on a 2-core AMD EPYC: 0.50 ms,
    against 0.95 ms copying the activations)."""
    if _transposed(a) == _transposed(b):
        return np.matmul(a, b)
    transposed, other = (a, b) if _transposed(a) else (b, a)
    result = math.prod(a.shape[:-1]) * b.shape[-1] if rows else 0     # the values of a @ b
    if transposed.size <= other.size + result:
        return np.matmul(_rows(a), _rows(b))
    out = np.matmul(_rows(b.swapaxes(-1, -2)), _rows(a.swapaxes(-1, -2))).swapaxes(-1, -2)
    return np.ascontiguousarray(out) if rows else out


def _rows(a: np.ndarray) -> np.ndarray:
    """`a`, its matrices copied row by row when it is a transposed view."""
    return np.ascontiguousarray(a) if _transposed(a) else a


class _NumpyMatmul(torch.autograd.Function):
    """a @ b for batches of the same shape, (..., n, k) @ (..., k, m), through numpy's BLAS. The
    operands are saved as given, so the backward's products take their transposes as they are
    stored (the transpose of a view copied for the forward is row by row again)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return torch.from_numpy(_product(a.detach().numpy(), b.detach().numpy()))

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return (matmul(grad, b.mT) if ctx.needs_input_grad[0] else None,
                matmul(a.mT, grad) if ctx.needs_input_grad[1] else None)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.matmul(a, b); through numpy for CPU float32/float64 matrices, or batches of them with
    the same batch shape, inside `one_thread_blas` on one kernel thread."""
    if _numpy_route(a, b):
        return _NumpyMatmul.apply(a, b)
    return torch.matmul(a, b)


def matmul_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`matmul` without autograd, its result stored row by row (contiguous), as torch.matmul's
    is: for a hand-written backward's weight gradients, which the optimiser then reads in the
    parameter's own layout."""
    if _numpy_route(a, b):
        with torch.profiler.record_function(NUMPY_OP):
            return torch.from_numpy(_product(a.numpy(), b.numpy(), rows=True))
    return torch.matmul(a, b)


def _numpy_route(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a @ b goes through numpy here: see the module's docstring."""
    return (_ONE_THREAD and NUMPY_ROUTE and a.dim() >= 2 and b.dim() == a.dim() and a.shape[:-2] == b.shape[:-2]
            and a.device.type == "cpu" and a.dtype == b.dtype and a.dtype in (torch.float32, torch.float64)
            and torch.get_num_threads() == 1)


@contextmanager
def one_thread_blas() -> Iterator[None]:
    """While a pack's step runs one kernel thread per Python thread: numpy's BLAS on one thread
    (it would otherwise start its own threads on every product), and `matmul` through it."""
    global _ONE_THREAD
    from threadpoolctl import threadpool_limits

    before = _ONE_THREAD
    with threadpool_limits(limits=1, user_api="blas"):
        _ONE_THREAD = True
        try:
            yield
        finally:
            _ONE_THREAD = before
