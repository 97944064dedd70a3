"""symrun is a Hydra app: Hydra's flags and overrides through `symrun sweep|run`, a user's own
config folders, the sweeper's pack jobs and the dry run — the real command, in subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import sweep_dirs
from symrun.sweeping import results
from symrun.sweeping.job import values_of

TINY = ["train.steps=4", "train.log_every=2", "metrics.critical_mirrors=0"]


def user_configs(root: Path) -> Path:
    """A folder of one's own configs: a preset over a data config of one's own, a launcher preset,
    a primary config, and a preset that replaces a built-in one of the same name."""
    folder = root / "mycfg"
    for group in ("experiment", "data", "model", "hydra/launcher"):
        (folder / group).mkdir(parents=True)
    (folder / "experiment" / "mine.yaml").write_text(
        "# @package _global_\n# My preset: sparsity of a small Hadamard model on my data.\n"
        "defaults:\n  - override /data: small\n"
        "name: mine\ntrain: {steps: 4, log_every: 2}\nmetrics: {critical_mirrors: 0}\n"
        "hydra:\n  sweeper:\n    params:\n      optim.weight_decay: 0,0.5\n      seed: 0,1\n")
    (folder / "data" / "small.yaml").write_text("defaults:\n  - teacher\n  - _self_\nn: 30\ndim: 6\nnonzero: 2\n")
    (folder / "model" / "narrow.yaml").write_text("defaults:\n  - mlp\n  - _self_\nwidth: 3\n")
    (folder / "experiment" / "rescaling_sparsity.yaml").write_text(
        "# @package _global_\n# Replaces the built-in preset.\nname: replaced\n"
        "hydra:\n  sweeper:\n    params:\n      seed: 5,6,7\n")
    (folder / "hydra" / "launcher" / "two.yaml").write_text("defaults:\n  - joblib\n  - _self_\nn_jobs: 2\n")
    (folder / "mine_primary.yaml").write_text("defaults:\n  - config\n  - _self_\ntrain:\n  steps: 3\n")
    return folder


def symrun(cwd: Path, *args: str, env: dict = (), check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "symrun", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NO_COLOR": "1", "COLUMNS": "400", **dict(env)})
    if check and proc.returncode != 0:
        raise AssertionError(f"symrun {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--config-dir", "-cd", "hydra.searchpath"])
def test_a_users_folder_adds_a_preset_and_a_data_config_swept_end_to_end(tmp_path, how):
    folder = user_configs(tmp_path)
    where = [f"hydra.searchpath=[file://{folder}]"] if how == "hydra.searchpath" else [how, str(folder)]
    out = symrun(tmp_path, "sweep", *where, "experiment=mine").stdout
    (d,) = sweep_dirs(tmp_path / "outputs")
    assert d.parent.name == "mine" and "4 runs in 1 pack(s)" in out
    runs = results.read_csv(d / "runs.csv")
    assert len(runs) == 4 and set(runs["status"]) == {"finished"}
    assert set(runs["data.n"]) == {30} and set(runs["data.dim"]) == {6} and set(runs["optim.weight_decay"]) == {0, 0.5}
    # The pack's Hydra job folder holds what it trained: the shared config and each run's own values.
    (job,) = (d / "launches" / "0" / "packs").iterdir()
    saved = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
    assert saved["data"]["n"] == 30 and saved["name"] == "mine" and saved["pack"]["index"] == 0
    pack = saved["pack"]["runs"]          # each per-run setting that varies: its values, one per run
    assert sorted(zip(values_of(pack["seed"]), values_of(pack["optim"]["weight_decay"]))) == sorted(zip(runs["seed"], runs["optim.weight_decay"]))
    assert "experiment=mine" in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    assert "#0 : experiment=mine +pack.index=0 +pack.runs." in out      # Hydra's log of the job
    listing = symrun(tmp_path, "list", *where).stdout
    for name in ("mine", "small", "narrow", "rescaling_sparsity", "two"):
        assert f"{name} ({folder})" in listing, name
    assert "My preset: sparsity of a small Hadamard model" in listing
    checked = symrun(tmp_path, "check", "-cd", str(folder), "model=narrow", "data=small", "--mirrors", "1", "--json").stdout
    assert '"model": "mlp"' in checked and '"ok": true' in checked


def test_a_users_preset_replaces_the_built_in_one_of_that_name(tmp_path):
    folder = user_configs(tmp_path)
    out = symrun(tmp_path, "sweep", "-cd", str(folder), "experiment=rescaling_sparsity", "--plan").stdout
    assert "replaced →" in out and "3 runs over seed" in out
    assert "dry run: nothing was written" in out and not (tmp_path / "outputs").exists()
    assert "n_jobs: 2" in symrun(tmp_path, "sweep", "-cd", str(folder), "hydra/launcher=two", "--cfg", "hydra").stdout


def test_hydra_flags_show_instead_of_running(tmp_path):
    folder = user_configs(tmp_path)
    hydra_cfg = symrun(tmp_path, "sweep", "experiment=rescaling_sparsity", "seed=0,1", "--cfg", "hydra").stdout
    assert "_target_: hydra._internal.core_plugins.basic_launcher.BasicLauncher" in hydra_cfg
    assert "SymrunSweeper" in hydra_cfg and "seed: 0,1" in hydra_cfg and "noise.label_std: 0,1" in hydra_cfg
    assert "JoblibLauncher" in symrun(tmp_path, "sweep", "hydra/launcher=joblib", "--cfg", "hydra").stdout
    both = symrun(tmp_path, "sweep", "--cfg", "all").stdout
    assert both.startswith("hydra:\n") and "\nmodel:\n" in both
    optim = symrun(tmp_path, "run", "--cfg", "job", "-p", "optim", "optim.lr=0.5").stdout
    assert optim.startswith("# @package optim") and "lr: 0.5" in optim and "model:" not in optim
    # (the dirs read the task's `name`: resolve them within the whole config)
    resolved = symrun(tmp_path, "run", "--cfg", "all", "--resolve", "--package", "hydra.run").stdout
    assert "dir: outputs/default/20" in resolved and "${" not in resolved
    assert "steps: 3" in symrun(tmp_path, "run", "-cd", str(folder), "-cn", "mine_primary", "--cfg", "job").stdout
    assert "steps: 3" in symrun(tmp_path, "run", "--config-dir", str(folder), "--config-name", "mine_primary",
                                "--cfg", "job").stdout
    assert str(folder) in symrun(tmp_path, "sweep", "-cd", str(folder), "--info", "searchpath").stdout
    assert "Defaults Tree" in symrun(tmp_path, "run", "--info", "defaults-tree").stdout
    assert "Config search path" in symrun(tmp_path, "sweep", "--info").stdout        # bare: all
    assert "SymrunSweeper" in symrun(tmp_path, "run", "-i", "plugins").stdout
    assert symrun(tmp_path, "--version").stdout.strip() == f"symrun {__import__('symrun').__version__}"
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_run_honours_hydra_run_dir_and_chdir_and_verbose(tmp_path):
    x = np.random.default_rng(0).standard_normal((20, 3))
    np.savez(tmp_path / "d.npz", x=x, y=x @ [1.0, 0.0, -1.0])
    args = ["data=file", "data.path=d.npz", *TINY]      # a path relative to where symrun starts
    out = symrun(tmp_path, "run", *args, "hydra.run.dir=one", "hydra.job.chdir=true", "hydra.verbose=true")
    d = tmp_path / "one"
    assert "1 runs in 1 pack(s)" in out.stdout and "Installed Hydra Plugins" in out.stdout + out.stderr
    assert yaml.safe_load((d / ".hydra" / "config.yaml").read_text())["data"]["path"] == "d.npz"
    runs = results.read_csv(d / "runs.csv")
    assert list(runs["status"]) == ["finished"] and runs["data.path"][0] == str(tmp_path / "d.npz")
    again = symrun(tmp_path, "run", *args, "hydra.run.dir=one").stdout
    assert "1 already finished" in again and not (tmp_path / "outputs").exists()
    # a sweep's pack jobs run in their own folders with chdir too
    symrun(tmp_path, "sweep", *args, "seed=0,1", "hydra.job.chdir=true", "--outputs", "res")
    (s,) = sweep_dirs(tmp_path / "res")
    assert set(results.read_csv(s / "runs.csv")["status"]) == {"finished"}


def test_dry_run_lists_runs_packs_steps_and_cost_and_writes_nothing(tmp_path):
    grid = ["model=hadamard,factorization", "optim.weight_decay=0,0.5", "seed=0,1", *TINY]
    out = symrun(tmp_path, "sweep", *grid, "--plan").stdout
    assert "8 runs over model.name, optim.weight_decay, seed; 0 already finished, 8 to train in 2 pack(s)" in out
    assert "cost: 8 pack-steps" in out and "32 run-steps" in out and "hadamard-s0-" in out and "factorization-s1-" in out
    assert not (tmp_path / "outputs").exists()
    d = tmp_path / "sweep"
    symrun(tmp_path, "sweep", *grid[:1], "optim.weight_decay=0,0.5", "seed=0", *TINY, f"hydra.sweep.dir={d}")
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*")}
    again = symrun(tmp_path, "sweep", *grid, f"hydra.sweep.dir={d}", "--dry-run").stdout
    assert "(resumes)" in again and "4 already finished, 4 to train in 2 pack(s)" in again and "finished" in again
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*")} == before


def test_shell_completion_completes_commands_groups_and_keys(tmp_path):
    script = symrun(tmp_path, "sweep", "-sc", "install=bash").stdout
    assert "hydra_bash_completion" in script and "complete " in script
    query = lambda line: symrun(tmp_path, "-sc", "query=bash", env={"COMP_LINE": line}).stdout.split()  # noqa: E731
    assert query("symrun sw") == ["sweep"]
    assert "model=" in query("symrun sweep mod")
    assert "model=mlp" in query("symrun run model=")
    assert "optim.weight_decay=" in query("symrun sweep optim.w")
    assert query("symrun sweep experiment=rescaling") == ["experiment=rescaling_sparsity"]
    folder = user_configs(tmp_path)
    assert "experiment=mine" in query(f"symrun sweep -cd {folder} experiment=")
    assert "hydra/launcher=slurm" in query("symrun sweep hydra/launcher=")


@pytest.mark.parametrize("text", ["plain/dir", "with space, and comma", "it's", "back\\slash", "ends\\", "a'b\\'c",
                                  "${x}/y", "[not a list]"])
def test_a_folder_name_reaches_hydra_as_written(text):
    """--outputs DIR and a sweep's folder travel as Hydra overrides: quoted, with `${` kept literal."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from symrun.sweeping.composition import hydra_quoted, literal

    value = OverridesParser.create().parse_override(f"key={hydra_quoted(literal(text))}").value()
    assert OmegaConf.create({"v": value}).v == text


def test_a_pack_jobs_per_run_values_read_back_typed_and_exact():
    assert values_of('[0, 1, -2]') == [0, 1, -2]
    assert values_of('[0.1, -0.0, 1e-300, NaN]')[:3] == [0.1, -0.0, 1e-300]
    assert str(values_of('[-0.0]')[0]) == "-0.0" and values_of('[NaN]')[0] != values_of('[NaN]')[0]
    assert values_of('["constant", "cosine"]') == ["constant", "cosine"]
    assert values_of("0.1,0.2") == [0.1, 0.2] and values_of("0,1") == [0, 1]    # as earlier versions wrote them
    assert values_of([1, 2]) == [1, 2]                                         # a job config written by hand
