"""Sweep bookkeeping in-process: failures and divergences are recorded per run, neighbours finish."""

import json

import pandas as pd
import pytest
import torch

from symrun.training import engine
from symrun.sweeping import job, results, sweep, tables


def _run_all(plan):
    sweep.write_plan(plan)
    job.run_plan(plan)
    return tables.write_tables(plan.sweep_dir)


def test_a_failing_pack_is_recorded_and_the_other_packs_finish(tmp_path, monkeypatch):
    real = engine.train_pack

    def flaky(cfgs, **kw):
        if cfgs[0].model.name == "factorization":
            raise RuntimeError("simulated out of memory")
        return real(cfgs, **kw)

    monkeypatch.setattr(engine, "train_pack", flaky)
    plan = sweep.plan(["model=hadamard,factorization", "seed=0,1", "train.steps=5", "train.log_every=5"], tmp_path)
    runs, _ = _run_all(plan)
    by_model = runs.groupby("model.name")["status"].agg(set)
    assert by_model["hadamard"] == {"finished"} and by_model["factorization"] == {"failed"}
    failed = runs[runs["status"] == "failed"]
    assert failed["error"].str.contains("simulated out of memory").all()
    st = json.loads((results.run_dir(plan.sweep_dir, failed["run_id"].iloc[0]) / "status.json").read_text())
    assert "RuntimeError" in st["traceback"]
    # rerunning retries the failed runs only
    monkeypatch.setattr(engine, "train_pack", real)
    again = sweep.plan(["model=hadamard,factorization", "seed=0,1", "train.steps=5", "train.log_every=5"], tmp_path,
                       sweep_dir=plan.sweep_dir)
    assert sorted(again.finished) == sorted(runs[runs["status"] == "finished"]["run_id"])
    runs, _ = _run_all(again)
    assert set(runs["status"]) == {"finished"}


def test_a_diverged_run_is_recorded_and_its_pack_mates_finish(tmp_path):
    plan = sweep.plan(["optim.lr=0.1,1e4", "train.steps=50", "train.log_every=10"], tmp_path)
    runs, res = _run_all(plan)
    status = runs.set_index("optim.lr")["status"]
    assert status[1e4] == "diverged" and status[0.1] == "finished"
    bad = runs[runs["status"] == "diverged"].iloc[0]
    assert bad["diverged_at"] > 0
    # It keeps its frozen, finite parameters, and its last finite metrics are its final ones.
    state = results.load_params(results.run_dir(plan.sweep_dir, bad["run_id"]) / "params.pt")
    assert all(torch.isfinite(t).all() for t in state.values())
    rows = res[res["run_id"] == bad["run_id"]]
    assert rows["step"].max() < bad["diverged_at"] and rows["train_loss"].notna().all()
    assert bad["train_loss"] == rows["train_loss"].iloc[-1]
    good = res[res["run_id"] == runs[runs["status"] == "finished"]["run_id"].iloc[0]]
    assert good["step"].max() == 50 and good["train_loss"].notna().all()


def test_tables_rebuild_from_run_folders_and_floats_round_trip(tmp_path):
    plan = sweep.plan(["optim.weight_decay=0.1,0.30000000000000004", "train.steps=2", "train.log_every=1"], tmp_path)
    runs, _ = _run_all(plan)
    back = results.read_csv(plan.sweep_dir / "runs.csv")
    assert sorted(back["optim.weight_decay"]) == [0.1, 0.30000000000000004]
    finals = {r: json.loads((results.run_dir(plan.sweep_dir, r) / "status.json").read_text())["final"]["train_loss"]
              for r in back["run_id"]}
    assert all(back.set_index("run_id")["train_loss"][r] == v for r, v in finals.items())
    assert not list(plan.sweep_dir.rglob("*.tmp")), "atomic writes leave no temporary files"


