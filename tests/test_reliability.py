"""Faults tried for real: a sweep killed with SIGKILL and resumed, two sweeps into one folder, an
unwritable or full output location, and the same sweep twice (determinism)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from symrun.sweeping import folder, results

# Six packs (data.n sets the shapes) of two runs each, with minibatches and both kinds of noise,
# so every random stream a run has is exercised; each pack takes about a second.
GRID = ["model=hadamard", "data.n=40,50,60,70,80,90", "seed=0,1", "data.batch_size=20", "noise.label_std=0.1",
        "noise.temperature=1e-4", "train.steps=2000", "train.log_every=500"]
# Columns that say when, where and by what a run was trained, not what it computed.
TIMING_AND_PROVENANCE = ["wall_time_s", "train_time_s", "started_at", "finished_at", "torch", "git_commit", "git_dirty",
                         "resolved_device", "pack_runs"]


def _table(path: Path, drop=()) -> pd.DataFrame:
    """A table as the exact text of its cells (floats are written with 17 digits), so equal frames
    mean byte-identical cells."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return frame.drop(columns=[c for c in drop if c in frame.columns])


def _statuses(sweep_dir: Path) -> dict[str, str]:
    out = {}
    for p in (sweep_dir / "runs").glob("*/status.json"):
        st = results.read_json(p)
        if st is not None:
            out[st["run_id"]] = st["status"]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The grid swept once without interruption."""
    root = tmp_path_factory.mktemp("reference")
    _symrun(root, "sweep", *GRID, f"hydra.sweep.dir={root / 'sweep'}")
    return root / "sweep"


def _symrun(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "symrun", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NO_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_a_killed_sweep_resumes_training_only_unfinished_runs(tmp_path, reference):
    d = tmp_path / "sweep"
    child = subprocess.Popen([sys.executable, "-m", "symrun", "sweep", *GRID, f"hydra.sweep.dir={d}"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "NO_COLOR": "1"})
    deadline = time.monotonic() + 120
    while sum(s == "finished" for s in _statuses(d).values()) < 2 and child.poll() is None:
        assert time.monotonic() < deadline, "the sweep never finished its first pack"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed = _statuses(d)
    finished = {r for r, s in killed.items() if s == "finished"}
    assert 2 <= len(finished) < 12, f"the kill must land part-way: {killed}"
    kept = {p: p.read_bytes() for r in finished for p in (d / "runs" / r).iterdir()}
    # what a kill during an atomic write leaves (whether or not this kill hit one)
    unfinished = sorted(set(_statuses(reference)) - finished)[0]
    for stale in (d / ".runs.csv.0badc0de.tmp", d / "runs" / unfinished / ".metrics.csv.0badc0de.tmp"):
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_text("half a row,")

    resumed = _symrun(tmp_path, "sweep", *GRID, f"hydra.sweep.dir={d}")
    # The packs with an unfinished run are trained again, as they were (one the kill stopped after
    # it wrote some of its runs, whole: the same numbers), and the finished runs' files are untouched.
    first = json.loads((d / "launches" / "0" / "plan.json").read_text())["packs"]
    expected = [pack for pack in first if not set(pack) <= finished]
    assert f"12 runs in {len(expected)} pack(s), {len(finished)} already finished" in resumed.stdout
    plan = json.loads((d / "launches" / "1" / "plan.json").read_text())
    assert sorted(map(sorted, plan["packs"])) == sorted(map(sorted, expected))
    assert {p: p.read_bytes() for p in kept} == kept
    # The tables hold each run once and equal the uninterrupted sweep's (the pack a run trained
    # in depends on the launch, so its number is left out too); nothing half-written remains.
    runs = _table(d / "runs.csv")
    assert runs["run_id"].is_unique and len(runs) == 12 and set(runs["status"]) == {"finished"}
    drop = TIMING_AND_PROVENANCE + ["pack"]
    pd.testing.assert_frame_equal(_table(d / "runs.csv", drop), _table(reference / "runs.csv", drop))
    pd.testing.assert_frame_equal(_table(d / "results.csv"), _table(reference / "results.csv"))
    assert not list(d.rglob("*.tmp"))


@pytest.mark.slow
def test_the_same_sweep_twice_gives_byte_identical_tables(tmp_path, reference):
    _symrun(tmp_path, "sweep", *GRID, f"hydra.sweep.dir={tmp_path / 'again'}")
    for table in ("runs.csv", "results.csv"):
        a, b = _table(tmp_path / "again" / table, TIMING_AND_PROVENANCE), _table(reference / table, TIMING_AND_PROVENANCE)
        pd.testing.assert_frame_equal(a, b)
    assert "wall_time_s" in _table(reference / "runs.csv").columns


def test_a_second_sweep_into_a_locked_folder_is_refused_and_changes_nothing(cli, tmp_path):
    d = tmp_path / "sweep"
    cli("sweep", "seed=0,1", "train.steps=2", "train.log_every=1", f"hydra.sweep.dir={d}")
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.name != results.LOCK_NAME}
    with results.sweep_lock(d):            # as a sweep that is still training holds it
        proc = cli("sweep", "seed=0,1,2", "train.steps=2", "train.log_every=1", f"hydra.sweep.dir={d}", check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "another symrun sweep" in lines[0] and f"pid {os.getpid()}" in lines[0], proc.stderr
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.name != results.LOCK_NAME} == before
    # released with its holder: the same sweep now goes ahead
    cli("sweep", "seed=0,1,2", "train.steps=2", "train.log_every=1", f"hydra.sweep.dir={d}")
    assert len(pd.read_csv(d / "runs.csv")) == 3


def test_a_lock_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from symrun.sweeping import results\n"
                               f"with results.sweep_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(results.OutputError, match="another symrun sweep"):
        with results.sweep_lock(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with results.sweep_lock(tmp_path):     # no stale lock after SIGKILL
        pass


def test_an_unwritable_output_location_is_refused_before_training(cli, tmp_path):
    # Under a regular file nothing can be created, whoever runs the test (root ignores chmod).
    (tmp_path / "not_a_folder").write_text("x")
    for where in (["--outputs", "not_a_folder/out"], [f"hydra.sweep.dir={tmp_path / 'not_a_folder' / 'sweep'}"]):
        proc = cli("sweep", "seed=0,1", "train.steps=2", *where, check=False)
        assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr, proc.stderr
        assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


def test_a_read_only_folder_is_refused(cli, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permission bits do not stop writes (the regular-file case covers it)")
        proc = cli("sweep", "seed=0,1", "train.steps=2", "--outputs", str(ro), check=False)
        assert proc.returncode == 2 and "is not writable" in proc.stderr, proc.stderr
        assert not any(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_a_full_disk_is_refused_with_the_free_space(tmp_path, monkeypatch):
    results.check_writable(tmp_path / "a" / "b")           # enough space here: passes, creates nothing
    assert not any(tmp_path.iterdir())
    full = type("Usage", (), {"total": 10 * 2**30, "used": 10 * 2**30 - 2**20, "free": 2**20})()
    monkeypatch.setattr(results.shutil, "disk_usage", lambda path: full)
    with pytest.raises(results.OutputError, match=r"not enough free disk space .* 1\.0 MiB free"):
        results.check_writable(tmp_path / "a" / "b")


class _Payload:
    """Unpickling this would run code (create a file): weights_only must refuse it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("content, message", [
    (lambda d: torch.save({"w": _Payload(str(d / "ran"))}, d / "p.pt"), "not a state dict of tensors readable with weights_only=True"),
    (lambda d: torch.save(torch.ones(3), d / "p.pt"), "not a state dict (expected {name: tensor}, got Tensor)"),
    (lambda d: torch.save({"w": torch.ones(2), "step": 3}, d / "p.pt"), "not a state dict"),
    (lambda d: (d / "p.pt").write_bytes(b"garbage"), "not a state dict of tensors"),
    (lambda d: None, "no such parameters file"),
])
def test_a_params_file_that_is_not_a_state_dict_is_refused_without_running_it(tmp_path, content, message):
    content(tmp_path)
    with pytest.raises(results.ParamsError) as err:
        results.load_params(tmp_path / "p.pt")
    assert message in str(err.value) and str(tmp_path / "p.pt") in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "ran").exists(), "nothing was unpickled into code"
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(results.load_params(tmp_path / "ok.pt")["w"], torch.ones(2))


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs (as root); skipped, saying why, where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({(mounted.stderr or mounted.stdout).strip()})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_disk_that_fills_mid_sweep_leaves_a_resumable_folder(tmp_path, small_disk, monkeypatch):
    """A real ENOSPC: the disk fills while packs write their runs; one error line says how to go
    on, no file is left half-written, and once there is space the resumed sweep ends with the
    tables of an uninterrupted one."""
    from typer.testing import CliRunner

    from symrun import cli as cli_mod

    grid = ["model=hadamard", "data.n=40,50,60,70", "seed=0,1", "data.batch_size=20", "noise.label_std=0.1",
            "train.steps=100", "train.log_every=50"]
    sweep = lambda d: CliRunner().invoke(cli_mod.app, ["sweep", *grid, f"hydra.sweep.dir={d}"])  # noqa: E731
    monkeypatch.chdir(tmp_path)
    assert sweep(tmp_path / "reference").exit_code == 0
    real = results.check_writable        # the up-front check wants 64 MiB free; this disk is smaller
    monkeypatch.setattr(results, "check_writable", lambda d, min_free=0: real(d, 0))
    filler = small_disk / "filler"
    filler.write_bytes(bytes(4 * 2**20 - 150_000))                 # about 150 kB stay free
    d = small_disk / "sweep"
    stopped = sweep(d)
    errors = [ln for ln in stopped.stderr.splitlines() if ln.strip()]
    assert stopped.exit_code == 2 and len(errors) == 1, stopped.output
    assert errors[0].startswith("error: no space left on the disk") and f"hydra.sweep.dir={d}" in errors[0]
    assert 0 < sum(s == "finished" for s in _statuses(d).values()) < 8, "the disk filled part-way"
    assert not list(d.rglob("*.tmp")), "a failed write leaves no temporary file"
    filler.unlink()
    resumed = sweep(d)
    assert resumed.exit_code == 0, resumed.output
    drop = TIMING_AND_PROVENANCE + ["pack"]
    pd.testing.assert_frame_equal(_table(d / "runs.csv", drop), _table(tmp_path / "reference" / "runs.csv", drop))
    pd.testing.assert_frame_equal(_table(d / "results.csv"), _table(tmp_path / "reference" / "results.csv"))


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_with_exit_130_a_line_on_resuming_and_its_runs_interrupted(tmp_path):
    # Packs of 8,000 steps (a few seconds each): the signal lands while the first one trains. The
    # child gets Ctrl-C's default disposition, as from a terminal: a test before this one may have
    # left SIGINT ignored in this process, and an ignored SIGINT is inherited (Python then never
    # raises KeyboardInterrupt).
    grid, d = [*GRID[:-2], "train.steps=8000", "train.log_every=2000"], tmp_path / "sweep"
    child = subprocess.Popen([sys.executable, "-m", "symrun", "sweep", *grid, f"hydra.sweep.dir={d}"], cwd=tmp_path,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
    deadline = time.monotonic() + 120
    while not results.started_runs(d):           # a pack's record: its runs are running
        assert time.monotonic() < deadline and child.poll() is None, "the sweep never started a pack"
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert [ln for ln in stderr.splitlines() if ln.strip()][-1].startswith(f"interrupted: the sweep in {d} stopped")
    assert f"hydra.sweep.dir={d}" in stderr and "Traceback" not in stderr
    status = _symrun(tmp_path, "status", str(d)).stdout
    assert "0 running" in status and "interrupted" in status.split("runs:")[1].split(",")[2]
    _symrun(tmp_path, "sweep", *grid, f"hydra.sweep.dir={d}")
    assert set(_statuses(d).values()) == {"finished"}


def test_a_pack_is_written_with_two_syncs_and_every_status_after_every_file(tmp_path, monkeypatch):
    """write_runs: no fsync per file; one syncfs after every run's metrics and parameters, one
    after the statuses, so no completion marker can reach the disk before its run's files."""
    events = []
    monkeypatch.setattr(folder.os, "fsync", lambda fd: events.append("fsync"))
    real_sync = folder.sync_filesystem
    monkeypatch.setattr(folder, "sync_filesystem", lambda where: (events.append("sync"), real_sync(where)))
    real_write = folder._write_at           # every atomic write, a run folder's opened once included
    monkeypatch.setattr(folder, "_write_at",
                        lambda fd, name, content, path: (events.append(name), real_write(fd, name, content, path)))
    rows = [{"step": 0, "train_loss": 1.0}, {"step": 5, "train_loss": 0.5}]
    runs = [(f"r{i}", results.FINISHED, rows, {"w": torch.ones(2) * i}, None, {"wall_time_s": 1.0}) for i in range(3)]
    results.write_runs(tmp_path, runs)
    files = ["metrics.csv", "params.pt"] * 3
    assert events == files + ["sync"] + ["status.json"] * 3 + ["sync"]
    for i in range(3):
        assert results.status(tmp_path, f"r{i}") == {"run_id": f"r{i}", "status": "finished", "final": {"train_loss": 0.5},
                                                     "final_step": 5, "wall_time_s": 1.0}
        assert torch.equal(results.load_params(results.run_dir(tmp_path, f"r{i}") / "params.pt")["w"], torch.ones(2) * i)
    events.clear()
    results.write_json(tmp_path / "x.json", {})             # outside a batch: an fsync per file, as before
    assert events == ["x.json", "fsync"]
