"""Suites (experiment=symmetry_removal): one `symrun sweep` runs several presets, each its own sweep
in <folder>/<preset>/, with the suite's overrides and then the command line's."""

from __future__ import annotations

import pytest

from symrun.sweeping import records, results, sweep
from symrun.config import ConfigError

MEMBERS = ["rescaling_sparsity", "dead_neurons", "rotation_low_rank", "permutation_homogeneity", "attention_rank"]
SMALL = ["train.steps=4", "train.log_every=2", "metrics.critical_mirrors=0"]


def test_symmetry_removal_is_every_phenomenon_with_and_without_offsets(tmp_path):
    plans = sweep.plans(["experiment=symmetry_removal", *SMALL], tmp_path)
    parent = plans[0].sweep_dir.parent
    assert [p.sweep_dir for p in plans] == [parent / m for m in MEMBERS]
    for p in plans:
        assert "symmetry.remove" in p.swept and "optim.weight_decay" in p.swept
        assert {c.symmetry.remove for c in p.configs.values()} == {False, True}
        assert {c.name for c in p.configs.values()} == {f"symmetry_removal/{p.sweep_dir.name}"}
        assert {c.train.steps for c in p.configs.values()} == {4}          # the command line wins over the suite
    dead = next(p for p in plans if p.sweep_dir.name == "dead_neurons")
    assert {c.noise.label_std for c in dead.configs.values()} == {0.0}   # the suite fixes the member's noise axis
    assert not parent.exists(), "planning writes nothing"


def test_command_line_axes_replace_the_suites_own(tmp_path):
    plans = sweep.plans(["experiment=symmetry_removal", "symmetry.remove=true", "seed=3", *SMALL], tmp_path)
    for p in plans:
        assert {(c.symmetry.remove, c.seed) for c in p.configs.values()} == {(True, 3)}