def test_a_diverged_runs_row_and_parameters_describe_the_same_step(tmp_path):
    # lr=2.5 diverges at step 8 (tests/test_engine.py: the step that produced a non-finite value);
    # its rows are steps 0, 3, 6, and the parameters it saves are those of step 6, not 7
    plan = sweep.plan(["optim.lr=0.1,2.5", "train.steps=20", "train.log_every=3"], tmp_path)
    runs, _ = _run_all(plan)
    bad = runs.set_index("optim.lr").loc[2.5]
    assert bad["status"] == "diverged" and bad["diverged_at"] == 8
    d = results.run_dir(plan.sweep_dir, bad["run_id"])
    st = json.loads((d / "status.json").read_text())
    rows = pd.read_csv(d / "metrics.csv")
    assert st["final_step"] == rows["step"].iloc[-1] == 6 and bad["train_loss"] == rows["train_loss"].iloc[-1]
    # params.pt holds the parameters of that row: their weight norm is the row's
    params = results.load_params(d / "params.pt")
    norm = torch.sqrt(sum((p.double() ** 2).sum() for p in params.values())).item()
    assert norm == pytest.approx(bad["weight_norm"], rel=1e-6)
    # a run with no finite row at all (it overflows at step 0): recorded, with no parameters
    plan = sweep.plan(["model.init_scale=1,1e30", "train.steps=20", "train.log_every=10"], tmp_path / "e")
    runs, _ = _run_all(plan)
    bad = runs.set_index("model.init_scale").loc[1e30]
    assert bad["status"] == "diverged" and bad["diverged_at"] == 0
    assert not (results.run_dir(plan.sweep_dir, bad["run_id"]) / "params.pt").exists()
    assert (results.run_dir(plan.sweep_dir, bad["run_id"]) / "metrics.csv").read_text() == "step\n"


@pytest.mark.parametrize("args", [
    ["model=hadamard", "data.batch_size=null", "train.steps=2", "train.log_every=2", "optim.weight_decay=0,0.1",
     "seed=0,1,2", "data.n=20"],
    ["experiment=symmetry_removal", "train.steps=2", "train.log_every=2", "seed=0"],
], ids=["sweep", "suite"])
def test_a_job_in_this_process_takes_its_packs_configs_from_the_plan(tmp_path, monkeypatch, args):
    """In-process (Hydra's basic launcher), a pack job takes its runs' configs and ids from the
    plan (job.PLANNED): the same configs, ids, folder and pack number its job config builds."""
    from hydra.core.hydra_config import HydraConfig
    from typer.testing import CliRunner

    from symrun import cli as cli_mod
    from symrun.sweeping import job, records, results

    real, built, seen = job.task, job.pack_configs, []

    def task(cfg):
        planned = job.PLANNED[tuple(HydraConfig.get().overrides.task)]
        sweep_dir, index, configs = built(cfg)
        ids = [results.run_id(c) for c in configs]
        assert planned == (sweep_dir, index, ids, configs, records.needing_training(sweep_dir, ids))
        seen.append(index)
        return real(cfg)

    def not_built(cfg):
        raise AssertionError("the job built its configs again")

    monkeypatch.setattr(job, "task", task)
    monkeypatch.setattr(job, "pack_configs", not_built)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli_mod.app, ["sweep", "--outputs", str(tmp_path / "out"), *args])
    assert result.exit_code == 0, result.output
    assert seen and job.PLANNED == {}, "every job checked; the plan is let go after the launch"


def test_jobs_with_the_same_overrides_build_their_own_configs(tmp_path):
    """Two jobs whose overrides are alike would share one entry of job.PLANNED, and one would
    train the other's runs: then no job takes its configs from the plan."""
    from types import SimpleNamespace

    from symrun.sweeping import job, launch

    seen = []

    class Launcher:
        def launch(self, jobs, initial_job_idx):
            seen.append(dict(job.PLANNED))
            return []

    plan = SimpleNamespace(sweep_dir=tmp_path, packs=[["a", "c"], ["b"]], configs={"a": "config a", "b": "config b",
                                                                                  "c": "config c"}, finished=["c"], steps=1)
    launch._launch(Launcher(), [["x=1", "+pack.index=0"], ["x=1", "+pack.index=1"]], [plan], True, [(plan, 0), (plan, 1)])
    assert seen[-1] == {("x=1", "+pack.index=0"): (tmp_path, 0, ["a", "c"], ["config a", "config c"], ["a"]),
                        ("x=1", "+pack.index=1"): (tmp_path, 1, ["b"], ["config b"], ["b"])}
    launch._launch(Launcher(), [["x=1"], ["x=1", "hydra.job.num=1"]], [plan], True, [(plan, 0), (plan, 1)])
    assert seen[-1] == {} and job.PLANNED == {}


