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

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, "NO_COLOR": "1"}   # no COLUMNS: errors must stay one line at 80 columns
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
