"""Where results live and how they are written and read back. Every output path is built here.

    outputs/<name>/<YYYY-MM-DD_HH-MM-SS>-<4 hex>/      a sweep (the suffix keeps same-second sweeps apart)
        sweep.json                                    swept keys and every launch into it (overrides, counts)
        launches/<k>/plan.json                        launch k's packs of run ids
        launches/<k>/packs/<i>/                       Hydra's folder for its job i (.hydra/, log)
        runs.csv  results.csv                         tidy tables, rebuilt from runs/ at any time
        runs/<run_id>/config.yaml                     the resolved config
                      metrics.csv                     one row per logged step
                      params.pt                       final parameters (torch.load(..., weights_only=True))
                      status.json                     written last: finished | failed | diverged | running

Each file is written to a temporary name and renamed, so a crash never leaves half a file.
run_id = readable prefix + hash of the settings that differ from the defaults (open_lth style:
adding a new setting with a default renames no existing run).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch
import yaml

from symrun.config import EXECUTION_KEYS, Config, default_values, flatten, to_dict

FINISHED, FAILED, DIVERGED, RUNNING = "finished", "failed", "diverged", "running"
FLOAT_FORMAT = "%.17g"   # floats round-trip exactly through the CSVs


def new_sweep_dir(root: Path, name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    return Path(root) / name / f"{stamp}-{secrets.token_hex(2)}"


def run_dir(sweep_dir: Path, run_id: str) -> Path:
    return Path(sweep_dir) / "runs" / run_id


def run_id(cfg: Config) -> str:
    flat = {k: v for k, v in flatten(to_dict(cfg)).items() if k not in EXECUTION_KEYS}
    defaults = default_values(type(cfg.model), type(cfg.data))
    changed = {k: v for k, v in flat.items() if defaults.get(k, object()) != v or k in ("model.name", "data.name")}
    digest = hashlib.sha256(json.dumps(sorted(changed.items()), default=str).encode()).hexdigest()[:10]
    return f"{cfg.model.name}-s{cfg.seed}-{digest}"


def write_atomic(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    write_atomic(path, frame.to_csv(index=False, float_format=FLOAT_FORMAT))


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, float_precision="round_trip")


def save_config(sweep_dir: Path, rid: str, cfg: Config) -> None:
    write_atomic(run_dir(sweep_dir, rid) / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config_dict(sweep_dir: Path, rid: str) -> dict:
    return yaml.safe_load((run_dir(sweep_dir, rid) / "config.yaml").read_text())


def status(sweep_dir: Path, rid: str) -> Optional[dict]:
    return read_json(run_dir(sweep_dir, rid) / "status.json")


def is_finished(sweep_dir: Path, rid: str) -> bool:
    st = status(sweep_dir, rid)
    return st is not None and st.get("status") == FINISHED


def write_status(sweep_dir: Path, rid: str, state: str, **info: Any) -> None:
    write_json(run_dir(sweep_dir, rid) / "status.json", {"run_id": rid, "status": state, **info})


def write_run(sweep_dir: Path, rid: str, state: str, rows: list[dict], params: Optional[dict], **info: Any) -> None:
    """A run's metrics and parameters, then its status (the completion marker) last."""
    d = run_dir(sweep_dir, rid)
    write_csv(d / "metrics.csv", pd.DataFrame(rows))
    if params is not None:
        buf = io.BytesIO()
        torch.save(params, buf)
        write_atomic(d / "params.pt", buf.getvalue())
    final = {k: v for k, v in rows[-1].items() if k != "step"} if rows else {}
    write_status(sweep_dir, rid, state, final=final, **info)


def provenance(device: str) -> dict:
    """Git commit and dirty flag (when run from a checkout), torch version, device."""
    info = {"torch": torch.__version__, "device": device, "git_commit": None, "git_dirty": None}
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


def now() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def collect(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, results) tables rebuilt from the run folders; runs that never started are absent."""
    sweep_dir = Path(sweep_dir)
    swept = (read_json(sweep_dir / "sweep.json") or {}).get("swept", [])
    run_rows, result_frames = [], []
    for d in sorted((sweep_dir / "runs").glob("*/")):
        st = read_json(d / "status.json")
        if st is None:
            continue
        cfg = flatten(yaml.safe_load((d / "config.yaml").read_text()))
        extra = {k: st.get(k) for k in ("wall_time_s", "pack", "pack_size", "torch", "git_commit",
                                        "git_dirty", "diverged_at", "error", "started_at", "finished_at")}
        extra["resolved_device"] = st.get("device")      # `device` stays the configured value
        run_rows.append({"run_id": st["run_id"], "status": st["status"], **cfg, **st.get("final", {}), **extra})
        if (d / "metrics.csv").is_file() and st["status"] != RUNNING:
            frame = read_csv(d / "metrics.csv")
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
    write_csv(Path(sweep_dir) / "runs.csv", runs)
    write_csv(Path(sweep_dir) / "results.csv", results)
    return runs, results
