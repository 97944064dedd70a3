"""Sweeps on a real SLURM (the one-node cluster `.ci/slurm-up` starts), and pack sizing."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import assert_same_tables, sweep_dirs
from symrun.sweeping import job, results, sweep, tables

SLURM_UP = Path(__file__).resolve().parent.parent / ".ci" / "slurm-up"
GRID = ["model=hadamard,factorization", "seed=0,1", "optim.weight_decay=0,0.1", "train.steps=20", "train.log_every=5"]


OPT_IN = "SYMRUN_TEST_SLURM"    # .ci/run sets it: starting a cluster is never a side effect of `make test`


@pytest.fixture(scope="session")
def slurm_partition() -> str:
    """A partition of a running SLURM: `.ci/slurm-up` starts one on localhost when needed (as root;
    it installs Debian's packages when missing). Only when asked with SYMRUN_TEST_SLURM=1 (as
    .ci/run does): a user's `make test` must not install packages or start daemons. Skips, saying
    why, where none can start."""
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(f"the SLURM tests run only when asked: {OPT_IN}=1 make test (as root, .ci/slurm-up then "
                    "installs Debian's SLURM if needed and starts a one-node cluster on localhost; .ci/run does this)")
    try:
        up = subprocess.run([str(SLURM_UP)], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"no SLURM: {SLURM_UP.name} could not run: {e}")
    if up.returncode != 0:
        pytest.skip(f"no SLURM: {SLURM_UP.name} failed: {(up.stderr or up.stdout).strip().splitlines()[-1:]}")
    listed = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=30)
    partitions = [ln.split()[0].rstrip("*") for ln in listed.stdout.splitlines() if ln.split()[1:] == ["up"]]
    if not partitions:
        pytest.skip(f"no SLURM partition is up: {listed.stdout or listed.stderr}")
    return partitions[0]


@pytest.mark.slurm
@pytest.mark.slow
def test_a_sweep_on_slurm_matches_the_same_sweep_run_locally(cli, tmp_path, slurm_partition):
    # The shipped cluster preset, fitted to a 2-CPU node without GPUs; pack_size=1: one job per run.
    on_slurm = cli("sweep", *GRID, "pack_size=1", "hydra/launcher=slurm", f"hydra.launcher.partition={slurm_partition}",
                   "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
                   "hydra.launcher.timeout_min=10", "--outputs", "slurm")
    assert "8 runs in 8 pack(s)" in on_slurm.stdout
    cli("sweep", *GRID, "pack_size=1", "--outputs", "local")
    (s,), (local,) = sweep_dirs(tmp_path / "slurm"), sweep_dirs(tmp_path / "local")
    runs = results.read_csv(s / "runs.csv")
    assert len(runs) == 8 and set(runs["status"]) == {"finished"}
    # SLURM ran every pack as a task of one job array: each run names its task, whose submitit
    # folder holds the job's log, and no run ran outside SLURM.
    tasks = runs["slurm_job_id"].astype(str)
    assert tasks.nunique() == 8 and tasks.str.fullmatch(r"\d+_\d").all(), tasks.tolist()
    assert tasks.str.split("_").str[0].nunique() == 1, "one array for the batch of packs"
    folder = s / ".submitit"          # hydra.sweep.dir/.submitit, submitit_slurm's default
    for task in tasks:
        assert f"JobEnvironment(job_id={task}," in (folder / task / f"{task}_0_log.out").read_text()
        assert (folder / task / f"{task}_0_result.pkl").is_file()
    (script,) = folder.glob("*/*_submission.sh")
    sbatch = script.read_text()
    assert f"--partition={slurm_partition}" in sbatch and "export OMP_NUM_THREADS=1" in sbatch  # the preset's setup
    shown = subprocess.run(["scontrol", "show", "job", tasks[0].split("_")[0]], capture_output=True, text=True)
    assert shown.returncode != 0 or "JobState=COMPLETED" in shown.stdout, shown.stdout
    # The same numbers, bit for bit, as the same sweep run locally: tables equal apart from provenance.
    assert_same_tables(s, local)
    assert set(results.read_csv(local / "runs.csv")["slurm_job_id"].isna()) == {True}


@pytest.mark.slurm
@pytest.mark.slow
def test_a_suites_members_run_at_once_as_one_job_array(cli, tmp_path, slurm_partition):
    """experiment=symmetry_removal is five sweeps; on SLURM their packs are one array, submitted
    together, not one array after another."""
    cli("sweep", "experiment=symmetry_removal", "seed=0", "train.steps=4", "train.log_every=2",
        "metrics.critical_mirrors=0", "hydra/launcher=slurm", f"hydra.launcher.partition={slurm_partition}",
        "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=10")
    (parent,) = (tmp_path / "outputs" / "symmetry_removal").iterdir()
    members = sorted(d for d in parent.iterdir() if (d / "sweep.json").is_file())
    runs = pd.concat([results.read_csv(d / "runs.csv").assign(member=d.name) for d in members])
    assert len(members) == 5 and set(runs["status"]) == {"finished"}
    tasks = runs["slurm_job_id"].astype(str)
    assert tasks.str.split("_").str[0].nunique() == 1, "one array for every member's packs"
    assert tasks.str.split("_").str[1].astype(int).nunique() == len(results.read_json(parent / "launches" / "0" / "plan.json")["packs"])
    assert (parent / ".submitit").is_dir() and (parent / "launches" / "0" / "packs").is_dir()


def test_pack_size_changes_how_many_jobs_not_the_numbers(tmp_path):
    """Many small jobs or few large ones: a run's numbers do not depend on its pack (up to float64
    rounding: BLAS sums a (1, …) and a (4, …) batch in different orders)."""
    sizes = {}
    for pack_size in (1, 3, 256):
        plan = sweep.plan([*GRID, "train.dtype=float64", f"pack_size={pack_size}"], tmp_path / str(pack_size))
        sizes[pack_size] = sorted(len(p) for p in plan.packs)
        sweep.write_plan(plan)
        job.run_plan(plan)
        tables.write_tables(plan.sweep_dir)
    assert sizes == {1: [1] * 8, 3: [1, 1, 3, 3], 256: [4, 4]}
    (one,), (three,), (big,) = (sweep_dirs(tmp_path / str(k)) for k in (1, 3, 256))
    assert_same_tables(one, big, rtol=1e-9)
    assert_same_tables(three, big, rtol=1e-9)
    assert pd.read_csv(one / "runs.csv")["pack"].nunique() == 8


@pytest.mark.slurm
@pytest.mark.slow
def test_a_preempted_pack_is_requeued_and_resumes_from_its_checkpoint(cli, tmp_path, slurm_partition):
    """SLURM signals the job as it would before preempting it; submitit calls the launcher's
    checkpoint method and requeues the job, which resumes the pack from its last checkpoint."""
    args = ["model=factorization", "model.hidden=32", "data.dim=64", "data.n=1000", "data.batch_size=50",
            "seed=0,1", "train.steps=1500", "train.log_every=250", "train.checkpoint_every=50"]
    proc = subprocess.Popen([sys.executable, "-m", "symrun", "sweep", *args, "hydra/launcher=slurm",
                             f"hydra.launcher.partition={slurm_partition}", "hydra.launcher.gpus_per_node=null",
                             "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1", "--outputs", "slurm"],
                            cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    job = None
    try:
        ckpt = _wait_for(lambda: next(iter((tmp_path / "slurm").glob("*/*/checkpoints/*.pt")), None), proc)
        (d,) = sweep_dirs(tmp_path / "slurm")
        job = next(iter(results.started_runs(d).values()))["slurm_job_id"]     # the pack's record says
        (script,) = (d / ".submitit").glob("*/*_submission.sh")
        signal_name = re.search(r"--signal=(\w+)@", script.read_text()).group(1)
        subprocess.run(["scancel", f"--signal={signal_name}", job], check=True, timeout=30)
        # A requeued job waits ~2 minutes before it may start again; let it start sooner. Not in the
        # same second as the requeue: slurmd revoked the old credential in that second, refuses a
        # launch whose credential is no newer ("Job credential revoked") and the job then ends.
        _wait_for(lambda: "Restarts=1" in _scontrol(job) and "JobState=PENDING" in _scontrol(job), proc)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], check=True, timeout=30)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
        if job is not None and proc.returncode != 0:
            subprocess.run(["scancel", job], timeout=30)
    assert proc.returncode == 0, out
    assert not ckpt.exists()
    runs = results.read_csv(d / "runs.csv")
    assert set(runs["status"]) == {"finished"}
    assert (runs["resumed_from"] > 0).all() and (runs["resumed_from"] % 50 == 0).all(), runs["resumed_from"]
    assert "Requeued job" in "".join(p.read_text() for p in (d / ".submitit").rglob("*_log.out"))
    # The job ran on one CPU (cpus_per_task=1; the preset's setup exports OMP_NUM_THREADS to match),
    # so the uninterrupted sweep runs on one thread too: on an Intel CPU, MKL's results depend on
    # its thread count (λ_c's rotation blocks differ in their last bits between 1 and 2 threads),
    # and the comparison is about the requeue, value for value.
    cli("sweep", *args, "--outputs", "local", env={"OMP_NUM_THREADS": "1"})
    assert_same_tables(d, sweep_dirs(tmp_path / "local")[0])


@pytest.mark.slurm
@pytest.mark.slow
def test_a_job_cancelled_without_a_result_ends_the_sweep_with_one_line(tmp_path, slurm_partition):
    """A job that ends without writing its result (cancelled here; killed for memory or its node
    lost elsewhere) stops the sweep with one line naming the way back, also where the cluster
    keeps no accounting (this one: sacct cannot say the job ended), instead of waiting forever."""
    proc = subprocess.Popen([sys.executable, "-m", "symrun", "sweep", "model=hadamard", "train.steps=5000000",
                             "train.log_every=1000000", "hydra/launcher=slurm", f"hydra.launcher.partition={slurm_partition}",
                             "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
                             "hydra.launcher.timeout_min=20", "--outputs", "slurm"],
                            cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    job = None
    try:
        def running():
            found = [started for d in sweep_dirs(tmp_path / "slurm") for started in results.started_runs(d).values()]
            return found and found[0].get("slurm_job_id")
        job = _wait_for(running, proc)                      # the pack is training on the node
        subprocess.run(["scancel", job], check=True, timeout=30)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
        if job is not None:
            subprocess.run(["scancel", job], timeout=30)
    assert proc.returncode != 0, out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert "a job ended without a result" in line and "rerun with hydra.sweep.dir=" in line, out
    assert "Bypassing sacct error" not in out                   # no warning every few seconds either
    (d,) = sweep_dirs(tmp_path / "slurm")
    assert set(results.read_csv(d / "runs.csv")["status"]) <= {"running", "interrupted"}


def _scontrol(job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout


def _wait_for(found, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = found()
        if value:
            return value
        assert proc.poll() is None, f"the sweep ended first:\n{proc.stdout.read()}"
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def test_the_shipped_cluster_preset_composes_with_overrides():
    from symrun.sweeping.composition import composer

    with composer(["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=8"]) as comp:
        launcher = comp.master.hydra.launcher
        assert launcher._target_.endswith("SlurmLauncher")
        assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.max_num_timeout == 3
        assert list(launcher.setup) == ["export OMP_NUM_THREADS=8"]


def test_without_accounting_a_job_no_longer_queued_has_ended(monkeypatch):
    """symrun.sweeping.slurm_watch, without a cluster: where sacct cannot tell, a job is waited on
    while squeue lists it (or squeue does not answer), and has ended once it does not."""
    pytest.importorskip("submitit")
    from symrun.sweeping import slurm_watch

    listed: dict = {"ids": {"7_0", "7_1"}}
    asked = []
    monkeypatch.setattr(slurm_watch, "sacct_answers", lambda: asked.append(1) or False)
    monkeypatch.setattr(slurm_watch, "queued", lambda: listed["ids"])
    watcher = slurm_watch._watcher_class()(delay_s=1)
    for job_id in ("7_0", "7_1"):
        watcher.register_job(job_id)
    watcher.update()
    assert [watcher.get_state(j, mode="cache") for j in ("7_0", "7_1")] == ["UNKNOWN", "UNKNOWN"]
    listed["ids"] = None                            # squeue did not answer: nothing is decided
    watcher.update()
    assert not watcher.is_done("7_1", mode="cache")
    listed["ids"] = {"7_0"}                         # task 1 left the queue, task 0 still runs
    watcher.update()
    assert watcher.is_done("7_1", mode="cache") and not watcher.is_done("7_0", mode="cache")
    assert watcher.get_state("7_1", mode="cache") == slurm_watch.ENDED
    listed["ids"] = set()
    watcher.update()
    assert watcher.is_done("7_0", mode="cache") and len(asked) == 1      # sacct asked once, then left alone


def test_the_queue_watcher_replaces_submitits_once(monkeypatch):
    submitit_slurm = pytest.importorskip("submitit.slurm.slurm")
    from symrun.sweeping import slurm_watch

    monkeypatch.setattr(submitit_slurm.SlurmJob, "watcher", submitit_slurm.SlurmInfoWatcher(delay_s=600))
    slurm_watch.install()
    installed = submitit_slurm.SlurmJob.watcher
    assert installed.accounting is None and installed._delay_s == 600
    slurm_watch.install()
    assert submitit_slurm.SlurmJob.watcher is installed
