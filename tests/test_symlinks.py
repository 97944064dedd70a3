"""A sweep folder received from someone else: no link inside it makes symrun write, delete or
read anything outside it (symrun.sweeping.folder), whether it is reported on, collected or resumed."""

import os
import shutil
from pathlib import Path

import pytest

from symrun.sweeping import folder, job, records, results, sweep, tables
from symrun.analysis import report

GRID = ["optim.weight_decay=0,0.5", "train.steps=6", "train.log_every=3"]


@pytest.fixture(scope="module")
def received(tmp_path_factory) -> Path:
    """A finished two-run sweep, as a colleague would send it."""
    root = tmp_path_factory.mktemp("received")
    plan = sweep.plan(GRID, root)
    sweep.write_plan(plan)
    job.run_plan(plan)
    report.build(plan.sweep_dir)
    return plan.sweep_dir


@pytest.fixture
def victim(tmp_path) -> Path:
    """The user's own files, outside any sweep folder; a planted link points at them."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("alias ll='ls -l'\n")
    (home / "secret.csv").write_text("step,train_loss\n0,0.123456789\n")
    (home / "dir").mkdir()
    (home / "dir" / ".keep.tmp").write_text("mine")
    return home


def _snapshot(home: Path) -> dict:
    return {p: (p.is_symlink(), p.read_bytes() if p.is_file() else None) for p in sorted(home.rglob("*"))}


def _copy(received: Path, tmp_path: Path) -> Path:
    d = tmp_path / "sweep"
    shutil.copytree(received, d, symlinks=True)
    return d


def test_a_report_writes_no_figure_or_table_through_a_planted_link(received, tmp_path, victim):
    d = _copy(received, tmp_path)
    before = _snapshot(victim)
    figure = "phase_sparsity_vs_optim.weight_decay.png"
    (d / f".{figure}.tmp.png").symlink_to(victim / ".bashrc")       # the old fixed temporary name
    (d / figure).unlink()
    (d / figure).symlink_to(victim / ".bashrc")                      # the figure's own name
    (d / "runs.csv").unlink()
    (d / "runs.csv").symlink_to(victim / "secret.csv")
    rep = report.build(d)
    assert d / figure in rep.figures
    assert not (d / figure).is_symlink() and (d / figure).read_bytes()[:4] == b"\x89PNG"
    assert not (d / "runs.csv").is_symlink() and "0.123456789" not in (d / "runs.csv").read_text()
    assert _snapshot(victim) == before


def test_a_resume_refuses_a_lock_file_that_is_a_link(received, tmp_path, victim):
    d = _copy(received, tmp_path)
    (d / results.LOCK_NAME).unlink(missing_ok=True)
    (d / results.LOCK_NAME).symlink_to(victim / ".bashrc")
    before = _snapshot(victim)
    with pytest.raises(results.OutputError, match=r"sweep\.lock is a symbolic link"):
        with results.sweep_lock(d):
            pass
    plan = sweep.plan(GRID, tmp_path, sweep_dir=d)
    with pytest.raises(results.OutputError, match=r"sweep\.lock is a symbolic link"):
        records.check_folder(d, plan.configs)
    assert _snapshot(victim) == before


@pytest.mark.parametrize("planted", ["run", "runs", "checkpoints", "launches"])
def test_a_resume_refuses_a_link_where_it_would_write_and_writes_nothing_through_it(received, tmp_path, victim,
                                                                                   planted):
    d = _copy(received, tmp_path)
    plan = sweep.plan([*GRID, "seed=0,1"], tmp_path, sweep_dir=d)          # two new runs to train
    new = sorted(set(plan.configs) - set(results.run_ids(d)))[0]
    where = {"run": d / "runs" / new, "runs": d / "runs", "checkpoints": d / "checkpoints",
             "launches": d / "launches"}[planted]
    if where.exists():
        shutil.move(where, victim / "dir" / where.name)
    where.symlink_to(victim / "dir", target_is_directory=True)
    before = _snapshot(victim)
    with pytest.raises(results.OutputError) as refused:
        records.check_folder(d, plan.configs)
    assert str(refused.value).startswith(f"{where} is a symbolic link") and "\n" not in str(refused.value)
    # the writes themselves refuse it too, should anything call them without the check
    with pytest.raises(results.OutputError, match="is a symbolic link"):
        results.write_json(where / "x.json", {}, root=d)
    assert _snapshot(victim) == before


def test_a_report_over_a_run_folder_that_is_a_link_reports_it_damaged(received, tmp_path, victim):
    d = _copy(received, tmp_path)
    rid, other = results.run_ids(d)
    shutil.copytree(d / "runs" / rid, victim / "run")
    shutil.rmtree(d / "runs" / rid)
    (d / "runs" / rid).symlink_to(victim / "run", target_is_directory=True)
    before = _snapshot(victim)
    rep = report.build(d)                                  # the whole report, not a link error
    status = results.read_csv(d / "runs.csv").set_index("run_id")["status"]
    assert status[rid] == "damaged" and status[other] == "finished" and rep.figures
    assert _snapshot(victim) == before


def test_a_suite_member_that_is_a_link_is_refused(tmp_path, victim):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "rescaling_sparsity").symlink_to(victim / "dir", target_is_directory=True)
    with pytest.raises(results.OutputError, match="rescaling_sparsity is a symbolic link"):
        records.check_folder(suite / "rescaling_sparsity", [], suite=suite)


@pytest.mark.parametrize("name", ["launches", ".submitit"])
def test_a_suite_folder_whose_own_folders_are_links_is_refused_before_any_member_is_written(tmp_path, victim, cli, name):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / name).symlink_to(victim / "dir", target_is_directory=True)
    before = _snapshot(victim)
    proc = cli("sweep", "experiment=symmetry_removal", "train.steps=2", "train.log_every=1", f"hydra.sweep.dir={suite}",
               check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and f"{name} is a symbolic link" in lines[0], proc.stderr
    assert sorted(p.name for p in suite.iterdir()) == [name] and _snapshot(victim) == before


def test_a_submitit_folder_that_is_a_link_is_refused(received, tmp_path, victim):
    d = _copy(received, tmp_path)
    (d / ".submitit").symlink_to(victim / "dir", target_is_directory=True)
    with pytest.raises(results.OutputError, match=".submitit is a symbolic link"):
        records.check_folder(d, results.run_ids(d))


def test_collect_and_status_read_nothing_through_a_link(received, tmp_path, victim):
    d = _copy(received, tmp_path)
    rid, other = results.run_ids(d)
    shutil.copytree(d / "runs" / rid, victim / "run")
    (victim / "run" / "metrics.csv").write_text("step,train_loss\n0,0.123456789\n")
    shutil.rmtree(d / "runs" / rid)
    (d / "runs" / rid).symlink_to(victim / "run", target_is_directory=True)      # a whole run folder
    (d / "runs" / other / "metrics.csv").unlink()
    (d / "runs" / other / "metrics.csv").symlink_to(victim / "secret.csv")       # one file of a run
    before = _snapshot(victim)
    runs, res = tables.write_tables(d)
    status = runs.set_index("run_id")["status"]
    assert status[rid] == "damaged" and status[other] == "damaged"      # named, never read
    assert "0.123456789" not in (d / "results.csv").read_text() + (d / "runs.csv").read_text()
    assert tables.sweep_status(d).counts["damaged"] == 2
    assert _snapshot(victim) == before


def test_stale_temporaries_are_removed_without_following_links(received, tmp_path, victim):
    d = _copy(received, tmp_path)
    rid = results.run_ids(d)[0]
    (d / "runs" / "elsewhere").symlink_to(victim / "dir", target_is_directory=True)
    (d / "checkpoints").mkdir()
    stale = [d / ".runs.csv.0badc0de.tmp", d / "runs" / rid / ".metrics.csv.0badc0de.tmp",
             d / "checkpoints" / ".abc.pt.0badc0de.tmp"]
    for p in stale:
        p.write_text("half")
    (d / ".sweep.json.1234abcd.tmp").symlink_to(victim / ".bashrc")
    before = _snapshot(victim)
    removed = records.remove_stale_temps(d)
    assert sorted(removed) == sorted(stale + [d / ".sweep.json.1234abcd.tmp"])
    assert not any(p.exists() or p.is_symlink() for p in removed)
    assert _snapshot(victim) == before


def test_a_new_launch_never_reuses_a_launch_folder_the_received_folder_brought(received, tmp_path, victim):
    d = _copy(received, tmp_path)
    (d / "launches" / "1").mkdir()
    (d / "launches" / "1" / "packs").symlink_to(victim / "dir", target_is_directory=True)
    plan = sweep.plan([*GRID, "seed=0,1"], tmp_path, sweep_dir=d)
    path = sweep.write_plan(plan)
    assert path == d / "launches" / "2" / "plan.json"


def test_writes_never_follow_a_link_inside_the_folder(tmp_path, victim):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "b").symlink_to(victim / "dir", target_is_directory=True)
    (root / "file").symlink_to(victim / ".bashrc")
    before = _snapshot(victim)
    with pytest.raises(folder.OutputError, match=r"a/b is a symbolic link"):
        folder.write_atomic(root / "a" / "b" / "x.txt", "x", root)
    with pytest.raises(folder.OutputError, match=r"a/b is a symbolic link"):
        folder.read_bytes(root / "a" / "b" / ".keep.tmp", root)
    with pytest.raises(folder.OutputError, match="is a symbolic link"):
        folder.read_bytes(root / "file", root)
    folder.write_atomic(root / "file", "mine now", root)          # the link is replaced, not followed
    assert not (root / "file").is_symlink() and (root / "file").read_text() == "mine now"
    with pytest.raises(folder.OutputError, match="not inside"):
        folder.write_atomic(root / ".." / "escaped.txt", "x", root)
    assert _snapshot(victim) == before
    assert sorted(os.listdir(root)) == ["a", "file"], "no temporary file is left behind"


def test_run_folders_written_in_a_batch_never_follow_a_link(tmp_path, victim):
    """results.write_statuses/save_configs/write_runs open runs/ once and each run's folder in it:
    a run folder that is a link is refused by name, and the runs before it are written."""
    root = tmp_path / "root"
    (root / "runs").mkdir(parents=True)
    (root / "runs" / "b").symlink_to(victim / "dir", target_is_directory=True)
    before = _snapshot(victim)
    with pytest.raises(folder.OutputError, match=r"runs/b is a symbolic link"):
        results.write_statuses(root, [("a", results.RUNNING, {}), ("b", results.RUNNING, {}), ("c", results.RUNNING, {})])
    assert results.status(root, "a") == {"run_id": "a", "status": results.RUNNING} and not (root / "runs" / "c").exists()
    with pytest.raises(folder.OutputError, match=r"runs/b is a symbolic link"):
        results.write_runs(root, [("b", results.FINISHED, [{"step": 0, "train_loss": 1.0}], None, None, {})])
    (root / "runs" / "b").unlink()
    (root / "runs").rename(root / "elsewhere")
    (root / "runs").symlink_to(victim / "dir", target_is_directory=True)
    with pytest.raises(folder.OutputError, match=r"root/runs is a symbolic link"):
        results.write_statuses(root, [("a", results.FINISHED, {})])
    with folder.folders(root / "elsewhere", root, create=False) as runs:
        with pytest.raises(FileNotFoundError):
            runs.opened("missing", create=False).__enter__()
    assert _snapshot(victim) == before


def test_a_pack_job_refuses_a_run_not_planned_and_a_runs_folder_that_is_a_link(tmp_path, victim):
    plan = sweep.plan(["train.steps=2", "train.log_every=2", "seed=0,1"], tmp_path)
    sweep.write_plan(plan)
    configs = list(plan.configs.values())
    stranger = list(sweep.plan(["train.steps=2", "train.log_every=2", "seed=5"], tmp_path / "other").configs.values())
    with pytest.raises(RuntimeError, match=f"pack 0 holds run {results.run_id(stranger[0])}, which was not planned"):
        job.run_pack(plan.sweep_dir, 0, configs + stranger)
    before = _snapshot(victim)
    (plan.sweep_dir / "runs").rename(plan.sweep_dir / "moved")
    (plan.sweep_dir / "runs").symlink_to(victim / "dir", target_is_directory=True)
    with pytest.raises(folder.OutputError, match=r"runs is a symbolic link"):
        job.run_pack(plan.sweep_dir, 0, configs)
    assert _snapshot(victim) == before


def test_the_sweep_folder_itself_may_be_a_link_the_user_made(received, tmp_path):
    real = _copy(received, tmp_path)
    alias = tmp_path / "alias"
    alias.symlink_to(real, target_is_directory=True)
    records.check_folder(alias, results.run_ids(real))
    runs, _ = tables.write_tables(alias)
    assert len(runs) == 2 and (real / "runs.csv").is_file()


@pytest.mark.parametrize("planted", ["lock", "run"])
def test_resuming_through_the_cli_is_refused_in_one_line(received, tmp_path, victim, cli, planted):
    d = _copy(received, tmp_path)
    if planted == "lock":
        (d / results.LOCK_NAME).unlink(missing_ok=True)
        (d / results.LOCK_NAME).symlink_to(victim / ".bashrc")
    else:
        plan = sweep.plan([*GRID, "seed=0,1"], tmp_path, sweep_dir=d)
        new = sorted(set(plan.configs) - set(results.run_ids(d)))[0]
        (d / "runs" / new).symlink_to(victim / "dir", target_is_directory=True)
    before, inside = _snapshot(victim), _snapshot(d)
    proc = cli("sweep", *GRID, "seed=0,1", f"hydra.sweep.dir={d}", check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "is a symbolic link" in lines[0], proc.stderr
    assert _snapshot(victim) == before and _snapshot(d) == inside


@pytest.mark.parametrize("planted", [".hydra", ".hydra/config.yaml", "symrun.log", "damaged sweep.json"])
def test_symrun_run_into_a_received_folder_checks_it_before_hydra_writes(tmp_path, victim, cli, planted):
    """`symrun run hydra.run.dir=D` where D was written before: Hydra writes .hydra/ and its log
    into D with plain open(), so links there, like a damaged sweep.json, are refused first."""
    d = tmp_path / "one"
    cli("run", "model=hadamard", "train.steps=4", "train.log_every=2", f"hydra.run.dir={d}")
    if planted == ".hydra":
        shutil.rmtree(d / ".hydra")
        (d / ".hydra").symlink_to(victim / "dir", target_is_directory=True)
    elif planted == "damaged sweep.json":
        (d / "sweep.json").write_text("{not json")
    else:
        (d / planted).unlink()
        (d / planted).symlink_to(victim / ".bashrc")
    before, inside = _snapshot(victim), _snapshot(d)
    proc = cli("run", "model=hadamard", "train.steps=4", "train.log_every=2", f"hydra.run.dir={d}", check=False)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert ("is a symbolic link" if planted != "damaged sweep.json" else "sweep.json") in lines[0]
    assert _snapshot(victim) == before and _snapshot(d) == inside
