"""Eigenvalues of batches of small symmetric matrices (Gram matrices, Hessian blocks) on the CPU,
one LAPACK call per matrix, spread over torch's threads.

Measured on this project's 2-core machine (torch 2.14, MKL): torch.linalg.eigvalsh of 256
matrices of 128 × 128 in float64 takes 0.2 s on one thread and 2.5–7 s on two, eigh of 256 of
64 × 64 0.1 s against 0.7 s: MKL spreads each small matrix over the OpenMP threads. So the batch
is split over as many workers as torch has threads, each on one intra-op thread, which also uses
every core. Same values: each matrix goes through the same routine.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

_pools: dict[int, ThreadPoolExecutor] = {}
# A forked child inherits the executors but not their threads: it must make its own.
os.register_at_fork(after_in_child=_pools.clear)


def eigvalsh(a: torch.Tensor) -> torch.Tensor:
    """torch.linalg.eigvalsh of (..., k, k): ascending eigenvalues (..., k)."""
    return _spread(torch.linalg.eigvalsh, a)


def eigh(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh of (..., k, k): (eigenvalues (..., k), eigenvectors (..., k, k))."""
    return _spread(torch.linalg.eigh, a)


def _on_one_thread(fn: Callable, part: torch.Tensor):
    """fn(part) on a worker with one intra-op thread. Left to torch's count, MKL started an OpenMP
    team under each worker, and every later torch op of the process ran ~3× slower (a W1 training
    loop after one evaluation: 0.34 → 1.1 s a run); the caller sets its count back afterwards."""
    torch.set_num_threads(1)
    return fn(part)


def _spread(fn: Callable, a: torch.Tensor):
    if a.device.type != "cpu" or a.dim() < 3 or a.shape[:-2].numel() < 2:
        return fn(a)
    threads = torch.get_num_threads()
    if threads == 1:          # one intra-op thread (a part of symrun.training.shards): MKL uses one too
        return fn(a)
    pool = _pools.get(threads) or _pools.setdefault(threads, ThreadPoolExecutor(threads, thread_name_prefix="symrun-eig"))
    flat = a.reshape(-1, *a.shape[-2:])
    try:
        parts = list(pool.map(lambda part: _on_one_thread(fn, part), flat.chunk(threads)))
    finally:
        torch.set_num_threads(threads)
    lead = a.shape[:-2]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts).view(*lead, *parts[0].shape[1:])
    values, vectors = (torch.cat(p) for p in zip(*parts))
    return values.view(*lead, -1), vectors.view(*lead, *vectors.shape[1:])
