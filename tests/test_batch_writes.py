"""folder.write_each: a batch of run folders written over forked copies of the process, one part each,
with the files, errors and tables that writing them one after another here gives."""

import os
import signal
import sys

import pytest

from symrun.sweeping import folder, results

from conftest import assert_same_tables, trained_sweep

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or folder.cores() < 2,
                                reason="the batch is shared out over forked processes on Linux with two cores or more")


@pytest.fixture
def shared_out(monkeypatch):
    """Every batch of 2 or more items shared out (WRITE_PART_MIN is 512 items a process otherwise)."""
    monkeypatch.setattr(folder, "WRITE_PART_MIN", 1)


def _writer(root, fail_on=None, error=None):
    def write(name: str) -> None:
        if name == fail_on:
            raise error
        folder.write_atomic(root / name, f"{name} by {os.getpid()}", root)
    return write


def test_every_item_is_written_and_the_parts_go_to_other_processes(tmp_path, shared_out):
    names = [f"f{i:03d}" for i in range(40)]
    folder.write_each(_writer(tmp_path), names)
    assert sorted(os.listdir(tmp_path)) == names, "every item written, no temporary file left"
    writers = {(tmp_path / n).read_text().split(" by ")[1] for n in names}
    assert str(os.getpid()) in writers and len(writers) == min(folder.cores(), len(names)), writers
    # contiguous parts: the first part is this process's own
    assert (tmp_path / names[0]).read_text().endswith(str(os.getpid()))
    assert not (tmp_path / names[-1]).read_text().endswith(str(os.getpid()))


def test_an_output_error_in_a_forked_part_is_raised_here_with_its_message(tmp_path, shared_out):
    names = [f"f{i:03d}" for i in range(40)]
    with pytest.raises(folder.OutputError, match="^no space left on the disk to write f039$"):
        folder.write_each(_writer(tmp_path, "f039", folder.OutputError("no space left on the disk to write f039")), names)
    assert "f000" in os.listdir(tmp_path), "this process's own part is written"


def test_another_error_in_a_forked_part_names_it(tmp_path, shared_out):
    with pytest.raises(RuntimeError, match="a process writing a sweep's files failed: ValueError: bad item"):
        folder.write_each(_writer(tmp_path, "f039", ValueError("bad item")), [f"f{i:03d}" for i in range(40)])


@pytest.mark.parametrize("end, how", [(lambda: os._exit(3), "exit status 3"),
                                      (lambda: os.kill(os.getpid(), signal.SIGKILL), "killed by signal 9")])
def test_a_forked_part_that_dies_stops_the_sweep_resumable_and_this_process_finishes_its_own(tmp_path, shared_out,
                                                                                              end, how):
    """A copy killed (the OOM killer) is an OutputError, as a folder that cannot be written: the
    sweep stops with one line and resumes; the runs of this process's own part are written."""
    def write(name: str) -> None:
        if name == "f039":
            end()
        folder.write_atomic(tmp_path / name, "x", tmp_path)
    with pytest.raises(folder.OutputError, match=rf"ended before it had written them all \({how}\)"):
        folder.write_each(write, [f"f{i:03d}" for i in range(40)])
    assert "f000" in os.listdir(tmp_path) and "f019" in os.listdir(tmp_path)


def test_a_forked_part_interrupted_is_an_interrupt_here(tmp_path, shared_out):
    def write(name: str) -> None:
        if name == "f039":
            raise KeyboardInterrupt
        folder.write_atomic(tmp_path / name, "x", tmp_path)
    with pytest.raises(KeyboardInterrupt):
        folder.write_each(write, [f"f{i:03d}" for i in range(40)])


def test_this_process_error_waits_for_the_forked_parts(tmp_path, shared_out):
    """An error in this process's own part is raised only once the other parts have ended: no
    file is written after `write_each` has left."""
    names = [f"f{i:03d}" for i in range(40)]
    with pytest.raises(ValueError, match="first"):
        folder.write_each(_writer(tmp_path, "f000", ValueError("first")), names)
    after = sorted(os.listdir(tmp_path))
    assert after == names[-(-40 // min(folder.cores(), 40)):], "the other parts, whole; nothing of this one"
    assert sorted(os.listdir(tmp_path)) == after


def test_without_a_process_to_fork_everything_is_done_here(tmp_path, shared_out, monkeypatch):
    def refuse():
        raise BlockingIOError(11, "Resource temporarily unavailable")
    monkeypatch.setattr(os, "fork", refuse)
    names = [f"f{i:03d}" for i in range(40)]
    folder.write_each(_writer(tmp_path), names)
    assert sorted(os.listdir(tmp_path)) == names
    assert all((tmp_path / n).read_text().endswith(str(os.getpid())) for n in names)


def test_a_link_in_a_forked_part_is_refused_and_nothing_is_written_through_it(tmp_path, shared_out):
    root, victim = tmp_path / "root", tmp_path / "victim"
    (root / "runs").mkdir(parents=True)
    victim.mkdir()
    (root / "runs" / "r39").symlink_to(victim, target_is_directory=True)
    statuses = [(f"r{i:02d}", results.RUNNING, {}) for i in range(40)]
    with pytest.raises(folder.OutputError, match=r"runs/r39 is a symbolic link"):
        results.write_statuses(root, statuses)
    assert os.listdir(victim) == []
    assert results.status(root, "r00") == {"run_id": "r00", "status": results.RUNNING}


def test_a_sweep_written_in_forked_parts_has_the_tables_of_one_written_here(tmp_path, monkeypatch):
    grid = ["model=hadamard", "data.batch_size=null", "train.steps=20", "train.log_every=10",
            "optim.weight_decay=0,0.05,0.1", "seed=range(0,6)"]
    here = trained_sweep(grid, tmp_path / "here")
    monkeypatch.setattr(folder, "WRITE_PART_MIN", 1)
    results.WRITTEN_CONFIGS.clear()       # read back from the files, as a new process would
    shared = trained_sweep(grid, tmp_path / "shared")
    assert_same_tables(here, shared)
    assert sorted(p.name for p in (shared / "runs").iterdir()) == sorted(p.name for p in (here / "runs").iterdir())
    for run in (shared / "runs").iterdir():
        assert sorted(os.listdir(run)) == sorted(os.listdir(here / "runs" / run.name))
        assert results.load_params(run / "params.pt").keys() == results.load_params(here / "runs" / run.name / "params.pt").keys()


def test_a_refused_fork_leaves_no_pipe_open(tmp_path, shared_out, monkeypatch):
    def refuse():
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(os, "fork", refuse)
    before = set(os.listdir("/proc/self/fd"))
    folder.write_each(_writer(tmp_path), [f"f{i:03d}" for i in range(40)])
    assert set(os.listdir("/proc/self/fd")) <= before, "the pipe made for the refused copy is closed"
