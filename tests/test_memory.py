"""symrun.memory: what autograd saves, counted by storage."""

import torch

from symrun import memory


def test_saved_bytes_counts_what_backward_keeps_once_per_storage():
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    assert memory.saved_bytes(lambda: torch.tanh(x)) == 8000              # tanh keeps its output
    assert memory.saved_bytes(lambda: x * x) == 8000                      # x twice: one storage
    w = torch.randn(3, 1000, dtype=torch.float64, requires_grad=True)
    assert memory.saved_bytes(lambda: w * x.expand(3, 1000)) == 8000 + 24000   # a broadcast view once
    with torch.no_grad():
        assert memory.saved_bytes(lambda: torch.tanh(x)) == 0
