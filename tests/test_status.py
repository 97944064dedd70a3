"""`symrun status` and `symrun collect` on a sweep left in every state a cluster can leave it in."""

import pandas as pd
import pytest

from symrun.training import engine
from symrun.sweeping import job, results, sweep, tables

GRID = ["model=hadamard,factorization,mlp,ensemble", "optim.lr=0.05,1e4", "train.steps=20",
        "train.log_every=5"]


@pytest.fixture
def partly_done(tmp_path, monkeypatch):
    """hadamard: one run finished, one diverged; factorization: its pack failed; mlp: interrupted
    while running (no sweep holds the folder any more); ensemble: never started."""
    real = engine.train_pack

    def train(cfgs, **kw):
        name = cfgs[0].model.name
        if name == "factorization":
            raise RuntimeError("CUDA out of memory (simulated)\nsecond line of the message")
        if name == "mlp":
            raise KeyboardInterrupt   # not an Exception: the job dies, its runs stay `running`
        return real(cfgs, **kw)

    monkeypatch.setattr(engine, "train_pack", train)
    plan = sweep.plan(GRID, tmp_path / "outputs")
    sweep.write_plan(plan)
    for i, pack in enumerate(plan.packs):
        configs = [plan.configs[rid] for rid in pack]
        if configs[0].model.name == "ensemble":
            continue
        if configs[0].model.name == "mlp":
            with pytest.raises(KeyboardInterrupt):
                job.run_pack(plan.sweep_dir, i, configs)
        else:
            job.run_pack(plan.sweep_dir, i, configs)
    monkeypatch.setattr(engine, "train_pack", real)
    return plan.sweep_dir


def test_status_counts_each_state_and_gives_the_reasons(cli, tmp_path, partly_done):
    for where in (partly_done, tmp_path / "outputs"):      # a sweep, or a folder of sweeps
        out = cli("status", str(where)).stdout
        assert str(partly_done) in out
        assert "8 runs: 1 finished, 0 running, 2 interrupted, 2 failed, 1 diverged, 2 pending, 0 damaged" in out
        assert "2 RuntimeError: CUDA out of memory (simulated) second line of the message  [factorization-" in out
        assert "1 diverged: " in out
        assert "hydra.sweep.dir" in out
    st = tables.sweep_status(partly_done)
    assert st.counts == {"finished": 1, "running": 0, "interrupted": 2, "failed": 2, "diverged": 1, "pending": 2,
                         "damaged": 0}
    with results.sweep_lock(partly_done):         # as while its sweep still trains them
        assert tables.sweep_status(partly_done).counts["running"] == 2


def test_collect_rebuilds_the_tables_and_a_rerun_finishes_the_sweep(cli, tmp_path, partly_done):
    assert not (partly_done / "runs.csv").exists()
    out = cli("collect", str(tmp_path / "outputs")).stdout
    assert "1 finished" in out and "2 failed" in out
    runs = results.read_csv(partly_done / "runs.csv")
    assert sorted(runs["status"]) == ["diverged", "failed", "failed", "finished", "interrupted", "interrupted"]
    res = results.read_csv(partly_done / "results.csv")
    assert set(res["run_id"]) == set(runs[runs["status"].isin(["finished", "diverged"])]["run_id"])
    fresh, _ = tables.collect(partly_done)
    pd.testing.assert_frame_equal(runs, results.read_csv(partly_done / "runs.csv"))
    assert len(fresh) == len(runs)

    cli("sweep", *GRID, f"hydra.sweep.dir={partly_done}")
    out = cli("status", str(partly_done)).stdout
    assert "8 runs: 4 finished, 0 running, 0 interrupted, 0 failed, 4 diverged, 0 pending, 0 damaged" in out, out
    assert "hydra.sweep.dir" not in out


def test_status_and_collect_refuse_a_folder_without_sweeps(cli, tmp_path):
    for cmd in ("status", "collect"):
        proc = cli(cmd, str(tmp_path), check=False)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: no sweep folders")
