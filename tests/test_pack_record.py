"""A started pack is one record (checkpoints/<hash>.json), not a `running` status.json per run:
its runs read as running until each has a status of its own, and the record goes with the pack."""

import json

import pytest

from symrun.training import engine
from symrun.sweeping import job, records, results, sweep, tables

GRID = ["model=hadamard", "seed=0,1,2", "train.steps=20", "train.log_every=10"]


@pytest.fixture
def killed(tmp_path, monkeypatch):
    """A planned sweep whose one pack was killed as it started training."""
    def train(cfgs, **kw):
        raise KeyboardInterrupt

    plan = sweep.plan(GRID, tmp_path / "outputs")
    sweep.write_plan(plan)
    (pack,) = plan.packs
    monkeypatch.setattr(engine, "train_pack", train)
    with pytest.raises(KeyboardInterrupt):
        job.run_pack(plan.sweep_dir, 0, [plan.configs[rid] for rid in pack])
    monkeypatch.undo()
    return plan


def _states(d):
    return {r.run_id: r.status for r in records.read_runs(d, results.run_ids(d))}


def test_a_started_pack_writes_one_record_and_its_runs_read_as_running(killed):
    d, (pack,) = killed.sweep_dir, killed.packs
    assert not any((d / "runs" / rid / "status.json").exists() for rid in pack)
    (record,) = (d / "checkpoints").iterdir()
    assert record == results.checkpoint_path(d, pack).with_suffix(".json")
    assert json.loads(record.read_text())["running"] == pack
    (run,) = records.read_runs(d, pack[:1])
    assert run.status == results.RUNNING and run.info["pack"] == 0 and run.info["run_id"] == pack[0]
    assert "started_at" in run.info and run.config["seed"] == 0
    assert records.read_run(d, pack[0]).status == results.PENDING      # one run's own files say nothing more
    assert tables.sweep_status(d).counts["interrupted"] == 3            # no sweep holds the folder
    with results.sweep_lock(d):
        assert tables.sweep_status(d).counts["running"] == 3


def test_a_runs_own_status_outranks_the_record_and_a_rerun_removes_it(killed):
    d, (pack,) = killed.sweep_dir, killed.packs
    results.write_status(d, pack[1], results.FAILED, error="RuntimeError: simulated")
    assert _states(d) == {pack[0]: "running", pack[1]: "failed", pack[2]: "running"}
    again = sweep.schedule(sweep.plan(GRID, d.parent, sweep_dir=d))
    sweep.write_plan(again)
    job.run_plan(again)
    assert set(_states(d).values()) == {"finished"}
    assert not (d / "checkpoints").exists(), "the record went when the pack wrote its runs"


@pytest.mark.parametrize("damage", ["not JSON", "a list", "no info", "a link"])
def test_a_record_that_cannot_be_read_leaves_its_runs_pending(killed, tmp_path, damage):
    d, (pack,) = killed.sweep_dir, killed.packs
    (record,) = (d / "checkpoints").iterdir()
    good = record.read_text()
    if damage == "a link":     # a received folder's record pointing elsewhere is not followed
        outside = tmp_path / "outside.json"
        outside.write_text(good)
        record.unlink()
        record.symlink_to(outside)
    else:
        record.write_text({"not JSON": "{", "a list": "[]", "no info": json.dumps({"running": pack})}[damage])
    assert set(_states(d).values()) == {"pending"}
    assert results.started_runs(d) == {}


def test_a_stale_record_is_pruned_once_every_run_it_lists_has_a_status(killed):
    d, (pack,) = killed.sweep_dir, killed.packs
    record = results.checkpoint_path(d, pack).with_suffix(".json")
    results.write_statuses(d, [(rid, results.FAILED, {}) for rid in pack[:2]])
    assert records.remove_stale_temps(d) == [] and record.exists(), "a run it lists is still unrecorded"
    results.write_status(d, pack[2], results.FAILED)
    assert records.remove_stale_temps(d) == [record] and not record.exists()
