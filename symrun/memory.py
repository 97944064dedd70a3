"""How many runs fit in memory at once, read off autograd itself: the bytes a pass saves for
its backward. The budgets are fixed numbers, not the free memory of the machine at hand, so what
is computed in how many passes is the same on every machine.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

PASS_BYTES = 512 * 2**20   # one batched Hessian pass of λ_c (symrun.critical), all its virtual runs


def saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the tensors autograd saves for backward while `fn()` runs (each storage once:
    views of one tensor, e.g. a shared input broadcast to every run, are counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())
