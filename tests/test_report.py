"""Report: figure layout by the grid's shape, and a summary that agrees with the runs table."""

import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import matplotlib.image as mpimg
import numpy as np
import pytest

from symrun.analysis import agreement, report
from symrun.sweeping import job, results, sweep


def _sweep(tmp_path, *args):
    plan = sweep.plan(["train.steps=20", "train.log_every=10", *args], tmp_path)
    sweep.write_plan(plan)
    job.run_plan(plan)
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
    # A resume refuses such a mix (records.check_consistent); a folder put together by hand from
    # two sweeps' run folders still must not pool runs of different settings.
    d = _sweep(tmp_path, "optim.weight_decay=0,0.5")
    other = sweep.plan(["optim.weight_decay=0,0.5", "train.steps=40", "train.log_every=10"], tmp_path / "other")
    sweep.write_plan(other)
    job.run_plan(other)
    for run in (other.sweep_dir / "runs").iterdir():
        shutil.copytree(run, d / "runs" / run.name)
    rep = report.build(d)
    assert len(rep.summary) == 4 and set(rep.summary["runs"]) == {1}
    assert {"optim.weight_decay", "train.steps"} <= set(rep.summary.columns)


def test_theory_agreement_counts_grid_points_on_the_closed_form(tmp_path):
    # λ away from every coefficient's threshold; 2000 steps at lr 0.3 converge there (docs/theory.md §5.1)
    grid = ["optim.weight_decay=0.05,0.3,2.0", "optim.lr=0.3"]
    converged = _sweep(tmp_path / "a", *grid, "train.steps=2000", "train.log_every=2000")
    report.build(converged)
    assert report.theory_agreement(converged) == [
        "sparsity: 3 of 3 weight decays on the lasso solution (|mean − theory| ≤ 0.025)"]
    barely = _sweep(tmp_path / "b", *grid, "train.steps=2", "train.log_every=2")
    report.build(barely)
    (line,) = report.theory_agreement(barely)
    assert line.startswith("sparsity: 0 of 3")          # two steps from a random init: nothing is zero yet


def _regression_file(path, seed):
    rng = np.random.default_rng(seed)
    x, beta = rng.normal(size=(100, 20)), np.r_[np.ones(4), np.zeros(16)]
    np.savez(path, x=x, y=x @ beta + 0.1 * rng.normal(size=100))
    return path


def test_a_closed_form_reads_only_the_data_file_the_runs_recorded(tmp_path, monkeypatch):
    """A received folder's config.yaml can name any file on this machine; the report reads it for
    a closed form only when its SHA-256 is the one the runs recorded when they trained."""
    mine = _regression_file(tmp_path / "mine.npz", 0)
    grid = ["data=file", f"data.path={mine}", "data.batch_size=null", "optim.weight_decay=0.05,0.3", "optim.lr=0.3"]
    d = _sweep(tmp_path / "own", *grid)
    report.build(d)
    runs = results.read_csv(d / "runs.csv")
    assert set(runs["data_sha256"]) == {hashlib.sha256(mine.read_bytes()).hexdigest()}
    (line,) = report.theory_agreement(d)
    assert line.startswith("sparsity: ") and "on the lasso solution" in line

    loaded = []
    real_load = agreement.data_mod.load
    monkeypatch.setattr(agreement.data_mod, "load", lambda cfg: loaded.append(cfg.path) or real_load(cfg))

    def received(name, edit):
        copy = tmp_path / name
        shutil.copytree(d, copy)
        for run in (copy / "runs").iterdir():
            edit(run)
        monkeypatch.setattr(agreement, "_SETUPS", {})     # a new process, as `symrun report` is
        report.build(copy)
        return report.theory_agreement(copy)

    private = _regression_file(tmp_path / "private.npz", 1)
    def elsewhere(run):
        (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(mine), str(private)))
    assert received("elsewhere", elsewhere) == [
        f"no closed form drawn: data.path {private} is not the file these runs were trained on "
        "(missing, or its SHA-256 differs from the one their status.json records)"]
    assert str(private) not in loaded

    def unrecorded(run):
        status = json.loads((run / "status.json").read_text())
        del status["data_sha256"]
        (run / "status.json").write_text(json.dumps(status))
    (line,) = received("older", unrecorded)
    assert line.startswith(f"no closed form drawn: the runs recorded no digest of data.path {mine}")

    loaded.clear()
    _regression_file(mine, 2)                # the file the runs were trained on, changed since
    (line,) = received("changed", lambda run: None)
    assert line.startswith(f"no closed form drawn: data.path {mine} is not the file these runs were trained on")
    assert loaded == []


def test_classification_data_is_never_loaded_for_a_regression_closed_form(tmp_path, monkeypatch):
    d = _sweep(tmp_path, "model=mlp", "model.width=8", "data=digits", "optim.weight_decay=0,0.1", "metrics.critical_mirrors=0")
    report.build(d)
    runs = results.read_csv(d / "runs.csv")
    monkeypatch.setattr(agreement, "_SETUPS", {})

    def load(cfg):
        raise AssertionError(f"loaded {cfg.name} for a closed form")
    monkeypatch.setattr(agreement.data_mod, "load", load)
    assert agreement.theory_line(d, runs, agreement.WD, "sparsity") is None
    assert report.theory_agreement(d) == []


