"""Report: figure layout by the grid's shape, and a summary that agrees with the runs table."""

import matplotlib.image as mpimg
import pytest

from symrun import report, results, sweep


def _sweep(tmp_path, *args):
    plan = sweep.plan(["train.steps=20", "train.log_every=10", *args], tmp_path)
    path = sweep.write_plan(plan)
    for i in range(len(plan.packs)):
        sweep.run_pack(path, i)
    return plan.sweep_dir


@pytest.mark.parametrize("grid, expected", [
    (["optim.weight_decay=0,0.1,1.0", "seed=0,1"], "phase_sparsity_vs_optim.weight_decay.png"),
    (["optim.weight_decay=0,0.1,1.0", "noise.label_std=0,1"], "phase_sparsity_vs_optim.weight_decay_by_noise.label_std.png"),
    (["optim.weight_decay=0,0.1,1.0,2.0,3.0,4.0", "noise.label_std=0,0.1,0.2,0.3,0.4"],
     "heatmap_sparsity_optim.weight_decay_vs_noise.label_std.png"),
])
def test_figure_layout_follows_the_grid(tmp_path, grid, expected):
    d = _sweep(tmp_path, *grid)
    rep = report.build(d)
    names = {p.name for p in rep.figures}
    assert expected in names
    image = mpimg.imread(d / expected)
    assert image.shape[0] > 300 and image.shape[1] > 500 and image.std() > 0.01   # a drawn figure, not blank


def test_summary_pools_seeds_per_grid_point(tmp_path):
    d = _sweep(tmp_path, "optim.weight_decay=0,0.5", "seed=0,1,2")
    rep = report.build(d)
    runs = results.read_csv(d / "runs.csv")
    expected = runs.groupby("optim.weight_decay")["sparsity"].agg(["mean", "std"])
    got = rep.summary.set_index("optim.weight_decay")
    assert list(got["runs"]) == [3, 3]
    assert got["sparsity mean"].to_dict() == pytest.approx(expected["mean"].to_dict())
    assert got["sparsity std"].to_dict() == pytest.approx(expected["std"].fillna(0).to_dict(), abs=1e-12)
    assert "seed" not in got.columns and "rank mean" not in got.columns


def test_runs_differing_outside_the_swept_keys_are_not_pooled(tmp_path):
    d = _sweep(tmp_path, "optim.weight_decay=0,0.5")
    plan = sweep.plan(["optim.weight_decay=0,0.5", "train.steps=40", "train.log_every=10"], tmp_path, sweep_dir=d)
    path = sweep.write_plan(plan)
    sweep.run_pack(path, 0)
    rep = report.build(d)
    assert len(rep.summary) == 4 and set(rep.summary["runs"]) == {1}
    assert {"optim.weight_decay", "train.steps"} <= set(rep.summary.columns)
