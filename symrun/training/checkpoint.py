"""Pack checkpoints: a pack's whole training state, so an interrupted pack continues exactly.

Every `train.checkpoint_every` steps the pack's state is written atomically (temporary file, then
rename): the step, the stacked parameters and a model's running statistics (BatchNorm), the
optimizer's buffers and step count, the per-run learning rates (zeroed for runs that diverged),
each run's minibatch order (its generator and the current epoch's permutation) and the rows
recorded so far. Label and Langevin noise need nothing: a step's noise is a function of the
run's seed and the step (engine.NoiseBlocks).
A pack that is preempted, times out (SLURM requeues it through submitit's checkpoint protocol,
which Hydra's submitit launcher implements) or is killed, and is then started again, loads it and
takes the same float path an uninterrupted pack takes: the final numbers are identical, bit for bit.

Saved with torch.save and read with torch.load(weights_only=True): generator states are uint8
tensors, rows are plain floats, nothing is unpickled as code.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from symrun.config import Config
from symrun.data import BatchOrder
from symrun.training.optim import PackedOptimizer
from symrun.sweeping.folder import read_bytes
from symrun.sweeping.results import read_json, run_id, write_atomic, write_json

if TYPE_CHECKING:   # engine imports this module
    from symrun.training.engine import Recorder

FORMAT = 3          # 3: with each run's parameters at its last row (engine.Recorder.kept); older ones are not resumed


@dataclass
class PackState:
    """References to the live objects of a pack's training loop (mutated in place on restore)."""

    params: dict[str, torch.Tensor]
    opt: PackedOptimizer
    lr: torch.Tensor               # (R,), the optimizer's own: zeroed for runs that diverged
    order: Optional[BatchOrder]    # None: full batch
    record: Recorder
    stats: dict[str, torch.Tensor]  # a model's running statistics (BatchNorm), (R, ...) each


def snapshot(step: int, s: PackState) -> dict:
    """The state of a pack (or of a part of one, symrun.training.shards.Split) after `step`
    steps: every entry per run along its first axis or in run order, but the _WHOLE ones. It
    holds the live tensors: it is saved before training goes on."""
    order = None if s.order is None else {"perm": s.order.perm, "step_in_epoch": s.order.step_in_epoch,
                                          "generators": [g.get_state() for g in s.order.generators]}
    return {
        "format": FORMAT, "step": step,
        "params": s.params, "stats": s.stats, "lr": s.lr, "opt_t": s.opt.t, "opt_state": s.opt.state, "order": order,
        "outcomes": [{"status": o.status, "rows": o.rows, "diverged_at": o.diverged_at} for o in s.record.outcomes],
        "alive": s.record.alive, "stopped_at": s.record.stopped_at,
        "kept": s.record.kept, "kept_stats": s.record.kept_stats,
    }


_WHOLE = ("format", "step", "opt_t", "step_in_epoch", "run_ids")   # the pack's, the same in each part


def join(states: list[dict], parts: list[list[int]]) -> dict:
    """The pack's state from its parts' snapshots, part i holding the pack's runs parts[i]."""
    if len(states) == 1:
        return states[0]
    back = torch.argsort(torch.tensor([r for part in parts for r in part]))    # pack run → place in the parts' order

    def merge(key: str, values: list):
        if key in _WHOLE or values[0] is None:
            return values[0]
        if isinstance(values[0], dict):
            return {k: merge(k, [v[k] for v in values]) for k in values[0]}
        if isinstance(values[0], torch.Tensor):
            joined = torch.cat(values)
            return joined[back.to(joined.device)]
        joined = [item for v in values for item in v]
        return [joined[i] for i in back.tolist()]

    return {k: merge(k, [s[k] for s in states]) for k in states[0]}


def part(state: dict, runs: list[int]) -> dict:
    """The state of the pack's runs `runs` (ascending), as a part of the pack holding them would save it."""
    if runs == list(range(len(state["outcomes"]))):
        return state

    def pick(key: str, value):
        if key in _WHOLE or value is None:
            return value
        if isinstance(value, dict):
            return {k: pick(k, v) for k, v in value.items()}
        if isinstance(value, torch.Tensor):
            return value[torch.tensor(runs, device=value.device)]
        return [value[i] for i in runs]

    return {k: pick(k, v) for k, v in state.items()}


def save(path: Path, cfgs: list[Config], state: dict) -> None:
    """Write the pack's state (`snapshot`, or `join` of its parts') to `path` (a sweep's
    checkpoints/<hash>.pt, results.checkpoint_path), atomically, and its run ids beside it
    (<hash>.json), which a rerun of the sweep reads to keep the pack together (sweep.schedule).
    A sidecar already there is the pack's own record (results.write_pack_start: its run ids,
    and which runs it trains), and is kept when it holds these run ids."""
    state = {**state, "run_ids": [run_id(c) for c in cfgs]}
    buf = io.BytesIO()
    torch.save(state, buf)
    root = Path(path).parent.parent          # the sweep folder: no link inside it is followed
    sidecar = Path(path).with_suffix(".json")
    record = read_json(sidecar, root)
    if not isinstance(record, dict) or record.get("run_ids") != state["run_ids"]:
        write_json(sidecar, {"run_ids": state["run_ids"]}, root)
    write_atomic(Path(path), buf.getvalue(), root)


def load(path: Path, cfgs: list[Config], device: torch.device) -> Optional[dict]:
    """The pack's state saved at `path`; None when there is no checkpoint or it belongs to other
    runs (the run ids, hashes of the configs, must match) or to another format."""
    path = Path(path)
    try:
        raw = read_bytes(path, path.parent.parent)
    except FileNotFoundError:
        return None
    try:
        state = torch.load(io.BytesIO(raw), map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 — atomic writes make this rare; say what to do
        raise RuntimeError(f"cannot read checkpoint {path} ({type(e).__name__}); delete it to train the pack "
                           "from the start") from e
    if not isinstance(state, dict):
        return None
    if state.get("format") != FORMAT or state.get("run_ids") != [run_id(c) for c in cfgs]:
        return None
    return state


def restore(state: dict, s: PackState) -> int:
    """Load a saved state (`load`, or its `part` for a part's runs) into the live objects and
    return its step."""
    with torch.no_grad():
        for k, p in s.params.items():
            p.copy_(state["params"][k])
        for k, b in s.stats.items():
            b.copy_(state["stats"][k])
        s.lr.copy_(state["lr"])
    s.opt.t, s.opt.state = state["opt_t"], state["opt_state"]
    if s.order is not None:
        s.order.perm, s.order.step_in_epoch = state["order"]["perm"], state["order"]["step_in_epoch"]
        # generator states are CPU byte tensors whatever the generator's device
        for g, g_state in zip(s.order.generators, state["order"]["generators"]):
            g.set_state(g_state.cpu())
    for o, saved in zip(s.record.outcomes, state["outcomes"]):
        o.status, o.rows, o.diverged_at = saved["status"], saved["rows"], saved["diverged_at"]
    s.record.alive.copy_(state["alive"])
    s.record.stopped_at.copy_(state["stopped_at"])
    s.record.kept, s.record.kept_stats = state["kept"], state["kept_stats"]
    return int(state["step"])