def test_gallery_section_holds_command_agreement_figure_and_table(tmp_path, monkeypatch):
    from symrun import gallery

    d = _sweep(tmp_path, "optim.weight_decay=0.05,0.3,2.0", "optim.lr=0.3", "train.steps=2000", "train.log_every=2000")
    monkeypatch.setattr(gallery, "description", lambda name: ["What it shows.", "How to scale it."])
    text = gallery.section("demo", d, 1.0, tmp_path / "docs")
    assert "symrun sweep train.steps=20 train.log_every=10 optim.weight_decay=0.05,0.3,2.0" in text  # sweep.json's
    assert "**What it shows.**" in text
    assert "3 of 3 weight decays on the lasso solution" in text
    assert "![phase_sparsity_vs_optim.weight_decay](results/demo/phase_sparsity_vs_optim.weight_decay.png)" in text
    assert (tmp_path / "docs/results/demo/phase_sparsity_vs_optim.weight_decay.png").stat().st_size > 10_000
    assert "| λ | runs | sparsity |" in text


def test_gallery_section_of_a_suite_has_one_subsection_per_member(tmp_path, monkeypatch):
    from symrun import gallery

    plans = sweep.plans(["experiment=symmetry_removal", "train.steps=20", "train.log_every=10", "seed=0",
                         "metrics.critical_mirrors=0"], tmp_path)[:2]
    for plan in plans:
        sweep.write_plan(plan)
        job.run_plan(plan)
    monkeypatch.setattr(gallery, "description", lambda name: ["What it shows."])
    text = gallery.section("suite", [p.sweep_dir for p in plans], 1.0, tmp_path / "docs")
    assert f"{sum(len(p.configs) for p in plans)} runs, " in text
    for member in ("rescaling_sparsity", "dead_neurons"):
        assert f"### symmetry_removal/{member}" in text
        link = f"results/suite/{member}/phase_sparsity_vs_optim.weight_decay_by_symmetry.remove.png"
        assert f"]({link})" in text and (tmp_path / "docs" / link).stat().st_size > 10_000
    assert text.index("### symmetry_removal/rescaling_sparsity") < text.index("### symmetry_removal/dead_neurons")
    assert text.count("Symmetry removal, the final value's range over the grid") == 2


def test_removal_contrast_says_what_the_offsets_changed(tmp_path):
    # above the lasso's λ_max (docs/theory.md §5.1) the plain Hadamard model is all zeros; with offsets nothing is
    d = _sweep(tmp_path, "optim.weight_decay=0.3,2.0", "symmetry.remove=false,true", "optim.lr=0.3",
               "train.steps=2000", "train.log_every=2000")
    report.build(d)
    (line,) = report.removal_contrast(d)
    low, high = line.split(": ")[1].split(" without")[0].split("–")
    assert 0 < float(low) < 1 and float(high) == 1
    assert line.endswith("0–0 with (2 values of optim.weight_decay)")
    plain = _sweep(tmp_path / "plain", "optim.weight_decay=0.3,2.0")
    report.build(plain)
    assert report.removal_contrast(plain) == []             # no removal axis: nothing to contrast


def test_settings_are_labelled_as_written():
    from symrun.analysis import notation

    assert notation.value(float("nan")) == "null" and notation.value(None) == "null"
    assert notation.value(4.0) == "4" and notation.value(0.5) == "0.5" and notation.value(False) == "no"
    assert notation.setting("noise.label_std", 0.0) == "σ = 0" and notation.setting("optim.weight_decay", 1e-3) == "λ = 0.001"
    assert notation.setting("symmetry.remove", "True") == "offsets: yes"
    assert notation.setting("data.batch_size", None) == "B = full batch" and notation.plural(1, "seed") == "1 seed"
    assert notation.axis("optim.lr") == "learning rate η" and notation.axis("model.width") == "model.width"


def test_a_null_setting_is_its_own_series(tmp_path):
    d = _sweep(tmp_path, "optim.weight_decay=0,0.5", "data.batch_size=50,null")
    rep = report.build(d)
    assert list(rep.summary["runs"]) == [1, 1, 1, 1]           # full batch (null) is not dropped
    assert rep.summary["data.batch_size"].isna().sum() == 2


