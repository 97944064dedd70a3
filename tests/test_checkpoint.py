"""Checkpoint and resume: an interrupted pack continues and ends exactly as an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import assert_same_tables, sweep_dirs, write_fake_cifar
from symrun.training import engine
from symrun.sweeping import records, results, sweep
from symrun.config import total_steps


class Interrupted(Exception):
    pass


def _pack(args):
    return list(sweep.plan(args, Path("unused")).configs.values())     # plans only: nothing is written


def _assert_identical(a, b):
    """Bit-identical outcomes: status, every logged value, final parameters."""
    assert [o.status for o in a] == [o.status for o in b]
    assert [o.diverged_at for o in a] == [o.diverged_at for o in b]
    for oa, ob in zip(a, b):
        assert oa.rows == ob.rows or pd.DataFrame(oa.rows).equals(pd.DataFrame(ob.rows))  # NaN == NaN
        assert (oa.state is None) == (ob.state is None)
        for k in oa.state or {}:
            assert torch.equal(oa.state[k], ob.state[k]), k


PACKS = {
    # minibatches whose epochs do not line up with the checkpoints, momentum, label and Langevin
    # noise, and a run that diverges before the checkpoint it is restored from
    "sgd-noise": ["model=hadamard", "data.batch_size=30", "optim.momentum=0.9", "noise.label_std=0.2",
                  "noise.temperature=0,1e-4", "optim.lr=0.05,50", "seed=0,1", "train.steps=40", "train.log_every=5"],
    "adam-flip": ["model=mlp", "data=digits", "model.width=8", "optim.name=adam", "optim.lr=0.01",
                  "data.batch_size=64", "noise.label_flip=0.1", "seed=0,1", "train.steps=25", "train.log_every=4"],
    # learning-rate schedules (warm-up, a drop, a cosine) of two kinds in one pack: each step's
    # lr depends on the step alone, so a resumed pack takes the same steps
    "schedules": ["model=hadamard", "data.batch_size=30", "optim.momentum=0.9", "optim.schedule=step,cosine",
                  "optim.warmup=5", "optim.milestones=[12,20]", "optim.gamma=0.3", "optim.lr_min=0.01", "optim.lr=0.05",
                  "seed=0,1", "train.steps=40", "train.log_every=5"],
    # a task sequence whose switches (every 7 steps, with shrink and perturb) fall on checkpoints
    "tasks": ["model=mlp", "data=digits", "model.width=8", "data.batch_size=64", "tasks.count=3", "tasks.change=labels",
              "tasks.shrink=0.9", "tasks.perturb=0.1", "seed=0,1", "train.steps=7", "train.log_every=3"],
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("name", sorted(PACKS))
def test_an_interrupted_pack_resumes_to_the_same_numbers(tmp_path, name, device):
    cfgs = _pack(PACKS[name] + ["train.checkpoint_every=7", f"device={device}"])
    whole = engine.train_pack(cfgs)
    path = tmp_path / "pack.pt"
    steps = []

    def stop_after(k):
        def on_step(n):
            steps.append(n)
            if sum(steps) == k:
                raise Interrupted
        return on_step

    with pytest.raises(Interrupted):
        engine.train_pack(cfgs, on_step=stop_after(17), checkpoint=path)
    assert path.is_file()
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 14
    steps.clear()
    resumed = engine.train_pack(cfgs, on_step=steps.append, checkpoint=path)
    assert steps[0] == 14 and sum(steps) == total_steps(cfgs[0]), "resumed at the checkpoint, not from the start"
    _assert_identical(resumed, whole)
    if name == "sgd-noise":
        assert {o.status for o in whole} == {"finished", "diverged"}


def test_a_resnet_pack_resumes_with_its_batchnorm_statistics(tmp_path):
    pytest.importorskip("torchvision")
    cifar = write_fake_cifar(tmp_path / "cifar")
    cfgs = _pack(["model=resnet18", "data=cifar10", f"data.root={cifar}", "data.batch_size=4", "optim.momentum=0.9",
                  "optim.lr=0.01", "train.steps=5", "train.log_every=5", "train.checkpoint_every=2", "device=cpu"])
    whole = engine.train_pack(cfgs)
    path, seen = tmp_path / "pack.pt", []

    def stop_at_3(n):
        seen.append(n)
        if sum(seen) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        engine.train_pack(cfgs, on_step=stop_at_3, checkpoint=path)
    assert torch.load(path, weights_only=True)["stats"], "the BatchNorm running statistics are saved"
    _assert_identical(engine.train_pack(cfgs, checkpoint=path), whole)


def test_a_checkpoint_of_other_runs_is_ignored(tmp_path):
    args = ["model=hadamard", "train.steps=10", "train.log_every=5", "train.checkpoint_every=3"]
    cfgs = _pack(args + ["seed=0,1"])
    path = tmp_path / "pack.pt"

    def stop_once_saved(n):
        if path.exists():
            raise Interrupted

    with pytest.raises(Interrupted):
        engine.train_pack(cfgs, on_step=stop_once_saved, checkpoint=path)
    others = _pack(args + ["seed=0,2"])
    steps = []
    engine.train_pack(others, on_step=steps.append, checkpoint=path)
    assert steps[0] == 1 and sum(steps) == 10, "trained from the start"


@pytest.mark.slow
def test_a_killed_sweep_rerun_into_its_folder_resumes_and_matches_an_uninterrupted_one(cli, tmp_path):
    args = ["model=factorization", "model.hidden=32", "data.dim=64", "data.n=1000", "data.batch_size=50",
            "optim.weight_decay=0,1e-3", "seed=0,1", "train.steps=3000", "train.log_every=500"]
    env = {**os.environ, "NO_COLOR": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "symrun", "sweep", *args, "train.checkpoint_every=100",
                             "--outputs", str(killed)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not list(killed.glob("*/*/checkpoints/*.pt")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before it saved a checkpoint; make it longer"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    (d,) = sweep_dirs(killed)
    (ckpt,) = (d / "checkpoints").glob("*.pt")
    at = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < at < 3000
    # the pack's one record says its runs are running; none has a status.json of its own yet
    assert not any((d / "runs" / r / "status.json").exists() for r in os.listdir(d / "runs"))
    assert {r.status for r in records.read_runs(d, os.listdir(d / "runs"))} == {"running"}

    cli("sweep", *args, "train.checkpoint_every=100", f"hydra.sweep.dir={d}")
    assert not list((d / "checkpoints").glob("*.pt")), "a finished pack's checkpoint is deleted"
    cli("sweep", *args, "--outputs", str(tmp_path / "whole"))
    (w,) = sweep_dirs(tmp_path / "whole")
    assert_same_tables(d, w)
    runs = results.read_csv(d / "runs.csv")
    assert set(runs["status"]) == {"finished"} and set(runs["resumed_from"]) == {at}



def test_an_unreadable_checkpoint_fails_the_pack_with_what_to_do(tmp_path):
    cfgs = _pack(["model=hadamard", "seed=0,1", "train.steps=4", "train.checkpoint_every=2"])
    path = tmp_path / "pack.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="delete it to train the pack from the start"):
        engine.train_pack(cfgs, checkpoint=path)


def _processes_running(marker: str) -> list[int]:
    """Pids of the processes whose command line names `marker` (this test's own folder)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in cmd and marker in cmd:
            pids.append(int(pid))
    return pids


@pytest.mark.slow
def test_jobs_killed_outright_end_the_sweep_with_one_error_and_a_rerun_resumes(cli, tmp_path):
    """A job that dies without a result (OOM killer, lost node): the launcher gives up; the sweep
    says so in one line, and a rerun into the folder resumes the packs from their checkpoints."""
    args = ["model=hadamard,factorization", "data.dim=64", "data.n=1000", "data.batch_size=50",
            "train.steps=20000", "train.log_every=5000", "train.checkpoint_every=100"]
    proc = subprocess.Popen([sys.executable, "-m", "symrun", "sweep", *args, "hydra/launcher=submitit_local"],
                            cwd=tmp_path, env={**os.environ, "NO_COLOR": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while len(list(tmp_path.glob("outputs/*/*/checkpoints/*.pt"))) < 2 and time.time() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        jobs = _processes_running(str(tmp_path))
        assert len(jobs) == 2, jobs
        for pid in jobs:
            os.kill(pid, signal.SIGKILL)
        out, errors = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2
    lines = [ln for ln in errors.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "a job ended without a result" in lines[0] and "hydra.sweep.dir=" in lines[0], errors
    assert "Traceback" not in errors
    (d,) = sweep_dirs(tmp_path / "outputs")
    assert "0 finished, 0 running, 2 interrupted" in cli("status", str(d)).stdout    # the sweep has stopped
    cli("sweep", *args, f"hydra.sweep.dir={d}")
    runs = results.read_csv(d / "runs.csv")
    assert set(runs["status"]) == {"finished"} and (runs["resumed_from"] > 0).all()
