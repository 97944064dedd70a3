"""Where results live and how they are written and read back. Every output path is built here.

    outputs/<name>/<YYYY-MM-DD_HH-MM-SS>-<4 hex>/      a sweep (the suffix keeps same-second sweeps apart);
                                                      a suite: one per member, <preset>/, and its
                                                      launches/<k>/ (sweep.write_launch)
        sweep.json                                    swept keys and every launch into it (overrides, counts)
        launches/<k>/plan.json                        launch k's packs of run ids
        launches/<k>/packs/<i>/                       Hydra's folder for its job i (.hydra/, log)
        runs.csv  results.csv                         tidy tables, rebuilt from runs/ at any time
        checkpoints/<hash of run ids>.pt              an unfinished pack's state (train.checkpoint_every)
        runs/<run_id>/config.yaml                     the resolved config
                      metrics.csv                     one row per logged step
                      params.pt                       final parameters (torch.load(..., weights_only=True))
                      <name>.npy, <name>.png          arrays a model saves for a run's own figures (resnet18)
                      status.json                     written last: finished | failed | diverged | running

Every file is written and read through symrun.folder, which never follows a link inside a sweep
folder; each is written to a temporary name and renamed, so a crash never leaves half a file.
run_id = readable prefix + hash of the settings that differ from the defaults (open_lth style:
adding a new setting with a default renames no existing run).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
import yaml

from symrun import folder
from symrun.config import EXECUTION_KEYS, Config, default_values, flatten, to_dict
from symrun.folder import OutputError, read_bytes, write_atomic  # noqa: F401 — part of this module's API

FINISHED, FAILED, DIVERGED, RUNNING = "finished", "failed", "diverged", "running"
PENDING = "pending"   # planned (config.yaml written) but never started: no status.json yet
FLOAT_FORMAT = "%.17g"   # floats round-trip exactly through the CSVs
MIN_FREE_BYTES = 64 * 2**20   # below this a sweep would likely die mid-write: refuse it up front
LOCK_NAME = "sweep.lock"
FOLDERS = ("runs", "checkpoints", "launches")     # what symrun makes inside a sweep folder
# Hydra reads the launch folder's path as an override value: these would be read as syntax.
HYDRA_SYNTAX = ("${", "'", '"', "\\")


def new_sweep_dir(root: Path, name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path(root) / name / f"{stamp}-{secrets.token_hex(2)}"


def run_dir(sweep_dir: Path, run_id: str) -> Path:
    return Path(sweep_dir) / "runs" / run_id


def launch_plan(folder_: Path, k: int) -> Path:
    """Launch k's plan in a sweep's (or a suite's) folder; Hydra's job folders go beside it."""
    return Path(folder_) / "launches" / str(k) / "plan.json"


def write_launch_plan(root: Path, first: int, plan: dict) -> Path:
    """Write `plan` as launch k's plan.json, k the first number ≥ `first` whose launch folder
    does not exist yet: Hydra and submitit then write their job folders into a folder made here,
    never into one a received sweep folder brought along. Returns its path."""
    k = first
    while folder.kind(launch_plan(root, k).parent, root) is not None:
        k += 1
    path = launch_plan(root, k)
    write_json(path, plan, root=root)
    return path


def check_writable(sweep_dir: Path, min_free: int = MIN_FREE_BYTES) -> None:
    """Refuse an output location that cannot take a sweep's results, before any training.

    The nearest folder that exists on the way to `sweep_dir` must be a folder in which a file can
    be created (a probe file is created and removed: permission bits alone do not tell, e.g. for
    root or read-only mounts), on a disk with at least `min_free` bytes free."""
    existing = Path(os.path.abspath(sweep_dir))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write results under {sweep_dir}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".symrun-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write results under {sweep_dir}: {existing} is not writable ({e.strerror})") from None
    free = shutil.disk_usage(existing).free
    if free < min_free:
        raise OutputError(f"not enough free disk space for results under {sweep_dir}: {free / 2**20:.1f} MiB free "
                          f"on the disk of {existing}, symrun needs at least {min_free / 2**20:.0f} MiB")


def check_folder(sweep_dir: Path, run_ids_, suite: Optional[Path] = None) -> None:
    """Before a sweep writes into `sweep_dir` (a member of the `suite` folder, if given): refuse,
    with one line, a folder whose names would lead a write elsewhere — a link at sweep.lock,
    runs/, runs/<id>/ of a planned run, checkpoints/, launches/ or a suite's member folder — or
    a path Hydra would read as syntax. Reads only."""
    sweep_dir = Path(sweep_dir)
    text = os.path.abspath(sweep_dir)
    if any(s in text for s in HYDRA_SYNTAX):
        raise OutputError(f"symrun cannot hand the folder {text} to Hydra: its path holds one of "
                          f"{' '.join(HYDRA_SYNTAX)}, which Hydra reads as syntax; choose a plain path")
    if suite is not None and folder.kind(sweep_dir, suite) == "link":
        raise folder.link_error(sweep_dir)
    if not sweep_dir.exists():
        return
    for name in (LOCK_NAME, *FOLDERS, *(f"runs/{rid}" for rid in run_ids_)):
        what = folder.kind(sweep_dir / name, sweep_dir)
        if what == "link":
            raise folder.link_error(sweep_dir / name)
        if what is not None and what != ("file" if name == LOCK_NAME else "dir"):
            raise OutputError(f"{sweep_dir / name} is not a {'file' if name == LOCK_NAME else 'folder'}: "
                              "remove it, or use another folder")


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path):
    """Hold `sweep_dir`/sweep.lock exclusively while a sweep writes into the folder; a second sweep
    into the same folder is refused with OutputError. flock(2) locks belong to the open file, so
    the operating system releases them when the process dies, even by SIGKILL: no stale locks.
    Only the top-level sweep process locks; launcher workers write their own runs' files.
    The lock file is opened without following a link (a link would have its target truncated)."""
    path = Path(sweep_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = folder.open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise OutputError(f"another symrun sweep ({holder}) is writing to {sweep_dir}; wait for it to end "
                          "or choose another hydra.sweep.dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now()}\n".encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def run_ids(sweep_dir: Path) -> list[str]:
    """The names under runs/ that are run folders (links in their place are not), sorted."""
    try:
        found = folder.entries(Path(sweep_dir) / "runs", sweep_dir)
    except OutputError:
        return []
    return sorted(name for name, what in found.items() if what == "dir")


def remove_stale_temps(sweep_dir: Path) -> list[Path]:
    """Delete temporary files a killed sweep left behind (write_atomic's `.<name>.<hex>.tmp`) in
    the sweep folder, its run folders and checkpoints/; links are never entered. Call it holding
    the sweep's lock."""
    sweep_dir = Path(sweep_dir)
    runs = [run_dir(sweep_dir, rid) for rid in run_ids(sweep_dir)]
    return folder.remove_temps(sweep_dir, [sweep_dir, sweep_dir / "checkpoints", *runs])


def run_id(cfg: Config) -> str:
    flat = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in EXECUTION_KEYS}
    defaults = default_values(type(cfg.model), type(cfg.data))
    changed = {k: v for k, v in flat.items() if defaults.get(k, object()) != v or k in ("model.name", "data.name")}
    digest = hashlib.sha256(json.dumps(sorted(changed.items()), default=str).encode()).hexdigest()[:10]
    return f"{cfg.model.name}-s{cfg.seed}-{digest}"


def checkpoint_path(sweep_dir: Path, run_ids: list[str]) -> Path:
    """Where the pack of exactly these runs keeps its checkpoint. Named by its runs, not by a
    launch's pack number, so a rerun of the sweep (a new launch) finds it."""
    digest = hashlib.sha256(json.dumps(list(run_ids)).encode()).hexdigest()[:16]
    return Path(sweep_dir) / "checkpoints" / f"{digest}.pt"


def remove_checkpoint(sweep_dir: Path, run_ids_: list[str]) -> None:
    folder.remove(checkpoint_path(sweep_dir, run_ids_), sweep_dir)


def write_json(path: Path, obj: Any, root: Optional[Path] = None) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n", root)


def read_json(path: Path, root: Optional[Path] = None) -> Optional[dict]:
    """The JSON in `path` inside `root` (default: its own folder), read without following a
    link, or None when it is missing, unreadable or a link."""
    try:
        return json.loads(read_bytes(path, root))
    except (FileNotFoundError, NotADirectoryError, OutputError, ValueError):
        return None


def write_csv(path: Path, frame: pd.DataFrame, root: Optional[Path] = None) -> None:
    write_atomic(path, frame.to_csv(index=False, float_format=FLOAT_FORMAT), root)


def read_csv(path: Path | io.StringIO) -> pd.DataFrame:
    return pd.read_csv(path, float_precision="round_trip")


def save_config(sweep_dir: Path, rid: str, cfg: Config) -> None:
    write_atomic(run_dir(sweep_dir, rid) / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False), sweep_dir)


