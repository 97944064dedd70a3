"""Hostile input, one table through the real `symrun` command (its Typer app, in-process; the
subprocess tests elsewhere cover the entry point): a user who mistypes, feeds damaged or huge
files, plants links in a folder they pass on, kills sweeps. Each case: the command, what it finds
on disk, the exit status and the words it must answer with; bad input is one `error:` line that
changes nothing, and no case writes outside its folder (the user's home, in a tmp folder here)."""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import trained_sweep
from symrun import cli as cli_mod
from symrun.training import engine
from symrun.sweeping import sweep

GRID = ["optim.weight_decay=0,0.5", "train.steps=6", "train.log_every=3"]


@dataclass
class Case:
    args: list[str]
    code: int
    words: list[str]
    setup: Optional[Callable[[Path, Path, Path], None]] = None    # (work folder, home, received sweep)
    patch: Optional[Callable[[pytest.MonkeyPatch], None]] = None   # what the process meets while it runs
    untouched: Optional[bool] = None     # nothing on disk created or changed (default: for exit status 2)

    def __post_init__(self):
        if self.untouched is None:
            self.untouched = self.code == 2


def _npz(name, **arrays):
    return lambda work, home, received: np.savez(work / name, **arrays)


def _received(work: Path, home: Path, received: Path) -> None:
    shutil.copytree(received, work / "D")


def _and(*steps):
    def run(work, home, received):
        for step in steps:
            step(work, home, received)
    return run


def _link(name: str, to: str):
    def plant(work, home, received):
        (work / "D" / name).unlink(missing_ok=True)
        (work / "D" / name).symlink_to(home / to)
    return plant


def _runs_link(work, home, received):
    """runs/ itself a link to a folder of the user's (the received runs moved there)."""
    shutil.move(work / "D" / "runs", home / "dir" / "runs")
    (work / "D" / "runs").symlink_to(home / "dir" / "runs", target_is_directory=True)


def _new_run_link(work, home, received):
    """runs/<id> of a run the resumed grid adds, as a link to the user's folder."""
    plan = sweep.plan([*GRID, "seed=0,1"], work, sweep_dir=work / "D")
    new = sorted(set(plan.configs) - {p.name for p in (work / "D" / "runs").iterdir()})[0]
    (work / "D" / "runs" / new).symlink_to(home / "dir", target_is_directory=True)


def _run_status(text: str):
    def damage(work, home, received):
        (sorted((work / "D" / "runs").iterdir())[0] / "status.json").write_text(text)
    return damage


def _interrupted(work, home, received):
    st = sorted((work / "D" / "runs").iterdir())[0] / "status.json"
    st.write_text(st.read_text().replace('"status": "finished"', '"status": "running"'))


def _fake_slurm(work, home, received):
    """A cluster that refuses every submission, as one without GPUs refuses a GPU request."""
    (work / "bin").mkdir()
    (work / "bin" / "srun").write_text("#!/bin/sh\nexit 0\n")
    (work / "bin" / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: "
                                         "Invalid generic resource (gres) specification' >&2\nexit 1\n")
    for f in ("srun", "sbatch"):
        (work / "bin" / f).chmod(0o755)


def _raise(exc):
    def patch(mp):
        mp.setattr(engine, "train_pack", lambda *a, **kw: (_ for _ in ()).throw(exc))
    return patch


STRINGS = np.array([["a", "b"], ["c", "d"]])
X = np.random.default_rng(0).standard_normal((50, 3))
SUITE = "suite:\n  rescaling_sparsity: []\n"

