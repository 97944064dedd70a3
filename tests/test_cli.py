"""The real `symrun` command end to end on tiny grids (subprocesses, as a user runs it)."""

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import sweep_dirs
from symrun import cli as cli_mod

TINY = ["model=hadamard", "optim.weight_decay=0,0.5", "seed=0,1", "train.steps=20", "train.log_every=10"]


@pytest.mark.slow
def test_sweep_writes_tidy_tables_and_a_rerun_trains_nothing(cli, tmp_path):
    first = cli("sweep", *TINY)
    (d,) = sweep_dirs(tmp_path / "outputs")
    assert "4 runs in 1 pack" in first.stdout
    # the launcher's line for the job counts its per-run lists (the job's own overrides hold them)
    assert "+pack.runs.seed=<4 values> +pack.runs.optim.weight_decay=<4 values>" in first.stdout
    assert "'[" not in first.stdout
    runs = pd.read_csv(d / "runs.csv")
    assert len(runs) == 4 and set(runs["status"]) == {"finished"}
    for col in ["run_id", "status", "optim.weight_decay", "seed", "model.name", "data.n", "train_loss",
                "test_loss", "sparsity", "balance", "constraint_distance", "weight_norm", "wall_time_s",
                "torch", "device"]:
        assert col in runs.columns, col
    assert "rank" not in runs.columns, "metrics that do not apply to the model stay out"
    assert runs["run_id"].is_unique
    results = pd.read_csv(d / "results.csv")
    assert len(results) == 4 * 3                         # steps 0, 10, 20
    assert {"run_id", "step", "optim.weight_decay", "seed", "train_loss"} <= set(results.columns)
    # final metrics in runs.csv are the last logged row of results.csv
    last = results[results["step"] == 20].set_index("run_id")["train_loss"]
    assert (runs.set_index("run_id")["train_loss"] - last).abs().max() == 0
    # per-run folders
    rid = runs["run_id"][0]
    folder = d / "runs" / rid
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "finished" and status["run_id"] == rid
    state = torch.load(folder / "params.pt", weights_only=True)
    assert set(state) == {"u", "w"} and state["u"].shape == (20,)
    assert (folder / "config.yaml").read_text().startswith("model:")
    assert list(d.glob("phase_sparsity_vs_optim.weight_decay.png"))
    # the same sweep into the same folder trains nothing and changes no run
    mtimes = {p: p.stat().st_mtime_ns for p in d.glob("runs/*/*")}
    again = cli("sweep", *TINY, f"hydra.sweep.dir={d}")
    assert "4 already finished" in again.stdout and "0 pack" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in d.glob("runs/*/*")} == mtimes
    assert len(pd.read_csv(d / "runs.csv")) == 4
    # widening the grid into the same folder trains only the new runs
    wider = cli("sweep", "model=hadamard", "optim.weight_decay=0,0.5", "seed=0,1,2", "train.steps=20",
                "train.log_every=10", f"hydra.sweep.dir={d}")
    assert "6 runs in 1 pack(s), 4 already finished" in wider.stdout
    assert len(pd.read_csv(d / "runs.csv")) == 6


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local"]])
def test_sweep_through_another_launcher_runs_every_pack(cli, tmp_path, launcher):
    shown = cli("sweep", "model=hadamard,factorization", "seed=0,1", "train.steps=5", "train.log_every=5", *launcher)
    assert "+pack.index=1 +pack.runs.seed=<2 values>" in shown.stdout + shown.stderr and "'[" not in shown.stdout
    (d,) = sweep_dirs(tmp_path / "outputs")
    runs = pd.read_csv(d / "runs.csv")
    assert len(runs) == 4 and set(runs["status"]) == {"finished"}
    assert set(runs["pack"]) == {0, 1}
    assert runs.groupby("model.name")["pack"].nunique().eq(1).all()


def test_run_one_config_and_print_config(cli, tmp_path):
    shown = cli("run", "model=mlp", "data=digits", "model.width=8", "--cfg", "job")
    assert "name: mlp" in shown.stdout and "width: 8" in shown.stdout
    assert not (tmp_path / "outputs").exists()
    cli("run", "model=mlp", "data=digits", "model.width=8", "train.steps=5", "train.log_every=5")
    (d,) = sweep_dirs(tmp_path / "outputs")
    runs = pd.read_csv(d / "runs.csv")
    assert len(runs) == 1 and runs["status"][0] == "finished"
    assert {"accuracy", "independent_fraction", "sparsity", "rank.layer0"} <= set(runs.columns)
    refused = cli("run", "seed=0,1", check=False)
    assert refused.returncode != 0 and "symrun sweep" in refused.stderr


def _npz(**arrays):
    return lambda d: np.savez(d / "d.npz", **arrays)


def _csv(text):
    return lambda d: (d / "d.csv").write_text(text)


def _preset(name, text):
    def write(d):
        (d / "cfg" / "experiment").mkdir(parents=True, exist_ok=True)
        (d / "cfg" / "experiment" / f"{name}.yaml").write_text("# @package _global_\n" + text)
    return write