def load_config_dict(sweep_dir: Path, rid: str) -> dict:
    return yaml.safe_load(folder.read_text(run_dir(sweep_dir, rid) / "config.yaml", sweep_dir))


def status(sweep_dir: Path, rid: str) -> Optional[dict]:
    return read_json(run_dir(sweep_dir, rid) / "status.json", sweep_dir)


def is_finished(sweep_dir: Path, rid: str) -> bool:
    st = status(sweep_dir, rid)
    return st is not None and st.get("status") == FINISHED


def write_status(sweep_dir: Path, rid: str, state: str, **info: Any) -> None:
    write_json(run_dir(sweep_dir, rid) / "status.json", {"run_id": rid, "status": state, **info}, sweep_dir)


def write_run(sweep_dir: Path, rid: str, state: str, rows: list[dict], params: Optional[dict],
              arrays: Optional[dict] = None, **info: Any) -> None:
    """A run's metrics, parameters and arrays (<name>.npy, for its figures), then its status
    (the completion marker) last, with the last row's step and metrics."""
    d = run_dir(sweep_dir, rid)
    write_csv(d / "metrics.csv", pd.DataFrame(rows) if rows else pd.DataFrame(columns=["step"]), sweep_dir)
    if params is not None:
        buf = io.BytesIO()
        torch.save(params, buf)
        write_atomic(d / "params.pt", buf.getvalue(), sweep_dir)
    for name, array in (arrays or {}).items():
        buf = io.BytesIO()
        np.save(buf, array.numpy() if isinstance(array, torch.Tensor) else array, allow_pickle=False)
        write_atomic(d / f"{name}.npy", buf.getvalue(), sweep_dir)
    final = {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}
    write_status(sweep_dir, rid, state, final=final, final_step=rows[-1]["step"] if rows else None, **info)


