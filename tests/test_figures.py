"""Figures for a paper: legend entries, categorical axes, ✗ for diverged runs, the not-converged
mark from its criterion, learning curves from results.csv, formats, and report.md."""

import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from symrun.analysis import curves, document, figures, report
from symrun.sweeping import job, results, sweep


def _sweep(tmp_path, *args):
    plan = sweep.plan(["train.steps=20", "train.log_every=10", *args], tmp_path)
    sweep.write_plan(plan)
    job.run_plan(plan)
    return plan.sweep_dir


@pytest.fixture
def drawn(monkeypatch):
    """The figures a report draws, kept open by name (figures.save is replaced by a recorder)."""
    kept = {}

    def save(fig, stem, sweep_dir, formats):
        kept[stem.name] = fig
        return [stem.with_name(stem.name + ".png")]

    monkeypatch.setattr(figures, "save", save)
    monkeypatch.setattr(report, "DRAW_PROCESSES", 1)      # drawn here, where the recorder can see them
    yield kept
    plt.close("all")


def _legend(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_one_legend_entry_per_theory_and_critical_line(tmp_path, drawn):
    # Two label noises on the same data: one lasso line, and at λ = 3 (all zero for both, §5.1)
    # the same measured λ_c, so one entry each, not one per series.
    d = _sweep(tmp_path, "optim.weight_decay=0.01,3.0", "noise.label_std=0,1", "optim.lr=0.3", "train.steps=600",
               "train.log_every=100")
    report.build(d)
    entries = _legend(drawn["phase_sparsity_vs_optim.weight_decay_by_noise.label_std"])
    assert entries.count("lasso solution (closed form)") == 1
    assert sum("lambda_c" in e for e in entries) == 1
    assert {"σ = 0", "σ = 1"} <= set(entries)
    ax = drawn["phase_sparsity_vs_optim.weight_decay_by_noise.label_std"].axes[0]
    legend_box = ax.get_legend().get_window_extent()
    assert legend_box.y1 <= ax.get_window_extent().y0          # below the data, not on it


def test_coinciding_series_stay_visible(tmp_path, drawn):
    # the probe set plays no part in the Hadamard model's metrics: both series are the same numbers
    d = _sweep(tmp_path, "optim.weight_decay=0.01,0.1", "metrics.probe_size=100,200")
    report.build(d)
    ax = drawn["phase_sparsity_vs_optim.weight_decay_by_metrics.probe_size"].axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_marker() in figures.MARKERS and len(ln.get_xdata()) == 2
             and ln.get_markerfacecolor() != "white"]
    xs = [tuple(ln.get_xdata()) for ln in lines[:2]]
    assert xs[0] != xs[1] and np.allclose(xs[0], xs[1], rtol=0.2)            # offset, slightly
    assert lines[0].get_marker() != lines[1].get_marker()


def test_boolean_axis_is_categorical_and_labelled(tmp_path, drawn):
    d = _sweep(tmp_path, "symmetry.remove=false,true")
    report.build(d)
    ax = drawn["phase_sparsity_vs_symmetry.remove"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["no", "yes"]
    assert list(ax.get_xticks()) == [0, 1]
    assert ax.get_xlabel() == "symmetry removal"


def test_diverged_runs_are_drawn_as_crosses(tmp_path, drawn):
    d = _sweep(tmp_path, "optim.lr=0.1,1000")
    rep = report.build(d)
    assert rep.status_counts == {"finished": 1, "diverged": 1}
    fig = drawn["phase_train_loss_vs_optim.lr"]
    assert "diverged (1 run)" in _legend(fig)
    crosses = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "x"]
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [1000.0]
    assert "diverged at step" in (d / "report.md").read_text()


