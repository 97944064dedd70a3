"""A sweep's report built by a process forked as the sweep starts, so that its imports overlap the
sweep's own.

The report (tables, figures, report.md: symrun.analysis.report) needs pandas and matplotlib, about
half a second of imports; training needs torch, over a second, and one core imports while the
others wait. `Reporter` forks a child before the sweep imports any of them: the child imports the
report's modules on another core while this process imports torch and trains, then waits. At the
end each sweep folder's report is built by the child — a report is rebuilt from its folder, never
from memory, so the child needs nothing this process learned after the fork — and it sends back
the runs' statuses, or the exception it raised, which is raised here. This process waits for it:
the command ends when its report is written, as before, and says what it said before (the child
prints through the same Display, to the same stdout and stderr).

In this process instead: where forking is not sound (not Linux) or gains nothing (one core; the
report's modules already imported), where the child's output would not reach the user (stdout or
stderr is not a file: a test's captured streams), and for every folder after the child died (killed,
out of memory). The child ends when this process closes its end of the pipe or dies, on Ctrl-C,
or when the sweep kills it on its way out (an interrupted report stops as it would have here).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import Optional

from symrun.sweeping import folder, launch

REPORT_MODULES = ("symrun.analysis.report", "symrun.sweeping.tables")    # what the child imports ahead


class Reporter:
    """launch.display().report for each sweep folder, by a child forked when this is made (see the
    module's docstring). A context manager: leaving it ends the child."""

    def __init__(self) -> None:
        self.pid: Optional[int] = None
        self.conn: Optional[Connection] = None
        if not forkable():
            return
        ours, theirs = Pipe()
        _flush()                                   # else the child would write again what is still buffered
        # Ctrl-C waits until the child is in _serve's try: it must never run this process's code
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:
                _serve(theirs, ours, mask)         # never returns
        except OSError:                            # no process to be had: the report is written here
            theirs.close()
            ours.close()
            return
        finally:
            if pid == 0:
                os._exit(1)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        theirs.close()
        self.pid, self.conn = pid, ours

    def report(self, sweep_dir: Path) -> dict[str, str]:
        """The folder's report, as launch.display().report(sweep_dir) writes and shows it: by the
        child while it lives, else here."""
        if self.conn is not None:
            try:
                self.conn.send(Path(sweep_dir))
                done, value = self.conn.recv()
            except (EOFError, OSError):           # the child died: this and later reports are written here
                self.close()
            else:
                if done:
                    return value
                raise value
        return launch.display().report(sweep_dir)

    def close(self) -> None:
        """End the child: idle, it has nothing to finish; in a report, this process was interrupted,
        and the report stops as it would have here."""
        if self.pid is None:
            return
        self.conn.close()
        _end(self.pid)
        self.pid = self.conn = None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def forkable() -> bool:
    """Whether a child would report: Linux, more than one core, the report's modules not yet
    imported, and stdout and stderr files the child can write to."""
    if not sys.platform.startswith("linux") or folder.cores() < 2 or any(m in sys.modules for m in REPORT_MODULES):
        return False
    try:
        return sys.stdout.fileno() >= 0 and sys.stderr.fileno() >= 0
    except (AttributeError, OSError, ValueError):      # a stream in memory (io.UnsupportedOperation)
        return False


def _serve(conn: Connection, parents: Connection, mask) -> None:
    """The child: import the report's modules, then report each folder sent until the pipe closes
    or Ctrl-C's signal comes. Whatever happens, it ends here, in os._exit."""
    status = 1
    try:
        parents.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for name in REPORT_MODULES:
            __import__(name)
        while True:
            try:
                sweep_dir = conn.recv()
            except EOFError:
                break
            try:
                answer = (True, launch.display().report(sweep_dir))
            except Exception as e:  # noqa: BLE001 — raised in the parent, where the sweep decides
                answer = (False, e)
            _flush()                 # shown before the parent goes on (and before it ends this process)
            try:
                conn.send(answer)
            except (pickle.PicklingError, TypeError, AttributeError) as e:   # an exception that does not pickle
                conn.send((False, RuntimeError(f"the report of {sweep_dir} failed: {answer[1]!r} ({e})")))
        status = 0
    except BaseException:  # noqa: BLE001, S110 — interrupted, or the parent is gone: it reports itself if it can
        pass
    finally:
        for _ in range(3):           # a Ctrl-C already on its way raises once more; after this it is ignored
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                break
            except KeyboardInterrupt:
                pass
        _flush()
        os._exit(status)


def _end(pid: int) -> None:
    """Kill the child and reap it; its figure processes die with it (report.draw_all)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001, S110 — nothing left to tell
            pass