class ParamsError(ValueError):
    """A parameters file that is not a state dict of tensors; the message is one line."""


def load_params(path: Path) -> dict[str, torch.Tensor]:
    """A run's params.pt (or any saved state dict) as {name: tensor} on the CPU.

    torch.load with weights_only=True unpickles only tensors and plain containers, so a file
    holding arbitrary Python objects is refused instead of executed."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such parameters file") from None
    except Exception as e:  # noqa: BLE001 — unpickling and zip errors come in many types
        raise ParamsError(f"{path}: not a state dict of tensors readable with weights_only=True "
                          f"(it holds other Python objects, or is not a torch.save file: {type(e).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ParamsError(f"{path}: not a state dict (expected {{name: tensor}}, got {type(state).__name__})")
    return state


def provenance(device: str) -> dict:
    """Git commit and dirty flag (when run from a checkout), torch version, device."""
    info = {"torch": torch.__version__, "device": device, "git_commit": None, "git_dirty": None,
            "slurm_job_id": slurm_job_id()}
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
            info["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def slurm_job_id() -> Optional[str]:
    """The SLURM job running this process (`<array job>_<task>` for an array task), if any: the
    name of its submitit folder and log files, and what `sacct -j` takes."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def collect(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, results) tables rebuilt from the run folders; runs that never started are absent."""
    sweep_dir = Path(sweep_dir)
    swept = (read_json(sweep_dir / "sweep.json") or {}).get("swept", [])
    run_rows, result_frames = [], []
    for d in (run_dir(sweep_dir, rid) for rid in run_ids(sweep_dir)):   # never a link in a run's place
        st = read_json(d / "status.json", sweep_dir)
        if st is None:
            continue
        cfg = flatten(load_config_dict(sweep_dir, d.name))
        extra = {k: st.get(k) for k in ("wall_time_s", "pack", "pack_size", "torch", "git_commit",
                                        "git_dirty", "diverged_at", "resumed_from", "error", "started_at",
                                        "finished_at", "slurm_job_id")}
        extra["resolved_device"] = st.get("device")      # `device` stays the configured value
        run_rows.append({"run_id": st["run_id"], "status": st["status"], **cfg, **st.get("final", {}), **extra})
        if folder.kind(d / "metrics.csv", sweep_dir) == "file" and st["status"] != RUNNING:
            frame = read_csv(io.StringIO(folder.read_text(d / "metrics.csv", sweep_dir)))
            for key in reversed(swept):
                frame.insert(0, key, cfg.get(key))
            frame.insert(0, "run_id", st["run_id"])
            result_frames.append(frame)
    runs = pd.DataFrame(run_rows)
    if not runs.empty:
        front = ["run_id", "status"] + [k for k in swept if k in runs.columns]
        runs = runs[front + [c for c in runs.columns if c not in front]]
    results = pd.concat(result_frames, ignore_index=True) if result_frames else pd.DataFrame()
    return runs, results


def write_tables(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs, results = collect(sweep_dir)
    write_csv(Path(sweep_dir) / "runs.csv", runs, sweep_dir)
    write_csv(Path(sweep_dir) / "results.csv", results, sweep_dir)
    return runs, results


@dataclass
class SweepStatus:
    """Where a sweep stands, from its runs' status.json files (the truth: a scheduler reports a
    job whose Python raised as COMPLETED)."""

    sweep_dir: Path
    counts: dict[str, int]                 # finished | running | failed | diverged | pending → runs
    reasons: dict[str, list[str]]          # one-line reason → the failed or diverged runs it ended


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
    counts = {s: 0 for s in (FINISHED, RUNNING, FAILED, DIVERGED, PENDING)}
    reasons: dict[str, list[str]] = {}
    for d in (run_dir(sweep_dir, rid) for rid in run_ids(sweep_dir)):
        st = read_json(d / "status.json", sweep_dir) or {"status": PENDING}
        counts[st["status"]] = counts.get(st["status"], 0) + 1
        if st["status"] == FAILED:
            reasons.setdefault(" ".join(str(st.get("error")).split()), []).append(d.name)
        elif st["status"] == DIVERGED:
            reasons.setdefault("diverged: its loss or weights stopped being finite (see diverged_at)", []).append(d.name)
    return SweepStatus(Path(sweep_dir), counts, reasons)
