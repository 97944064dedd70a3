"""Resume and extend a sweep: the tables an uninterrupted sweep gives, whatever happened in between."""

import json
import warnings

import pandas as pd
import pytest

from conftest import PROVENANCE
from symrun.sweeping import job, records, results, sweep, tables
from symrun.analysis import report
from symrun.config import ConfigError

BASE = ["optim.weight_decay=0.01,0.1", "train.steps=60", "train.log_every=20"]


def _sweep(args, sweep_dir=None, root=None):
    """Plan, lay out and train a sweep in-process as `symrun sweep` does; returns its folder."""
    plan = sweep.plan(args, root, sweep_dir=sweep_dir)
    sweep.write_plan(plan)
    job.run_plan(plan)
    report.build(plan.sweep_dir)
    return plan.sweep_dir


def _cells(path, drop=PROVENANCE):
    """A table as the exact text of its cells, provenance left out."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return frame.drop(columns=[c for c in drop if c in frame.columns])


def test_extending_a_sweep_gives_the_tables_and_figures_of_the_whole_grid_swept_at_once(tmp_path):
    extended = _sweep([*BASE, "seed=0,1"], tmp_path / "d", tmp_path)
    _sweep([*BASE, "seed=0,1,2"], extended, tmp_path)
    whole = _sweep([*BASE, "seed=0,1,2"], tmp_path / "u", tmp_path)
    runs = results.read_csv(extended / "runs.csv")
    assert list(runs["run_id"]) == list(results.read_csv(whole / "runs.csv")["run_id"]), "rows in grid order"
    # pack_size stays the requested setting (null: sized by memory), never the size a pack had.
    assert runs["pack_size"].isna().all() and sorted(runs["pack_runs"]) == [2, 2, 4, 4, 4, 4]
    figures = sorted(p.name for p in extended.glob("*.png"))
    assert figures == sorted(p.name for p in whole.glob("*.png"))
    assert "phase_sparsity_vs_optim.weight_decay.png" in figures and not any("pack" in f for f in figures)
    assert list(report.build(extended).summary.columns) == list(report.build(whole).summary.columns)
    # The two seed-2 runs trained in a pack of 2, not 6: equal up to the rounding of other GEMM
    # shapes (README: "Pack size"), while columns and the rows' order are the same.
    a, b = results.read_csv(extended / "results.csv"), results.read_csv(whole / "results.csv")
    assert list(a.columns) == list(b.columns) and list(a["run_id"]) == list(b["run_id"])
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-5, atol=1e-6)


def _interrupt_after_first_write(monkeypatch):
    """A kill while a pack writes its runs: the first run is recorded (its status.json, the
    completion marker, written last), then the process dies."""
    real, calls = results.write_statuses, []

    def write_statuses(sweep_dir, statuses):
        statuses = list(statuses)
        for i, (rid, state, _) in enumerate(statuses):
            if state != results.RUNNING:
                if calls:               # the statuses before this one are written, then the kill
                    real(sweep_dir, statuses[:i])
                    raise KeyboardInterrupt
                calls.append(rid)
        return real(sweep_dir, statuses)

    monkeypatch.setattr(results, "write_statuses", write_statuses)
    return calls


@pytest.mark.parametrize("checkpointed", [True, False])
def test_a_kill_while_a_pack_writes_its_runs_resumes_to_the_uninterrupted_numbers(tmp_path, monkeypatch, checkpointed):
    args = [*BASE, "seed=0,1", "data.batch_size=50", "noise.label_std=0.1"]
    args += ["train.checkpoint_every=25"] if checkpointed else []
    reference = _sweep(args, tmp_path / "reference", tmp_path)
    d = tmp_path / "killed"
    plan = sweep.plan(args, tmp_path, sweep_dir=d)
    sweep.write_plan(plan)
    written = _interrupt_after_first_write(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        job.run_plan(plan)
    monkeypatch.undo()
    (first,) = written
    kept = {p: p.read_bytes() for p in (d / "runs" / first).iterdir()}
    assert len(list((d / "checkpoints").glob("*.pt"))) == (1 if checkpointed else 0)
    if checkpointed:                            # and a kill during a checkpoint write, too
        (d / "checkpoints" / ".0123456789abcdef.pt.0badc0de.tmp").write_bytes(b"half a checkpoint")

    assert records.remove_stale_temps(d) == ([d / "checkpoints" / ".0123456789abcdef.pt.0badc0de.tmp"]
                                             if checkpointed else [])
    again = sweep.plan(args, tmp_path, sweep_dir=d)
    assert again.packs == plan.packs, "the pack is trained again whole, as it was"
    sweep.write_plan(again)
    job.run_plan(again)
    tables.write_tables(d)
    assert {p: p.read_bytes() for p in kept} == kept, "a finished run's files are never written again"
    assert not (d / "checkpoints").exists(), "the pack's record and checkpoint go when its runs are written"
    runs = results.read_csv(d / "runs.csv").set_index("run_id")
    resumed = runs.drop(index=first)["resumed_from"]
    assert (resumed == 50).all() if checkpointed else resumed.isna().all()   # the last checkpoint of 60 steps
    for table in ("runs.csv", "results.csv"):
        pd.testing.assert_frame_equal(_cells(d / table), _cells(reference / table))   # bit for bit


def test_a_setting_that_differs_from_the_folders_runs_is_refused_unless_it_is_an_axis(tmp_path):
    d = _sweep(BASE, tmp_path / "d", tmp_path)
    with pytest.raises(ConfigError) as refused:
        sweep.plan([*BASE[:1], "train.steps=100", "train.log_every=20"], tmp_path, sweep_dir=d)
    message = str(refused.value)
    assert message.startswith("train.steps=100 differs from train.steps=60 of the runs already in")
    assert "train.steps=60,100" in message and "hydra.sweep.dir" in message
    with pytest.raises(ConfigError, match="model.name=factorization differs from model.name=hadamard"):
        sweep.plan([*BASE, "model=factorization"], tmp_path, sweep_dir=d)
    # as a grid axis it is a new grid point; execution keys and seeds are free to change
    plan = sweep.plan([*BASE[:1], "train.steps=60,100", "train.log_every=20"], tmp_path, sweep_dir=d)
    assert len(plan.finished) == 2 and len(plan.configs) == 4
    sweep.plan([*BASE, "seed=1", "pack_size=1", "device=cpu", "train.checkpoint_every=10"], tmp_path, sweep_dir=d)


def test_figures_an_earlier_report_drew_are_removed_when_no_longer_drawn(tmp_path):
    d = _sweep(BASE, tmp_path / "d", tmp_path)
    drawn = sorted(p.name for p in d.glob("*.png"))
    assert "phase_sparsity_vs_optim.weight_decay.png" in drawn
    assert json.loads((d / report.MANIFEST).read_text()) == {"figures": drawn}
    (d / "phase_my_own.png").write_bytes(b"the user's figure")             # not drawn by a report
    # two more axes make three: a summary table, no figure
    _sweep(["optim.weight_decay=0.01,0.1", "noise.label_std=0,0.5", "train.steps=60,80", "train.log_every=20"], d, tmp_path)
    assert sorted(p.name for p in d.glob("*.png")) == ["phase_my_own.png"]
    assert json.loads((d / report.MANIFEST).read_text()) == {"figures": []}
    # a manifest cannot make a report remove anything outside the folder, or a file it does not name
    outside = tmp_path / "phase_outside.png"
    outside.write_bytes(b"x")
    (d / report.MANIFEST).write_text(json.dumps({"figures": ["../phase_outside.png", "runs.csv", "phase_my_own.png"]}))
    report.build(d)
    assert outside.exists() and (d / "runs.csv").exists()


def test_a_sweep_without_finished_runs_writes_the_tables_headers(tmp_path):
    plan = sweep.plan(BASE, tmp_path)
    sweep.write_plan(plan)                          # planned, never trained
    tables.write_tables(plan.sweep_dir)
    assert (plan.sweep_dir / "runs.csv").read_text() == "run_id,status,optim.weight_decay\n"
    assert (plan.sweep_dir / "results.csv").read_text() == "run_id,optim.weight_decay,step\n"
    assert report.build(plan.sweep_dir).figures == []


def test_tables_hold_the_shortest_exact_text_of_each_float_and_read_back_without_warnings(tmp_path):
    d = _sweep(["optim.weight_decay=0.1,0.30000000000000004", "train.steps=2", "train.log_every=1"], tmp_path / "d", tmp_path)
    text = (d / "runs.csv").read_text()
    assert ",0.1," in text and "0.30000000000000004" in text and "0.10000000000000001" not in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runs = results.read_csv(d / "runs.csv")
    assert sorted(runs["optim.weight_decay"]) == [0.1, 0.30000000000000004]
    finals = {r: json.loads((d / "runs" / r / "status.json").read_text())["final"] for r in runs["run_id"]}
    for _, row in runs.iterrows():
        assert all(row[k] == v for k, v in finals[row["run_id"]].items() if v == v), "every float read back exactly"


def test_a_csv_data_file_trains_without_warnings(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,t\n" + "".join(f"{i},{i % 3},{0.1 * i}\n" for i in range(20)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = sweep.plan(["data=file", f"data.path={tmp_path / 'd.csv'}", "data.target=t", "train.steps=2"], tmp_path)
        sweep.write_plan(plan)
        job.run_plan(plan)
    assert plan.configs[next(iter(plan.configs))].data.target == ["t"], "a single column name is a list of one"
    assert records.read_run(plan.sweep_dir, next(iter(plan.configs))).status == "finished"
