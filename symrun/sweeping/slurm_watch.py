"""Knowing a SLURM job has ended on a cluster without accounting.

submitit learns a job's state from `sacct`. Where the cluster keeps no accounting (sacct answers
"Slurm accounting storage is disabled", a common setup for small clusters), every job stays
UNKNOWN, and a job that ends without writing its result — cancelled, killed for memory, its node
lost — is waited on forever, with a warning about sacct every few seconds.

`QueueWatcher` is submitit's SLURM watcher with one addition: where sacct cannot tell, it asks
`squeue` which of the user's jobs are still queued or running (array tasks one per line), and a
job that is in neither sacct nor the queue has ended. submitit then reads its result file; when
there is none, `results()` raises, and the sweep stops with one line (symrun.sweeping.launch)
leaving its runs to a rerun, which resumes them. Where sacct works, nothing changes. sacct is
asked once whether it answers; where it does not, it is not called again (nor warned about).
"""

from __future__ import annotations

import functools
import getpass
import subprocess
import time
from typing import Optional

ENDED = "ENDED (no longer queued; without SLURM accounting, how it ended is unknown)"


@functools.cache
def _watcher_class():
    """QueueWatcher, made once (submitit is imported only where a submitit launcher runs)."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class QueueWatcher(SlurmInfoWatcher):
        """SlurmInfoWatcher, with squeue where sacct cannot tell (see the module docstring)."""

        def __init__(self, delay_s: int = 60) -> None:
            super().__init__(delay_s)
            self.accounting: Optional[bool] = None        # whether sacct answers; asked once

        def update(self) -> None:
            if self._make_command() is None:              # nothing left to watch
                return
            if self.accounting is None:
                self.accounting = sacct_answers()
            if self.accounting:
                super().update()
            else:
                self._num_calls += 1
                self._last_status_check = time.time()
            waiting = [j for j in self._registered - self._finished if self.get_state(j, mode="cache") == "UNKNOWN"]
            if not waiting:
                return
            listed = queued()
            if listed is None:                            # squeue did not answer: ask again next time
                return
            for job_id in waiting:
                if job_id not in listed:
                    self._info_dict[job_id] = {"State": ENDED}
                    self._finished.add(job_id)

    return QueueWatcher


def sacct_answers() -> bool:
    """Whether `sacct` works on this cluster (exit 0 for a query of one job id)."""
    try:
        done = subprocess.run(["sacct", "-n", "-X", "-j", "1"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def queued() -> Optional[set[str]]:
    """The ids of this user's jobs SLURM still holds (pending, running, completing, requeued; an
    array's tasks one by one as `<array>_<task>`, pending ones too: `squeue -r`), or None when
    squeue does not answer."""
    try:
        mine = ["-u", getpass.getuser()]
    except (KeyError, OSError):          # no user name (a container without one): every job, a superset
        mine = []
    try:
        done = subprocess.run(["squeue", "-h", "-r", *mine, "-o", "%i"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return set(done.stdout.split())


def install() -> None:
    """Make submitit's SLURM jobs use QueueWatcher (once per process; jobs registered before
    keep their watcher). Where submitit's internals differ from those this was written
    against, submitit's own watcher stays."""
    try:
        from submitit.slurm.slurm import SlurmJob
    except ImportError:
        return
    current = SlurmJob.watcher
    if isinstance(current, _watcher_class()):
        return
    needed = ("_registered", "_finished", "_info_dict", "_num_calls", "_last_status_check")
    if not all(hasattr(current, name) for name in needed):
        return
    SlurmJob.watcher = _watcher_class()(delay_s=current._delay_s)
