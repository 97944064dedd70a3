"""The sweep's report built by a forked child (symrun.sweeping.reporter): what it returns and
raises is what the report in this process would, and a dead child leaves the report here."""

import io
import os
import signal
import sys
import time

import pytest

from symrun.sweeping import launch, reporter, results


class Stamped(launch.Quiet):
    """A Display whose report says which process wrote it, and fails where the folder says so."""

    def report(self, sweep_dir):
        (sweep_dir / "by").write_text(str(os.getpid()))
        if (sweep_dir / "fail").exists():
            raise results.OutputError(f"cannot write the tables in {sweep_dir}")
        return {"r0": f"finished by {os.getpid()}"}


@pytest.fixture
def forked(monkeypatch):
    """A Reporter whose child exists (this test process has imported the report's modules, and
    pytest may hold stdout in memory, so it would otherwise report in process)."""
    monkeypatch.setattr(reporter, "forkable", lambda: True)
    launch.use(Stamped())
    made = reporter.Reporter()
    yield made
    made.close()
    launch.use(launch.Quiet())


def _reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_the_child_reports_each_folder_and_is_reaped_when_closed(forked, tmp_path):
    child = forked.pid
    assert child is not None and child != os.getpid()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        assert forked.report(tmp_path / name) == {"r0": f"finished by {child}"}
        assert (tmp_path / name / "by").read_text() == str(child)
    forked.close()
    assert forked.pid is None and _reaped(child)
    (tmp_path / "c").mkdir()
    assert forked.report(tmp_path / "c") == {"r0": f"finished by {os.getpid()}"}     # closed: here


def test_the_childs_error_is_raised_here_with_its_message(forked, tmp_path):
    (tmp_path / "fail").touch()
    with pytest.raises(results.OutputError, match=f"cannot write the tables in {tmp_path}"):
        forked.report(tmp_path)
    (tmp_path / "fail").unlink()
    assert forked.report(tmp_path) == {"r0": f"finished by {forked.pid}"}             # and it goes on


def test_a_killed_child_leaves_the_report_to_this_process(forked, tmp_path):
    child = forked.pid
    os.kill(child, signal.SIGKILL)
    assert forked.report(tmp_path) == {"r0": f"finished by {os.getpid()}"}
    assert forked.pid is None and _reaped(child)


def test_no_child_where_its_output_would_not_reach_the_user_or_the_imports_are_done(monkeypatch):
    import symrun.analysis.report  # noqa: F401

    assert not reporter.forkable()                           # nothing left to import ahead
    monkeypatch.setattr(reporter, "REPORT_MODULES", ("symrun.not_imported",))
    monkeypatch.setattr(reporter.folder, "cores", lambda: 2)
    with open(os.devnull, "w") as devnull:
        monkeypatch.setattr(sys, "stdout", devnull)
        monkeypatch.setattr(sys, "stderr", devnull)
        assert reporter.forkable()                           # files: the child writes where this process would
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert not reporter.forkable()                           # a stream in memory: the child's lines would be lost
    assert reporter.Reporter().pid is None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="figures are drawn in forked processes on Linux")
def test_a_figure_process_dies_with_the_process_that_forked_it():
    from symrun.analysis import report

    read, write = os.pipe()
    middle = os.fork()
    if middle == 0:                         # the reporter's child, with one figure process
        try:
            leaf = os.fork()
            if leaf == 0:
                report._die_with(os.getppid())
                time.sleep(60)
            else:
                os.write(write, str(leaf).encode())
                time.sleep(60)
        finally:
            os._exit(0)
    leaf = int(os.read(read, 32))
    os.kill(middle, signal.SIGKILL)
    os.waitpid(middle, 0)
    deadline = time.monotonic() + 10
    while _alive(leaf) and time.monotonic() < deadline:
        time.sleep(0.01)
    alive = _alive(leaf)
    if alive:
        os.kill(leaf, signal.SIGKILL)
    assert not alive