X, Y = np.random.default_rng(0).standard_normal((8, 4)), np.random.default_rng(1).standard_normal(8)
X_NAN, Y_INF = X.copy(), Y.copy()
X_NAN[0, 1], Y_INF[2] = np.nan, np.inf
NPZ, CSV = ["data=file", "data.path=d.npz"], ["data=file", "data.path=d.csv", "data.target=[t]"]

# (command line, what the one error line must say, data file written first). README "Bad input".
BAD_INPUT = [
    (["sweep", "model=mlp", "model.widht=3"], "unknown setting 'model.widht'; did you mean 'model.width'?", None),
    (["sweep", "train.stepz=3"], "did you mean 'train.steps'?", None),
    (["sweep", "+optim.weight_decy=1"], "unknown setting 'optim.weight_decy'; did you mean 'optim.weight_decay'?", None),
    (["sweep", "model=mlpp"], "unknown model option 'mlpp'; did you mean 'mlp'?", None),
    (["sweep", "experiment=rescaling_sparsitty"], "did you mean 'rescaling_sparsity'?", None),
    (["sweep", "optim.lr=abc"], "wrong type for optim.lr", None),
    (["sweep", "train.steps=1.5"], "wrong type for train.steps", None),
    (["sweep", "optim.weight_decay=-1"], "optim.weight_decay must be >= 0", None),
    (["sweep", "optim.weight_decay=nan"], "optim.weight_decay must be >= 0, got nan", None),
    (["sweep", "optim.lr=-0.1"], "optim.lr must be a positive number", None),
    (["sweep", "optim.lr=nan"], "optim.lr must be a positive number, got nan", None),
    (["sweep", "noise.temperature=-1"], "noise.temperature must be a number >= 0", None),
    (["sweep", "noise.temperature=nan"], "noise.temperature must be a number >= 0, got nan", None),
    (["sweep", "data.batch_size=201"], "data.batch_size=201 exceeds the 200 training examples", None),
    (["sweep", "seed=range(0,0)"], "the grid is empty", None),
    (["run", "train.steps=0"], "train.steps must be >= 1, got 0", None),
    (["sweep", "train.steps=-5"], "train.steps must be >= 1, got -5", None),
    (["sweep", "data=file", "data.path=missing.npz"], "does not exist", None),
    (["sweep", "data=file", "data.path=/a/rather/long/path/that/does/not/exist/anywhere/on/this/machine/data.npz"],
     "does not exist", None),
    (["sweep", *NPZ], "needs arrays 'x' and 'y'", _npz(x=X)),
    (["sweep", *CSV], "target column(s) ['t'] not in the header", _csv("a,b\n1,2\n")),
    (["sweep", *NPZ], "x contains NaN or infinite values", _npz(x=X_NAN, y=Y)),
    (["sweep", *NPZ], "y contains NaN or infinite values", _npz(x=X, y=Y_INF)),
    (["sweep", *CSV], "x contains NaN or infinite values", _csv("a,b,t\n1,,0.5\n2,3,0.1\n")),
    (["sweep", *NPZ], "x has 8 rows but y has 7", _npz(x=X, y=Y[:7])),
    (["sweep", *NPZ], "do not match", _npz(x=X, y=Y, x_test=X[:, :3], y_test=Y)),
    (["sweep", *NPZ], "model=hadamard needs a single regression target", _npz(x=X, y=np.stack([Y, Y], 1))),
    (["sweep", *NPZ, "model=attention", "model.tokens=3"], "must divide the input dimension 4", _npz(x=X, y=Y)),
    (["sweep", *NPZ], "not a readable .npz", lambda d: (d / "d.npz").write_text("garbage")),
    # through Hydra's flags and a user's config folder
    (["sweep", "-cd", "cfg", "experiment=broken"], "cfg/experiment/broken.yaml, line 3: not valid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence from line 2)",
     _preset("broken", "train: {steps: [1, 2\n")),
    (["sweep", "-cd", "cfg", "experiment=typo"], "In 'experiment/typo': unknown setting 'train.stepz'; did you mean 'train.steps'?",
     _preset("typo", "train: {stepz: 3}\n")),
    (["sweep", "-cd", "cfg", "experiment=nope"], "unknown experiment option 'nope'", _preset("mine", "name: mine\n")),
    (["sweep", "-cd", "cfg", "experiment=nope"], "lr_drop, mine,", _preset("mine", "name: mine\n")),
    (["sweep", "-cd", "nowhere"], "Additional config directory", None),
    (["run", "hydra.searchpath=[file://nowhere]"], "hydra.searchpath: nowhere is not a folder", None),
    (["run", "seed=0,1"], "one configuration takes no sweep syntax (seed=0,1); use symrun sweep", None),
    (["run", "-m"], "symrun run takes one configuration; use symrun sweep", None),
    (["run", "experiment=symmetry_removal"], "experiment=symmetry_removal is a suite of presets", None),
    (["sweep", "experiment=rescaling_sparsity,dead_neurons"], "sweep one experiment preset at a time", None),
    (["sweep", "--cfg", "bogus"], "argument --cfg/-c: invalid choice: 'bogus'", None),
    (["sweep", "seed=0,1", "--plna"], "unrecognized arguments: --plna", None),
    (["sweep", "optim.weight_decay=interval(0,1)"], "not intervals", None),
    pytest.param(["sweep", "device=cuda"], "no CUDA device", None,
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
]


def _tree(root):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("args, message, write", BAD_INPUT)
def test_bad_input_is_one_line_naming_the_problem_and_changes_nothing(tmp_path, monkeypatch, args, message, write):
    """In-process through the real Typer app (a subprocess per case would cost seconds each)."""
    if write is not None:
        write(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    result = CliRunner().invoke(cli_mod.app, args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit))
    assert _tree(tmp_path) == before, "nothing is created or changed"


def test_list_help_and_report(cli, tmp_path):
    listing = cli("list").stdout
    for word in ["hadamard", "factorization", "mlp", "ensemble", "teacher", "digits", "file", "rescaling_sparsity", "joblib"]:
        assert word in listing
    for cmd in ["sweep", "run", "report", "list"]:
        assert "Usage" in cli(cmd, "--help").stdout
    for flag in ["--help", "-h"]:      # sweep and run: Hydra's help, with symrun's usage and the config groups
        shown = cli("sweep", flag).stdout
        assert "Usage: symrun sweep" in shown and "--plan" in shown and "== Config groups ==" in shown
        assert "experiment: attention_rank" in shown and "--config-dir,-cd" in shown
    missing = cli("report", str(tmp_path / "nowhere"), check=False)
    assert missing.returncode != 0 and "no sweep folders" in missing.stderr


@pytest.mark.parametrize("hydra_arg", ["hydra/launcher=nope", "hydra.launcher.n_jobs=2", "hydra.sweeper.params.seed=1,2",
                                       "hydra.searchpath=[file:///no/such/folder]", "--config-dir=/no/such/folder",
                                       "--cfg=bogus", "--plna"])
def test_bad_hydra_arguments_are_refused_before_anything_is_written(cli, tmp_path, hydra_arg):
    proc = cli("sweep", "seed=0,1", "train.steps=2", hydra_arg, check=False)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("args, allowed", [(["--help"], set()), (["--version"], set()), (["list"], set()),
                                           (["sweep", "--help"], {"hydra"})])
def test_help_and_list_do_not_import_torch_hydra_or_pandas(args, allowed):
    # `symrun --help` and `symrun list` must answer at once: the heavy imports wait for real work.
    # A command's own help is Hydra's (the config groups), without torch or pandas.
    code = ("import sys\nfrom symrun import cli\ntry:\n    cli.main(%r)\nexcept SystemExit:\n    pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'hydra', 'pandas', 'matplotlib'}))" % args)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(sorted(allowed))


def test_reading_a_sweep_back_does_not_import_torch(cli, tmp_path):
    # `symrun status`, `collect` and `report` read files: torch (1–2 s of start-up) waits for training.
    cli("sweep", "model=hadamard", "seed=0,1", "train.steps=20", "--outputs", "out")
    (sweep_dir,) = [p.parent for p in (tmp_path / "out").glob("*/*/sweep.json")]
    for args in (["status", str(sweep_dir)], ["collect", str(sweep_dir)], ["report", str(sweep_dir)]):
        code = ("import sys\nfrom symrun import cli\ntry:\n    cli.main(%r)\nexcept SystemExit as e:\n"
                "    assert not e.code, e.code\nprint('torch' in sys.modules)" % args)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == "False", args


def _entry(tmp_path, before: str, *args: str) -> subprocess.CompletedProcess:
    code = f"import atexit, sys, threading, time\n{before}\nfrom symrun import cli\nsys.argv = ['symrun', *{list(args)!r}]\ncli.entry()\n"
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NO_COLOR": "1"})


def test_the_program_ends_with_its_status_its_output_and_its_atexit_handlers(tmp_path):
    """cli.entry ends the process without the interpreter's tear-down (os._exit): what it printed
    (to pipes, so buffered) arrives, atexit handlers run, the exit status is the command's; a
    thread still running is waited for, and a profiler gets to write its results."""
    done = _entry(tmp_path, "atexit.register(lambda: print('handler ran'))", "list")
    assert done.returncode == 0 and "config groups" in done.stdout and done.stdout.rstrip().endswith("handler ran")
    refused = _entry(tmp_path, "", "status", str(tmp_path / "nowhere"))
    assert refused.returncode == 2 and refused.stderr.startswith("error: no sweep folders")
    thread = ("threading.Thread(target=lambda: (time.sleep(1), open('late.txt', 'w').write('written'))).start()")
    assert _entry(tmp_path, thread, "list").returncode == 0
    assert (tmp_path / "late.txt").read_text() == "written"
    profiled = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(tmp_path / "list.prof"), "-m", "symrun", "list"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert profiled.returncode == 0 and (tmp_path / "list.prof").stat().st_size > 0, "a profiler writes its results"
