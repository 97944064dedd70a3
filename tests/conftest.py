import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture
def cli(tmp_path):
    """Run the real `symrun` command in a subprocess, with outputs under tmp_path."""

    def run(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "NO_COLOR": "1", **(env or {})}   # no COLUMNS: errors must stay one line at 80 columns
        proc = subprocess.run([sys.executable, "-m", "symrun", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        if check and proc.returncode != 0:
            raise AssertionError(f"symrun {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


def sweep_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in Path(root).glob("*/*/sweep.json"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def assert_a_seed_starts_its_runs_alike(model) -> None:
    """A model's initialisation of runs [3, 5, 3]: each starts where it would alone, the two of
    seed 3 alike but each in its own memory (an update of one leaves the other be), and seeds 3
    and 5 apart."""
    cpu, f64 = torch.device("cpu"), torch.float64
    runs = model.init_params([3, 5, 3], cpu, f64)
    for k, p in runs.items():
        assert torch.equal(p[0], model.init_params([3], cpu, f64)[k][0])
        assert torch.equal(p[1], model.init_params([5], cpu, f64)[k][0])
        with torch.no_grad():
            p[0].add_(1.0)
        assert torch.equal(p[2] + 1.0, p[0])
    assert any(not torch.equal(p[1], p[2]) for p in runs.values())


def assert_same_run(a, b, rtol=1e-9, atol=1e-12) -> None:
    """Two engine.RunOutcome: same status, logged steps and metrics (to float tolerance), same
    final parameters."""
    assert a.status == b.status
    assert [r["step"] for r in a.rows] == [r["step"] for r in b.rows]
    for ra, rb in zip(a.rows, b.rows):
        assert ra.keys() == rb.keys()
        for k in ra:
            np.testing.assert_allclose(ra[k], rb[k], rtol=rtol, atol=atol, err_msg=f"{k} at step {ra['step']}")
    assert a.state.keys() == b.state.keys()
    for k in a.state:
        torch.testing.assert_close(a.state[k], b.state[k], rtol=rtol, atol=atol)


def write_fake_cifar(root: Path, per_batch: int = 4, seed: int = 0) -> Path:
    """A stand-in CIFAR-10 in the python version's on-disk format (root/cifar-10-batches-py/
    data_batch_1..5 and test_batch: pickled dicts with bytes keys, uint8 data (N, 3072) in CHW
    order, int labels), random pixels. Returns root."""
    import pickle

    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return Path(root)


# Columns of runs.csv that say when, where and how a run executed, not what it computed.
PROVENANCE = {"wall_time_s", "train_time_s", "started_at", "finished_at", "git_commit", "git_dirty", "torch", "resolved_device",
              "pack", "pack_runs", "pack_size", "slurm_job_id", "resumed_from", "train.checkpoint_every"}


def assert_same_tables(a: Path, b: Path, rtol: float = 0.0) -> None:
    """Two sweep folders hold the same runs.csv and results.csv, apart from provenance columns:
    value for value, or to `rtol` (packs of other sizes round differently in BLAS)."""
    import pandas as pd

    from symrun.sweeping.results import read_csv

    for table in ("runs.csv", "results.csv"):
        ta, tb = read_csv(Path(a) / table), read_csv(Path(b) / table)
        assert set(ta.columns) == set(tb.columns), table
        keep = [c for c in tb.columns if c not in PROVENANCE]
        key = ["run_id", "step"] if table == "results.csv" else ["run_id"]
        pd.testing.assert_frame_equal(ta[keep].sort_values(key).reset_index(drop=True),
                                      tb[keep].sort_values(key).reset_index(drop=True),
                                      check_exact=rtol == 0, rtol=rtol or 1e-5, atol=0)


def trained_sweep(grid: list[str], folder: Path) -> Path:
    """A sweep of `grid` planned, trained and reported in `folder` as `symrun sweep` would (in
    this process, without a launcher): the finished folder that damage and hostile tests start from."""
    from symrun.analysis import report
    from symrun.sweeping import job, sweep

    plan = sweep.plan(grid, folder)
    sweep.write_plan(plan)
    job.run_plan(plan)
    report.build(plan.sweep_dir)
    return plan.sweep_dir