def test_convergence_criterion_on_rows():
    rows = pd.DataFrame({"step": [0, 100, 200, 300, 400], "train_loss": [1.0, 0.5, 0.2, 0.1, 0.1],
                         "sparsity": [0.0, 0.2, 0.5, 0.7, 0.75]})
    # the last tenth, from the row before it (300 → 400): loss moved 0, sparsity 0.05 of min(0.75, 0.75)
    assert curves.still_moving(rows, ["train_loss", "sparsity"]) == ["sparsity"]
    rows.loc[4, "sparsity"] = 0.7 + 0.02       # 0.02 / 0.72 < 5 %
    assert curves.still_moving(rows, ["train_loss", "sparsity"]) == []
    rows.loc[4, "train_loss"] = 0.09           # 0.01 of its range 0.91 but 11 % of where it ends
    assert curves.still_moving(rows, ["train_loss", "sparsity"]) == ["train_loss"]
    assert curves.still_moving(rows.iloc[[0, 4]], ["train_loss"]) is None   # only the start and the end: not judged


def test_a_short_run_is_marked_not_converged_and_a_long_one_is_not(tmp_path, drawn):
    grid = ["optim.weight_decay=0.05,2.0", "optim.lr=0.3"]
    # 20 steps: at λ = 0.05 the loss still falls (0.058 → 0.033 over the last 5 steps); at λ = 2
    # every coefficient is already zero, a fixed point, so that run has converged
    short = _sweep(tmp_path / "short", *grid, "train.steps=20", "train.log_every=5")
    rep = report.build(short)
    assert len(rep.unconverged) == 1 and list(rep.unconverged.values()) == [["train_loss"]]
    ax = drawn["phase_sparsity_vs_optim.weight_decay"].axes[0]
    hollow = [ln for ln in ax.get_lines() if ln.get_markerfacecolor() == "white"]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [0.05]
    assert "not converged (a run)" in _legend(drawn["phase_sparsity_vs_optim.weight_decay"])
    assert list(rep.summary["not converged"]) == [1, 0]
    assert "had not converged" in (short / "report.md").read_text()
    drawn.clear()
    long = _sweep(tmp_path / "long", *grid, "train.steps=3000", "train.log_every=100")
    rep = report.build(long)
    assert rep.unconverged == {} and "not converged" not in rep.summary
    assert "not converged (a run)" not in _legend(drawn["phase_sparsity_vs_optim.weight_decay"])


def test_learning_curves_are_the_seed_means_of_results_csv(tmp_path, drawn):
    d = _sweep(tmp_path, "optim.weight_decay=0,0.5", "seed=0,1")
    report.build(d)
    table, runs = results.read_csv(d / "results.csv"), results.read_csv(d / "runs.csv")
    ax = drawn["curves_train_loss"].axes[0]
    assert ax.get_xlabel() == "step t"
    expected = table[["run_id", "step", "train_loss"]].merge(runs[["run_id", "optim.weight_decay"]], on="run_id")
    for line, lam in zip(ax.get_lines(), [0.0, 0.5]):
        mean = expected[expected["optim.weight_decay"] == lam].groupby("step")["train_loss"].mean()
        assert list(line.get_xdata()) == list(mean.index)
        assert np.allclose(line.get_ydata(), mean.to_numpy())
    assert {"λ = 0", "λ = 0.5"} <= set(_legend(drawn["curves_train_loss"]))
    assert "curves_sparsity" in drawn


def test_no_learning_curve_from_only_the_first_and_last_step(tmp_path, drawn):
    d = _sweep(tmp_path, "optim.weight_decay=0,0.5", "train.log_every=20")    # logged at steps 0 and 20 only
    report.build(d)
    assert "phase_sparsity_vs_optim.weight_decay" in drawn
    assert not [name for name in drawn if name.startswith("curves_")]