@pytest.mark.parametrize("args, message", [
    (["model.widht=3"], "unknown setting 'model.widht'"),       # checked in every member before any is written
    (["optim.weight_decay=-1"], "optim.weight_decay must be >= 0"),
])
def test_a_bad_argument_fails_the_whole_suite_first(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        sweep.plans(["experiment=symmetry_removal", *args], tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_suite_is_not_one_configuration(tmp_path):
    with pytest.raises(ConfigError, match="is a suite of presets"):
        sweep.plan(["experiment=symmetry_removal"], tmp_path, single=True)
    with pytest.raises(ConfigError, match="not one configuration"):
        sweep.compose_one(["experiment=symmetry_removal"])


@pytest.mark.parametrize("text, message", [
    ("name: broken\nhydra:\n  sweeper:\n    suite:\n      no_such_preset: [seed=1]\n",
     "member 'no_such_preset' is not an experiment preset"),
    ("name: mixed\ntrain:\n  steps: 3\nhydra:\n  sweeper:\n    suite:\n      dead_neurons: [seed=1]\n",
     "a suite preset sets only `name` and `hydra.sweeper.suite`"),
    ("name: nested\nhydra:\n  sweeper:\n    suite:\n      symmetry_removal: []\n", "is a suite itself"),
])
def test_a_malformed_suite_file_is_refused(tmp_path, text, message):
    (tmp_path / "cfg" / "experiment").mkdir(parents=True)
    (tmp_path / "cfg" / "experiment" / "mine.yaml").write_text("# @package _global_\n" + text)
    with pytest.raises(ConfigError, match=message):
        sweep.plans([f"hydra.searchpath=[file://{tmp_path / 'cfg'}]", "experiment=mine"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_suite_through_the_command_line_then_report_status_and_resume(cli, tmp_path):
    cli("sweep", "experiment=symmetry_removal", "seed=0", *SMALL)
    (parent,) = (tmp_path / "outputs" / "symmetry_removal").iterdir()
    assert sorted(d.name for d in parent.iterdir()) == sorted(MEMBERS + ["launches"])
    for member in MEMBERS:
        runs = results.read_csv(parent / member / "runs.csv")
        assert set(runs["status"]) == {"finished"} and set(runs["symmetry.remove"]) == {False, True}
        assert any(f.name.endswith("_by_symmetry.remove.png") for f in (parent / member).glob("phase_*.png"))
    status = cli("status", str(parent)).stdout
    assert status.count(str(parent)) == len(MEMBERS)
    report = cli("report", str(parent)).stdout
    assert all(f"{parent / m}/runs.csv" in report.replace("\n", "") for m in MEMBERS)
    again = cli("sweep", "experiment=symmetry_removal", "seed=0", *SMALL, f"hydra.sweep.dir={parent}").stdout
    assert " ".join(again.split()).count("already finished") == len(MEMBERS)
    assert sorted(d.name for d in parent.iterdir()) == sorted(MEMBERS + ["launches"])
    assert sorted(d.name for d in (parent / "launches").iterdir()) == ["0", "1"]
    assert results.read_json(parent / "launches" / "1" / "plan.json")["packs"] == []   # nothing left to train


def test_one_launch_numbers_every_members_packs_and_each_job_trains_its_members_pack(tmp_path):
    """A suite's members are launched together (one multirun, one job array on SLURM): job i of
    the launch is one pack of one member, and the config Hydra composes for it (what its
    .hydra/config.yaml holds) rebuilds exactly that pack's runs, which its task then trains."""
    from hydra.core.hydra_config import HydraConfig

    from symrun.sweeping import job
    from symrun.sweeping.composition import composer, drop_hydra

    args = ["experiment=symmetry_removal", "seed=0", *SMALL]
    with composer(args) as comp:
        plans = sweep.sweeper_plans(comp, list(comp.master.hydra.overrides.task), tmp_path / "suite")
        path = sweep.write_launch(tmp_path / "suite", [(p, sweep.write_plan(p)) for p in plans])
        launch = results.read_json(path)
        assert path == tmp_path / "suite" / "launches" / "0" / "plan.json"
        assert launch["packs"] == [[m, j] for m, p in enumerate(plans) for j in range(len(p.packs))]
        assert len(plans) == len(MEMBERS) and all(p.packs for p in plans)
        for m, j in launch["packs"]:
            p = plans[m]
            cfg = comp.compose(sweep.job_overrides(p, j, tmp_path / "suite", 0, member=p.sweep_dir.name))
            HydraConfig.instance().set_config(cfg)
            sweep_dir, index, configs = job.pack_configs(drop_hydra(cfg.copy()))
            assert (sweep_dir, index) == (p.sweep_dir, j)
            assert configs == [p.configs[rid] for rid in p.packs[j]]
            assert job.task(drop_hydra(cfg))["runs"] == len(p.packs[j])
    for p in plans:
        assert all(records.is_finished(p.sweep_dir, rid) for rid in p.configs), p.sweep_dir.name
    # a second launch into the same suite gets the next number
    assert sweep.write_launch(tmp_path / "suite", []).parent.name == "1"


@pytest.mark.slow
def test_a_suite_through_an_out_of_process_launcher_runs_its_members_in_one_multirun(cli, tmp_path):
    out = cli("sweep", "experiment=symmetry_removal", "seed=0", *SMALL, "hydra/launcher=joblib",
              "hydra.launcher.n_jobs=2").stdout
    (parent,) = (tmp_path / "outputs" / "symmetry_removal").iterdir()
    launch = results.read_json(parent / "launches" / "0" / "plan.json")
    assert {m for m, _ in launch["packs"]} == set(range(len(MEMBERS)))
    # Hydra ran one job per pack of the launch, each in its folder beside the launch's plan
    jobs = sorted((parent / "launches" / "0" / "packs").iterdir(), key=lambda d: int(d.name))
    assert [d.name for d in jobs] == [str(i) for i in range(len(launch["packs"]))]
    for member in MEMBERS:
        runs = results.read_csv(parent / member / "runs.csv")
        assert set(runs["status"]) == {"finished"}, member
        assert f"{parent.relative_to(tmp_path) / member}/runs.csv" in out.replace("\n", "")   # its report


def test_suite_files_are_listed_with_the_presets(cli):
    listing = " ".join(cli("list").stdout.split())
    assert "symmetry_removal" in listing and "Symmetry removal: every symmetry" in listing
