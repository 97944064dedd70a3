"""Seeds are a grid axis: every random draw comes from a stream named by (seed, purpose).

Streams never share state, so a run's init, minibatch order, label noise, Langevin noise and
symmetry-removal offsets are the same whichever other runs (or streams) exist beside it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:       # torch waits for the code that draws: `symrun report` and `status` need none
    import torch


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for one (seed, purpose) stream."""
    digest = hashlib.sha256(f"symrun:{seed}:{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def generator(seed: int, purpose: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch.Generator on `device` for the (seed, purpose) stream."""
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, purpose))
    return g


def by_seed(seeds: list[int]) -> tuple[list[int], list[int]]:
    """(the distinct seeds, in order of first appearance; each run's place among them). A grid
    over weight decay or lr repeats each seed: runs of a seed start alike, so their
    initialisation is drawn once (models.nets.base), their minibatch order is one stream
    (data.datasets.BatchOrder), and they share a part of a CPU pack (training.shards)."""
    places: dict[int, int] = {}
    for s in seeds:
        places.setdefault(s, len(places))
    return list(places), [places[s] for s in seeds]
