"""Per-run label noise and Langevin noise, each drawn from the run's own streams in blocks of steps,
so that a step's noise depends on the run's seed and the step alone (docs/theory.md §1)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from symrun.config import Config
from symrun.seeds import generator
from symrun.training.optim import per_run


NOISE_BLOCK = 65536     # values per run and draw of noise: a draw covers up to NOISE_STEPS steps
NOISE_STEPS = 64


class NoiseBlocks:
    """One kind of per-step noise for the runs that draw it, counter-based at block granularity.

    Steps (b·K, (b+1)·K] of a run form block b, drawn in one call from the generator of the
    (seed, "<purpose>/<b>") stream; K = min(NOISE_STEPS, NOISE_BLOCK // values per step) depends
    only on the run's own shapes. A step's noise is therefore a function of the run's seed and
    the step alone: the same whichever runs share the pack and wherever a resumed pack restarts
    (nothing to checkpoint), and a pack draws once per run every K steps, not every step."""

    def __init__(self, seeds: list[int], purpose: str, shape: tuple[int, ...], uniform: bool,
                 device: torch.device, dtype: torch.dtype):
        self.seeds, self.purpose, self.shape, self.uniform = seeds, purpose, shape, uniform
        self.k = max(1, min(NOISE_STEPS, NOISE_BLOCK // max(1, math.prod(shape))))
        self.device, self.dtype = device, dtype
        self.block, self.values = -1, None

    def at(self, step: int) -> torch.Tensor:
        """Step `step`'s (≥ 1) draws: standard normal, or uniform on [0, 1): (runs, *shape)."""
        b, i = divmod(step - 1, self.k)
        if b != self.block:
            self.values = torch.empty(len(self.seeds), self.k, *self.shape, device=self.device, dtype=self.dtype)

            def fill(rows: range) -> None:
                for r in rows:
                    g = generator(self.seeds[r], f"{self.purpose}/{b}", self.device)
                    self.values[r].uniform_(generator=g) if self.uniform else self.values[r].normal_(generator=g)

            # A generator fills on one core; large CPU blocks (Langevin noise of every weight) are
            # split over torch's threads, each filling its own runs' rows: the values do not change.
            n, threads = len(self.seeds), torch.get_num_threads()
            if self.device.type == "cpu" and threads > 1 and self.values.numel() >= 2**20:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(fill, [range(t, n, threads) for t in range(threads)]))
            else:
                fill(range(n))
            self.block = b
        return self.values[:, i]


class StepNoise:
    """Per-run label noise and Langevin noise, each from the run's own streams (`NoiseBlocks`).

    A run draws only the noise its own config asks for, and what it draws at a step depends on
    its seed and that step alone, so it is the same whether it trains alone or beside other runs.
    """

    def __init__(self, cfgs: list[Config], device: torch.device, dtype: torch.dtype):
        self.label_std = torch.tensor([c.noise.label_std for c in cfgs], device=device, dtype=dtype)
        self.flip = torch.tensor([c.noise.label_flip for c in cfgs], device=device, dtype=dtype)
        self.temperature = torch.tensor([c.noise.temperature for c in cfgs], device=device, dtype=dtype)
        self.seeds = [c.seed for c in cfgs]
        # the runs that draw each kind, as indices (None: every run), and their streams, made at the first draw
        self.label_runs = self._runs([c.noise.label_std > 0 or c.noise.label_flip > 0 for c in cfgs], device)
        self.langevin_runs = self._runs([c.noise.temperature > 0 for c in cfgs], device)
        self.label_blocks: Optional[NoiseBlocks] = None
        self.langevin_blocks: Optional[NoiseBlocks] = None
        self.device, self.dtype = device, dtype

    @staticmethod
    def _runs(draws: list[bool], device) -> Optional[torch.Tensor]:
        if all(draws):
            return None
        return torch.tensor([i for i, d in enumerate(draws) if d], dtype=torch.long, device=device)

    def _blocks(self, runs: Optional[torch.Tensor], purpose: str, shape, uniform: bool) -> NoiseBlocks:
        seeds = self.seeds if runs is None else [self.seeds[i] for i in runs.tolist()]
        return NoiseBlocks(seeds, purpose, tuple(shape), uniform, self.device, self.dtype)

    def labels(self, y: torch.Tensor, task: str, n_classes: Optional[int], step: int) -> torch.Tensor:
        """Targets with step `step`'s noise: regression y + σ_r ξ, classification labels flipped to
        a random other class with probability p_r. y: shared (B, ...) or per run (R, B, ...)."""
        runs = self.label_runs
        if runs is not None and len(runs) == 0:
            return y
        r = len(self.seeds)
        if y.dim() == (2 if task == "regression" else 1):    # shared targets → one copy per run
            y = y.expand(r, *y.shape)
        shape = y.shape[1:] if task == "regression" else (2, *y.shape[1:])   # a flip's two uniforms
        if self.label_blocks is None or self.label_blocks.shape != tuple(shape):
            self.label_blocks = self._blocks(runs, "label-noise", shape, uniform=task != "regression")
        u = self.label_blocks.at(step)
        if task == "regression":
            if runs is None:
                return y + per_run(self.label_std, y) * u
            return y.index_add(0, runs, per_run(self.label_std[runs], u) * u)
        mine = y if runs is None else y.index_select(0, runs)
        flip = u[:, 0] < per_run(self.flip if runs is None else self.flip[runs], u[:, 0])
        shift = 1 + (u[:, 1] * (n_classes - 1)).long().clamp_max(n_classes - 2)   # uniform on 1..C−1
        noisy = torch.where(flip, (mine + shift) % n_classes, mine)
        return noisy if runs is None else y.index_copy(0, runs, noisy)

    @torch.no_grad()
    def langevin(self, params: dict[str, torch.Tensor], lr: torch.Tensor, step: int) -> None:
        """θ ← θ + √(2·lr·T)·ξ for the runs with T > 0 (one draw per run covering all its parameters)."""
        runs = self.langevin_runs
        if runs is not None and len(runs) == 0:
            return
        sizes = [p[0].numel() for p in params.values()]
        if self.langevin_blocks is None:
            self.langevin_blocks = self._blocks(runs, "langevin", (sum(sizes),), uniform=False)
        xi = self.langevin_blocks.at(step)                                    # (runs, Σ sizes)
        scale = (2 * lr * self.temperature).sqrt()
        if runs is not None:
            scale = scale[runs]
        for p, chunk in zip(params.values(), xi.split(sizes, dim=1)):
            chunk = chunk.reshape(-1, *p.shape[1:])          # a view: each run's slice is contiguous
            if runs is None:
                p.addcmul_(per_run(scale, p), chunk)         # θ + scale·ξ in one pass
            else:
                p.index_add_(0, runs, per_run(scale, chunk) * chunk)
