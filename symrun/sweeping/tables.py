"""A sweep's tables and where it stands, rebuilt from its run folders at any time.

runs.csv holds one row per run (run_id, status, the swept keys, every config value as a dotted
column, the final metrics, provenance); results.csv one row per run per logged step. Rows come in
grid order: the order of the grid of the last launch into the folder (launches/<k>/plan.json).
Runs whose files cannot be read back are rows with status `damaged` and the reason in `error`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from symrun.sweeping import records, results
from symrun.sweeping.results import DAMAGED, DIVERGED, FAILED, FINISHED, INTERRUPTED, PENDING, RUNNING

# Columns of runs.csv that say when, where and how a run was trained, from its status.json.
PROVENANCE = ("wall_time_s", "train_time_s", "pack", "pack_runs", "torch", "git_commit", "git_dirty", "diverged_at", "resumed_from",
              "error", "started_at", "finished_at", "slurm_job_id")
# …and those only runs trained on a data file have (symrun.data.digest)
DATA_PROVENANCE = ("data_sha256",)


def grid_order(sweep_dir: Path) -> list[str]:
    """Run ids in grid order: the last launch's grid as it was written (so an extended sweep's
    tables are ordered as the same grid swept at once), then the runs only earlier launches had,
    in their order (their packs' order for launches that recorded no grid)."""
    order: dict[str, None] = {}
    for plan in results.launch_plans(sweep_dir):
        ids = plan.get("grid") or [r for pack in plan.get("packs", []) if isinstance(pack, list) for r in pack]
        order.update((r, None) for r in ids if isinstance(r, str))
    return list(order)


def _ordered(sweep_dir: Path) -> list[str]:
    present = results.run_ids(sweep_dir)
    known = set(present)
    first = [r for r in grid_order(sweep_dir) if r in known]
    return first + sorted(known - set(first))


def collect(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, results) tables rebuilt from the run folders; runs that never started are absent,
    runs `running` while no sweep holds the folder's lock are `interrupted`. A folder without a
    run yet gives tables with their header only."""
    sweep_dir = Path(sweep_dir)
    swept = records.read_sweep(sweep_dir)[0].get("swept", [])
    run_rows, result_frames = [], []
    held = results.lock_held(sweep_dir)
    for record in records.read_runs(sweep_dir, _ordered(sweep_dir)):
        rid = record.run_id
        if record.status == PENDING:
            continue
        if record.status == RUNNING and not held:
            record.status = INTERRUPTED
        st, cfg = record.info or {}, record.config or {}
        if record.status == DAMAGED:
            run_rows.append({"run_id": rid, "status": DAMAGED, **cfg, "error": record.problem})
            continue
        extra = {k: st.get(k) for k in PROVENANCE}
        if extra["pack_runs"] is None:
            extra["pack_runs"] = st.get("pack_size")          # its name before it left the config's column
        extra["resolved_device"] = st.get("device")           # `device` stays the configured value
        extra.update({k: st[k] for k in DATA_PROVENANCE if k in st})
        run_rows.append({"run_id": rid, "status": record.status, **cfg, **st.get("final", {}), **extra})
        if record.metrics is not None and len(record.metrics):
            result_frames.append((rid, cfg, record.metrics))
    front = ["run_id", "status"] + swept
    runs = pd.DataFrame(run_rows) if run_rows else pd.DataFrame(columns=front)
    runs = runs[[c for c in front if c in runs.columns] + [c for c in runs.columns if c not in front]]
    if not result_frames:
        return runs, pd.DataFrame(columns=["run_id", *swept, "step"])
    # One concatenation, then each run's id and swept values repeated over its rows.
    res = pd.concat([frame for _, _, frame in result_frames], ignore_index=True)
    lengths = [len(frame) for _, _, frame in result_frames]
    for key in reversed(swept):
        res.insert(0, key, _repeated([cfg.get(key) for _, cfg, _ in result_frames], lengths))
    res.insert(0, "run_id", _repeated([rid for rid, _, _ in result_frames], lengths))
    return runs, res


def _repeated(values: list, lengths: list[int]) -> pd.Series:
    return pd.Series(values).repeat(lengths).reset_index(drop=True)


def write_tables(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs, res = collect(sweep_dir)
    results.write_csv(Path(sweep_dir) / "runs.csv", runs)
    results.write_csv(Path(sweep_dir) / "results.csv", res)
    return runs, res


def statuses(runs: pd.DataFrame) -> dict[str, str]:
    """{run id: status} of a runs table (runs.csv's rows)."""
    return dict(zip(runs["run_id"], runs["status"])) if "run_id" in runs else {}


def problems(sweep_dir: Path, runs: pd.DataFrame) -> list[str]:
    """One line per part of the folder that cannot be read back: sweep.json or runs/ (a link),
    and each damaged run's file."""
    damaged = runs.loc[runs["status"] == DAMAGED, "error"].tolist() if {"status", "error"} <= set(runs) else []
    return records.folder_problems(sweep_dir) + damaged


@dataclass
class SweepStatus:
    """Where a sweep stands, from its runs' status.json files (the truth: a scheduler reports a
    job whose Python raised as COMPLETED)."""

    sweep_dir: Path
    counts: dict[str, int]                 # finished | running | interrupted | failed | diverged | pending | damaged
    reasons: dict[str, list[str]]          # one-line reason → the runs it concerns
    problems: list[str] = field(default_factory=list)   # the folder's own: records.folder_problems


def find_sweeps(root: Path) -> list[Path]:
    """`root` itself when it is a sweep folder, else every sweep folder below it (links below
    `root` are not followed)."""
    root = Path(root)
    if (root / "sweep.json").is_file():
        return [root]
    found = []
    for here, dirs, files in os.walk(root):
        if "sweep.json" in files and "runs" in dirs:
            found.append(Path(here))
            dirs.clear()                   # a sweep folder holds runs, not other sweeps
    return sorted(found)


def sweep_status(sweep_dir: Path) -> SweepStatus:
    """Runs counted by state. A run `running` while no sweep holds the folder's lock was
    interrupted (its process was killed, or stopped with Ctrl-C): it is `interrupted`."""
    counts = {s: 0 for s in (FINISHED, RUNNING, INTERRUPTED, FAILED, DIVERGED, PENDING, DAMAGED)}
    reasons: dict[str, list[str]] = {}
    held = results.lock_held(sweep_dir)
    for record in records.read_runs(sweep_dir, results.run_ids(sweep_dir)):
        rid = record.run_id
        state = INTERRUPTED if record.status == RUNNING and not held else record.status
        counts[state] += 1
        if state == FAILED:
            reasons.setdefault(" ".join(str(record.info.get("error")).split()), []).append(rid)
        elif state == DIVERGED:
            reasons.setdefault("diverged: its loss or weights stopped being finite (see diverged_at)", []).append(rid)
        elif state == DAMAGED:
            reasons.setdefault(record.problem, []).append(rid)
    return SweepStatus(Path(sweep_dir), counts, reasons, records.folder_problems(sweep_dir))