CASES = {
    "range with step 0": Case(["sweep", "optim.weight_decay=range(0,1,0)"], 2,
                              ["a sweep axis cannot be expanded: range() arg 3 must not be zero"]),
    "an .npz whose x holds strings": Case(["sweep", "data=file", "data.path=s.npz"], 2,
                                          ["s.npz: array 'x' holds <U1 values, not numbers"],
                                          _npz("s.npz", x=STRINGS, y=np.ones(2))),
    "data.dim=1e9": Case(["sweep", "data.dim=1000000000"], 2,
                         ["the teacher's data (400 rows of data.dim=1000000000) would need about", "GiB",
                          "lower data.dim"]),
    "a pack larger than memory": Case(["sweep", "model=mlp", "data.dim=10000", "model.width=4096", "seed=range(0,64)",
                                       "pack_size=64"],
                                      2, ["a pack of 64 run(s) of model=mlp would need about", "lower pack_size"]),
    "one run larger than memory": Case(["sweep", "model=mlp", "data.dim=100000", "model.width=100000"],
                                       2, ["a pack of 1 run(s) of model=mlp would need about"]),
    "class labels {0, 10000}": Case(["sweep", "data=file", "data.path=l.npz", "model=mlp"], 2,
                                    ["they go up to 10000 but only 2 distinct labels occur; renumber them 0..1"],
                                    _npz("l.npz", x=X, y=np.r_[np.zeros(25), np.full(25, 10000)])),
    "a 300-character name": Case(["sweep", "name=" + "n" * 300], 2, ["name must be a plain folder name"]),
    "name=/abs/path": Case(["sweep", "name=/tmp/elsewhere"], 2, ["name must be a plain folder name", "got '/tmp/elsewhere'"]),
    "name=${oc.env:HOME}": Case(["sweep", "name=${oc.env:HOME}"], 2, ["name must be a plain folder name"]),
    "name=..": Case(["sweep", "name=../up"], 2, ["name must be a plain folder name"]),
    "optim.eps=0": Case(["sweep", "optim.eps=0"], 2, ["optim.eps must be a positive number, got 0.0"]),
    "optim.eps=nan": Case(["sweep", "optim.eps=nan"], 2, ["optim.eps must be a positive number, got nan"]),
    "model.init_scale=inf": Case(["sweep", "model.init_scale=inf"], 2, ["model.init_scale must be a finite number, got inf"]),
    "data.noise_std=inf": Case(["sweep", "data.noise_std=inf"], 2, ["data.noise_std must be a finite number, got inf"]),
    "symmetry.remove_std=inf": Case(["sweep", "symmetry.remove_std=inf"], 2,
                                    ["symmetry.remove_std must be a finite number, got inf"]),
    "${...} in hydra.sweep.dir: Hydra resolves it": Case(["sweep", "train.steps=2", "hydra.sweep.dir=out/${name}"], 0,
                                                         ["runs: 1 finished", "out/default"], untouched=False),
    "an experiment outside the presets": Case(["sweep", "experiment=../../../home/suite"], 2,
                                              ["unknown experiment option '../../../home/suite'"],
                                              lambda work, home, received: (home / "suite.yaml").write_text(SUITE)),
    "data.target as one column name": Case(["sweep", "data=file", "data.path=d.csv", "data.target=t", "train.steps=2"],
                                           0, ["runs: 1 finished"],
                                           lambda work, home, received: (work / "d.csv").write_text(
                                               "a,b,t\n" + "".join(f"{i},{i % 3},{i / 10}\n" for i in range(9)))),
    "a run with no finite row": Case(["sweep", "model.init_scale=1,1e30", "train.steps=20"], 0,
                                     ["runs: 1 diverged, 1 finished", "runs.csv"]),
    "every run fails": Case(["sweep", *GRID], 1, ["error: 2 of 2 runs failed", "symrun status"],
                            patch=_raise(RuntimeError("out of memory (simulated)"))),
    "Ctrl-C": Case(["sweep", *GRID], 130, ["interrupted: the sweep in", "hydra.sweep.dir="],
                   patch=_raise(KeyboardInterrupt())),
    "status after an interrupted sweep": Case(["status", "D"], 0, ["1 finished, 0 running, 1 interrupted"],
                                              _and(_received, _interrupted)),
    "sweep.lock a link": Case(["sweep", *GRID, "hydra.sweep.dir=D"], 2, ["D/sweep.lock is a symbolic link"],
                              _and(_received, _link("sweep.lock", ".bashrc"))),
    "runs/ a link, on resume": Case(["sweep", *GRID, "hydra.sweep.dir=D"], 2, ["D/runs is a symbolic link"],
                                    _and(_received, _runs_link)),
    "runs/ a link, on status": Case(["status", "D"], 0, ["0 runs", "warning: D/runs is a symbolic link"],
                                    _and(_received, _runs_link)),
    "runs/<id> a link": Case(["sweep", *GRID, "seed=0,1", "hydra.sweep.dir=D"], 2, ["is a symbolic link"],
                             _and(_received, _new_run_link)),
    "a report with a link at a figure's temporary name": Case(
        ["report", "D"], 0, ["figure: D/phase_sparsity_vs_optim.weight_decay.png"],
        _and(_received, _link(".phase_sparsity_vs_optim.weight_decay.png.tmp.png", ".bashrc"))),
    "a resume over an empty status.json": Case(["sweep", *GRID, "hydra.sweep.dir=D"], 2,
                                               ["status.json is damaged (empty)", "delete the folder"],
                                               _and(_received, _run_status(""))),
    "a report over an empty status.json": Case(["report", "D"], 0, ["status.json is damaged (empty)"],
                                               _and(_received, _run_status(""))),
    "a cluster that refuses the submission": Case(
        ["sweep", *GRID, "hydra/launcher=slurm", "hydra.launcher.partition=cpu"], 2,
        ["the cluster refused the jobs, nothing was submitted: sbatch: error: Batch job submission failed",
         "hydra.launcher.gpus_per_node"], _fake_slurm, untouched=False),    # the sweep was laid out first
}


@pytest.fixture(scope="module")
def received(tmp_path_factory) -> Path:
    return trained_sweep(GRID, tmp_path_factory.mktemp("received"))


def _tree(root: Path) -> dict:
    return {p: (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(name, tmp_path, monkeypatch, received):
    case = CASES[name]
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    (home / "dir").mkdir(parents=True)
    (home / ".bashrc").write_text("alias ll='ls -l'\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", f"{work / 'bin'}:{os.environ['PATH']}")
    monkeypatch.chdir(work)
    if case.setup is not None:
        case.setup(work, home, received)
    if case.patch is not None:
        case.patch(monkeypatch)
    before_home, before_work = _tree(home), _tree(work)

    result = CliRunner().invoke(cli_mod.app, case.args)

    said = result.stdout + result.stderr
    assert result.exit_code == case.code, said
    assert "Traceback" not in said and (result.exception is None or isinstance(result.exception, SystemExit)), said
    flat = " ".join(said.split())
    for words in case.words:
        assert words in flat, said
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == (case.code in (1, 2)), result.stderr          # one line (Ctrl-C is no error)
    if case.untouched:
        assert _tree(work) == before_work, "bad input changes nothing"
    assert _tree(home) == before_home, "nothing is written outside the folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "work"]