def test_a_sweep_counts_the_failed_runs_of_its_own_grid(tmp_path, monkeypatch):
    """The failed runs a sweep reports (exit 1) are its grid's, from the tables its report reads:
    a run that failed in an earlier sweep into the folder, outside this grid, is not counted."""
    from typer.testing import CliRunner

    from symrun import cli as cli_mod
    from symrun.training import engine

    monkeypatch.chdir(tmp_path)
    grid = ["model=hadamard", "train.steps=2", "train.log_every=2", "data.n=20"]
    real = engine.train_pack
    monkeypatch.setattr(engine, "train_pack", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("simulated")))
    failed = CliRunner().invoke(cli_mod.app, ["sweep", "--outputs", "out", *grid, "seed=0,1"])
    assert failed.exit_code == 1 and "2 of 2 runs failed" in failed.output
    (d,) = [p.parent for p in (tmp_path / "out").glob("*/*/sweep.json")]
    monkeypatch.setattr(engine, "train_pack", real)
    other = CliRunner().invoke(cli_mod.app, ["sweep", "--outputs", "out", *grid, "seed=2", f"hydra.sweep.dir={d}"])
    assert other.exit_code == 0, other.output
    again = CliRunner().invoke(cli_mod.app, ["sweep", "--outputs", "out", *grid, "seed=1,2", f"hydra.sweep.dir={d}"])
    assert again.exit_code == 0, again.output          # seed=1 trained again, now without the patch
    monkeypatch.setattr(engine, "train_pack", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("simulated")))
    third = CliRunner().invoke(cli_mod.app, ["sweep", "--outputs", "out", *grid, "seed=0,2,3", f"hydra.sweep.dir={d}"])
    assert third.exit_code == 1 and "2 of 3 runs failed" in third.output   # seed=0 again and seed=3; seed=2 finished


def test_a_plans_run_ids_are_those_of_run_id_and_every_combination_is_validated(tmp_path):
    """Planning names a shape's runs from its first run's settings plus each run's own per-run
    values (results.RunIds), and validates each combination of per-run values but the seed once.
    Values equal to their defaults (seed 0, weight decay 0, lr_min 0.0) leave the id's settings,
    as in run_id: weight decay 0 and -0.0 name one run, and so do lr_min 0.0 and 0."""
    from symrun import config

    args = ["model=hadamard,mlp", "train.steps=2", "seed=0,1,2", "optim.weight_decay=0,-0.0,0.01",
            "optim.lr=0.1,1", "optim.lr_min=0.0,0", "noise.label_std=0,0.1"]
    plan = sweep.plan(args, tmp_path)
    assert len(plan.configs) == 2 * 3 * 2 * 2 * 1 * 2
    assert list(plan.configs) == [results.run_id(c) for c in plan.configs.values()]
    # a config with its own values of the per-run keys is named as in full, not from the shape
    first = next(iter(plan.configs.values()))
    ids = results.RunIds(first, ["seed", "optim.weight_decay", "optim.lr", "optim.lr_min", "noise.label_std"])
    assert all(ids(c) == rid for rid, c in plan.configs.items() if c.model.name == first.model.name)
    with pytest.raises(config.ConfigError, match="optim.weight_decay must be >= 0, got -0.5"):
        sweep.plan(["model=hadamard", "seed=0,1,2", "optim.weight_decay=0.1,-0.5"], tmp_path)


def test_a_sweep_takes_its_mode_from_the_flag_without_a_composition_for_it(tmp_path, monkeypatch):
    """Hydra composes the whole config once only to read hydra.mode; a sweep runs with
    --multirun, so it skips that (hydra_app._mode_from_the_flag) and still runs as a multirun,
    even where the command line sets hydra.mode=RUN. Hydra's own is back afterwards."""
    from hydra._internal.hydra import Hydra
    from typer.testing import CliRunner

    from symrun import cli as cli_mod

    asked = []
    monkeypatch.setattr(Hydra, "get_mode", lambda self, config_name, overrides: asked.append(overrides))
    own = Hydra.get_mode
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli_mod.app, ["sweep", "--outputs", str(tmp_path / "out"), "hydra.mode=RUN",
                                              "train.steps=2", "train.log_every=2", "seed=0,1"])
    assert result.exit_code == 0, result.output
    assert asked == [] and Hydra.get_mode is own
    (d,) = [p.parent for p in (tmp_path / "out").glob("*/*/sweep.json")]
    runs = tables.collect(d)[0]
    assert list(runs["status"]) == ["finished", "finished"]