def test_names_on_the_x_axis_with_several_series(tmp_path, drawn):
    """A swept word with more values than the numeric axis becomes the x axis (schedules here):
    its series are dodged by positions, not by arithmetic on the names."""
    d = _sweep(tmp_path, "optim.schedule=constant,cosine,step", "optim.weight_decay=0,0.5", "optim.lr_min=0.01")
    report.build(d)
    ax = drawn["phase_train_loss_vs_optim.schedule_by_optim.weight_decay"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["constant", "cosine", "step"]
    xs = {round(float(x), 9) for line in ax.get_lines() for x in line.get_xdata()}
    assert len(xs) == 6 and all(-0.5 < x < 2.5 for x in xs)     # 3 names × 2 series, side by side


def test_heatmap_draws_the_closed_form_boundary(tmp_path, drawn):
    d = _sweep(tmp_path, "optim.weight_decay=0.01,0.1,1.0,2.0,3.0", "noise.label_std=0,0.1,0.2,0.3,0.4")
    report.build(d)
    fig = drawn["heatmap_sparsity_optim.weight_decay_vs_noise.label_std"]
    assert any("lasso" in t and "max" in t for t in _legend(fig))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "weight decay λ" and ax.get_ylabel() == "label noise σ"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.01", "0.1", "1", "2", "3"]


def test_formats_and_column_width(tmp_path, cli):
    d = _sweep(tmp_path, "optim.weight_decay=0,0.5")
    proc = cli("report", str(d), "--formats", "png,pdf,svg")
    stem = d / "phase_sparsity_vs_optim.weight_decay"
    assert stem.with_name(stem.name + ".pdf").read_bytes().startswith(b"%PDF")
    assert b"<svg" in stem.with_name(stem.name + ".svg").read_bytes()[:400]
    width = plt.imread(stem.with_name(stem.name + ".png")).shape[1] / figures.DPI
    assert 3.0 < width < 3.6                                       # a journal column, legend included
    assert "report:" in proc.stdout
    cli("report", str(d))                                           # the runs' report.formats: png only
    assert not stem.with_name(stem.name + ".pdf").exists()          # the other formats are stale: removed
    bad = cli("report", str(d), "--formats", "png,jpeg", check=False)
    assert bad.returncode == 2 and bad.stderr.count("error:") == 1 and "jpeg" in bad.stderr
    cli("sweep", "optim.weight_decay=0,0.5", "train.steps=20", "train.log_every=10", "report.formats=[svg]",
        "hydra.sweep.dir=vector")
    assert (tmp_path / "vector/phase_sparsity_vs_optim.weight_decay.svg").is_file()
    assert not list((tmp_path / "vector").glob("*.png"))
    bad = cli("sweep", "report.formats=[gif]", "hydra.sweep.dir=gif", check=False)
    assert bad.returncode == 2 and "report.formats must list some of png, pdf, svg" in bad.stderr
    assert not (tmp_path / "gif").exists()


def test_report_md_has_its_sections_and_links_that_resolve(tmp_path):
    d = _sweep(tmp_path, "optim.weight_decay=0.05,0.3,2.0", "optim.lr=0.3", "train.steps=2000", "train.log_every=100")
    report.build(d, ("png", "pdf"))
    text = (d / "report.md").read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings == list(document.SECTIONS)
    assert "symrun sweep train.steps=20 train.log_every=10 optim.weight_decay=0.05,0.3,2.0 optim.lr=0.3 train.steps=2000" in text
    assert "- weight decay λ (`optim.weight_decay`): 0.05, 0.3, 2" in text
    targets = re.findall(r"\]\(([^)]+)\)", text)
    assert any(t.endswith(".pdf") for t in targets) and any(t.endswith(".png") for t in targets)
    assert all((d / t).is_file() for t in targets)
    assert "- sparsity: 3 of 3 weight decays on the lasso solution" in text
    assert "| λ | runs | sparsity | train_loss |" in text


def test_gallery_and_report_md_print_the_same_agreement(tmp_path, monkeypatch):
    from symrun import gallery
    from symrun.analysis import agreement

    d = _sweep(tmp_path, "optim.weight_decay=0.05,0.3,2.0", "optim.lr=0.3", "train.steps=2000", "train.log_every=1000")
    monkeypatch.setattr(agreement, "theory_agreement", lambda *a: ["sparsity: a line only agreement.py writes"])
    monkeypatch.setattr(gallery, "description", lambda name: ["What it shows."])
    text = gallery.section("demo", d, 1.0, tmp_path / "docs")
    assert "- sparsity: a line only agreement.py writes" in text
    assert "- sparsity: a line only agreement.py writes" in (d / "report.md").read_text()
    body = (d / "report.md").read_text().split("## Agreement with theory")[1].split("## Figures")[0]
    assert body.strip() in text