def test_measured_critical_weight_decay_is_drawn_from_the_largest_weight_decay(tmp_path):
    """The dotted λ_c line: median over seeds of critical_wd_max of the metric's kind, at the
    grid's largest λ. On the Hadamard model fully sparse there, it is the lasso's λ_max."""
    from symrun import data
    from symrun.analysis import theory
    from symrun.config import TeacherDataConfig

    d = _sweep(tmp_path, "optim.weight_decay=0.01,3.0", "seed=0,1", "train.steps=2000", "optim.lr=0.3",
               "metrics.critical_mirrors=20")
    figures = report.build(d).figures
    runs = results.read_csv(d / "runs.csv")
    x, label = agreement.critical_line(runs, "optim.weight_decay", "sparsity")
    ds = data.load(TeacherDataConfig())
    assert x == pytest.approx(theory.lasso_threshold(ds.x, ds.y), rel=1e-5)
    assert "rescaling" in label and "λ = 3" in label
    assert agreement.critical_line(runs, "optim.weight_decay", "rank") is None     # no rotation mirrors here
    assert agreement.critical_line(runs, "seed", "sparsity") is None
    assert any(p.name == "phase_sparsity_vs_optim.weight_decay.png" for p in figures)


def test_figures_drawn_over_forked_processes_are_the_ones_drawn_in_one(tmp_path, monkeypatch):
    """report.draw_all shares figures out over forked processes (where it can): the same paths,
    in the same order, byte for byte; an error in a child is raised in the parent."""
    if not sys.platform.startswith("linux"):
        pytest.skip("figures are drawn over forked processes on Linux only")
    d = _sweep(tmp_path, "optim.weight_decay=0,0.1,1.0", "seed=0,1", "train.log_every=5")
    monkeypatch.setattr(report, "DRAW_PROCESSES", 1)
    alone = report.build(d)
    assert len(alone.figures) >= 4
    drawn = {p: p.read_bytes() for p in alone.figures}
    for p in alone.figures:
        p.unlink()
    monkeypatch.setattr(report, "DRAW_PROCESSES", 3)
    forked = report.build(d)
    assert forked.figures == alone.figures
    assert all(p.read_bytes() == drawn[p] for p in forked.figures)

    def no_semaphores(*args, **kwargs):           # a container without /dev/shm: drawn here instead
        raise OSError(38, "Function not implemented")

    with monkeypatch.context() as m:
        m.setattr(report, "ProcessPoolExecutor", no_semaphores)
        for p in alone.figures:
            p.unlink()
        here = report.build(d)
    assert here.figures == alone.figures and all(p.read_bytes() == drawn[p] for p in here.figures)

    def broken(*args, **kwargs):
        raise RuntimeError("a figure that cannot be drawn")

    drawing = report.figures.phase_diagram
    monkeypatch.setattr(report.figures, "phase_diagram", broken)
    with pytest.raises(RuntimeError, match="cannot be drawn"):
        report.build(d)

    here = os.getpid()

    def dies(*args, **kwargs):                    # a child that dies (as on a segfault), not here
        return drawing(*args, **kwargs) if os.getpid() == here else os._exit(3)

    monkeypatch.setattr(report.figures, "phase_diagram", dies)
    with pytest.raises(BrokenProcessPool):
        report.build(d)


def test_a_forked_process_lays_out_text_with_fonts_of_its_own():
    """FreeType fonts cannot be shared across a fork: the figures' shared mathtext parser, whose
    cached layouts hold the parent's fonts, is replaced in a forked child (two children drawing
    with the parent's fonts at once failed with FT_Load_Glyph … invalid outline)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("figures are drawn over forked processes on Linux only")
    from symrun.analysis import figures

    fig = figures.canvas((3, 2))
    fig.gca().set_xscale("log")
    fig.gca().set_xlim(1e-3, 1)
    fig.canvas.draw()                                             # lays out $10^{-3}$ … here
    parser = figures.Canvas._mathtext
    parser.parent_of_the_test = True
    try:
        with ProcessPoolExecutor(2, mp_context=report.multiprocessing.get_context("fork")) as pool:
            children = list(pool.map(_inherited_parser_after_drawing, range(2)))
        assert children == [False, False]
        assert figures.Canvas._mathtext is parser                   # this process keeps its own
    finally:
        del parser.parent_of_the_test


def _inherited_parser_after_drawing(_: int) -> bool:
    from symrun.analysis import figures

    fig = figures.canvas((3, 2))
    fig.gca().set_xscale("log")
    fig.gca().set_xlim(1e-3, 1)
    fig.canvas.draw()
    return getattr(figures.Canvas._mathtext, "parent_of_the_test", False)


def test_runs_own_figures_are_looked_for_where_a_model_saves_their_arrays(tmp_path):
    """A run's own figure is drawn from the array it saved; runs of models that save none
    (ModelSpec.run_figures) are not looked in. An array put in a hadamard run's folder is
    drawn only when the runs' models are not known (a damaged config) or one saves arrays."""
    d = _sweep(tmp_path, "seed=0,1")
    rid = results.run_ids(d)[0]
    np.save(d / "runs" / rid / "penultimate_correlation.npy", np.eye(3))
    png = d / "runs" / rid / "penultimate_correlation.png"
    assert report.run_figures(d, {"hadamard"}) == [] and not png.exists()
    assert report.build(d).figures and not png.exists()
    assert report.run_figures(d, {"hadamard", None}) == [png] and png.exists()
    png.unlink()
    assert report.run_figures(d, {"hadamard", "resnet18"}) == [png] == report.run_figures(d)
