"""model=module: a user's own torch.nn.Module, defined in a folder outside the package, swept as a
pack through torch.func; its mirrors declared in YAML and checked, or discovered."""

import json
import math
import textwrap

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import assert_a_seed_starts_its_runs_alike
from symrun import cli as cli_mod
from symrun import models
from symrun.models.module import ModuleConfig
from symrun.training import engine, memory
from symrun.sweeping import sweep

NETS = textwrap.dedent('''
    import math
    import torch
    from torch import nn


    class TanhMLP(nn.Module):
        """d_in → width → d_out with tanh (act='relu': ReLU)."""

        def __init__(self, d_in=64, width=16, d_out=10, act="tanh"):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(d_in, width), nn.Linear(width, d_out)
            self.act = torch.tanh if act == "tanh" else torch.relu

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))


    class ConvNet(nn.Module):
        """Two 3×3 convolutions on 8×8 images, average pooling, a linear readout."""

        def __init__(self, channels=3, classes=10):
            super().__init__()
            self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
            self.fc = nn.Linear(channels * 16, classes)

        def forward(self, x):
            h = torch.tanh(self.conv1(x.reshape(-1, 1, 8, 8)))
            return self.fc(nn.functional.avg_pool2d(torch.tanh(self.conv2(h)), 2).flatten(1))


    class LikeBuiltIn(nn.Module):
        """symrun's model=mlp (one tanh layer) written by hand: its init draws from the global
        generator exactly what symrun draws for model=mlp from the run's "init" stream."""

        def __init__(self, d_in, width, d_out):
            super().__init__()
            draw = lambda *shape, std: nn.Parameter(torch.randn(*shape, dtype=torch.float64) * std)
            self.w1, self.b1 = draw(width, d_in, std=1 / math.sqrt(d_in)), draw(width, std=0.0)
            self.w2, self.b2 = draw(d_out, width, std=1 / math.sqrt(width)), draw(d_out, std=0.0)

        def forward(self, x):
            return torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T + self.b2


    class WithBatchNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(64, 10), nn.BatchNorm1d(10)

        def forward(self, x):
            return self.bn(self.fc(x))


    class WithDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return nn.functional.dropout(self.fc(x), 0.5)


    class NoParameters(nn.Module):
        def forward(self, x):
            return x[:, :10]


    class Broken(nn.Module):
        def __init__(self, width):
            super().__init__()
            raise ValueError("width must be even")
''')

HIDDEN = [["fc1.weight", 0], ["fc1.bias", 0], ["fc2.weight", 1]]
MIRRORS = [{"kind": "rescaling", "name": "hidden", "slots": HIDDEN}, {"kind": "permutation", "name": "hidden", "slots": HIDDEN}]


def _flow(value) -> str:
    """A value as one Hydra override (YAML flow style)."""
    return yaml.safe_dump(json.loads(json.dumps(value)), default_flow_style=True, width=10_000).strip()   # no &anchors


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A folder of the user's outside the package, holding their module (a unique name per test:
    a module, once imported, stays in sys.modules) and a model config that uses it."""
    name = f"usernets_{tmp_path.name.replace('-', '_')}"
    cfg = tmp_path / "cfg"
    (cfg / "model").mkdir(parents=True)
    (cfg / f"{name}.py").write_text(NETS)
    (cfg / "model" / "tanh_mlp.yaml").write_text(yaml.safe_dump(
        {"defaults": ["module", "_self_"], "_target_": f"{name}.TanhMLP", "width": 6, "mirrors": MIRRORS}, sort_keys=False))
    monkeypatch.delenv("SYMRUN_IMPORT_PATH", raising=False)
    return name, cfg


def _runs(folder):
    (sweep_dir,) = [p.parent for p in folder.rglob("runs.csv")]
    return sweep_dir, pd.read_csv(sweep_dir / "runs.csv")


@pytest.mark.slow
def test_a_tanh_mlp_from_a_config_folder_sweeps_end_to_end_with_its_declared_mirrors(cli, tmp_path, user):
    name, cfg = user
    cli("sweep", "-cd", str(cfg), "model=tanh_mlp", "data=digits", "data.batch_size=64", "train.steps=120",
        "train.log_every=60", "optim.weight_decay=0,0.03", "seed=0,1", "--outputs", "out")
    sweep_dir, runs = _runs(tmp_path / "out")
    assert (runs["status"] == "finished").all() and runs["pack"].nunique() == 1 and (runs["pack_runs"] == 4).all()
    assert (runs["model._target_"] == f"{name}.TanhMLP").all() and (runs["model.width"] == 6).all()
    for column in ("sparsity", "independent_fraction", "constraint_fraction.rescaling", "critical_wd_max.rescaling",
                   "critical_wd_max.permutation", "accuracy"):
        assert runs[column].notna().all(), column
    assert runs.groupby("optim.weight_decay")["weight_norm"].mean().is_monotonic_decreasing
    assert (sweep_dir / "phase_sparsity_vs_optim.weight_decay.png").is_file()
    assert (sweep_dir / "phase_independent_fraction_vs_optim.weight_decay.png").is_file()
    # params.pt is the module's own state dict: it loads into a fresh instance of the user's class
    import sys

    import torch

    from symrun.sweeping.results import load_params

    sys.path.insert(0, str(cfg))
    try:
        net = __import__(name).TanhMLP(width=6)
        net.load_state_dict(load_params(sweep_dir / "runs" / runs["run_id"][0] / "params.pt"))
    finally:
        sys.path.remove(str(cfg))
    assert isinstance(net(torch.zeros(2, 64)), torch.Tensor)


@pytest.mark.slow
def test_a_conv_net_in_the_current_folder_sweeps_end_to_end(cli, tmp_path, user):
    name, cfg = user
    (tmp_path / f"{name}_here.py").write_text(NETS)          # cli runs in tmp_path: the current folder
    cli("sweep", "model=module", f"model._target_={name}_here.ConvNet", "+model.channels=3", "data=digits",
        "data.batch_size=32", "train.steps=40", "train.log_every=20", "optim.weight_decay=0,0.01", "--outputs", "out")
    _, runs = _runs(tmp_path / "out")
    assert (runs["status"] == "finished").all() and len(runs) == 2
    assert runs["accuracy"].min() > 0.2            # it learned something in 40 steps (chance: 0.1)


def _configs(args):
    return list(sweep.plan(args, sweep_dir=Path("unused")).configs.values())     # plan writes nothing


def test_a_run_alone_equals_the_same_run_in_a_pack(user, monkeypatch):
    name, cfg = user
    monkeypatch.syspath_prepend(str(cfg))
    cfgs = _configs(["model=module", f"model._target_={name}.TanhMLP", "+model.width=8", "data=digits",
                     "data.batch_size=32", "optim.weight_decay=0,0.01", "seed=0,1", "noise.label_flip=0.1",
                     "train.steps=60", "train.log_every=30", "train.dtype=float64", "device=cpu",
                     f"model.mirrors={_flow(MIRRORS)}"])
    whole = engine.train_pack(cfgs)
    for cfg_, want in zip(cfgs, whole):
        (got,) = engine.train_pack([cfg_])
        for a, b in zip(got.rows, want.rows):
            for k in b:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-14, err_msg=k)
        for k in want.state:
            np.testing.assert_allclose(got.state[k].numpy(), want.state[k].numpy(), rtol=1e-12, atol=1e-14, err_msg=k)


def test_an_evaluation_in_chunks_of_examples_equals_one_pass(user, monkeypatch):
    """Autograd off, a module's forward goes through the batch in chunks within memory.EVAL_BYTES
    (its width measured on the module); the outputs equal one pass over the whole batch."""
    name, cfg = user
    monkeypatch.syspath_prepend(str(cfg))
    model = models.build(ModuleConfig(target=f"{name}.ConvNet", args={"channels": 2}), 64, 10)
    # the input, conv1 and conv2 (2 × 8 × 8 each) and the readout's 10
    assert model.example_width() == 64 + 2 * 128 + 10
    params = model.init_params([0, 1, 2], torch.device("cpu"), torch.float64)
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        whole = model.forward(params, x)
        monkeypatch.setattr(memory, "EVAL_BYTES", 3 * 7 * model.example_width() * 8 * memory.EVAL_COPIES)
        assert memory.eval_items(model.example_width()) // 3 == 7          # 8 chunks of ≤ 7 examples
        calls = []
        inner = model.skeleton.forward
        monkeypatch.setattr(model.skeleton, "forward", lambda xb: calls.append(1) or inner(xb))
        chunked = model.forward(params, x)
    assert len(calls) == 8
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-14)


def test_a_pack_of_the_users_module_trained_as_parts_over_threads_equals_the_plain_pack(user, monkeypatch):
    """Each part's thread calls its own copy of the module's skeleton (functional_call swaps a
    module's tensors while it runs), and the parts draw their runs' initialisations one at a time
    (from torch's generator, which is the process's)."""
    from conftest import assert_same_run
    from symrun.training import shards

    name, cfg = user
    monkeypatch.syspath_prepend(str(cfg))
    cfgs = _configs(["model=module", f"model._target_={name}.ConvNet", "+model.channels=2", "data=digits",
                     "data.batch_size=16", "optim.weight_decay=0,0.01", "seed=range(0,4)", "train.steps=12",
                     "train.log_every=6", "train.dtype=float64", "device=cpu"])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(shards, "MIN_THREAD_RUNS", 10**9)
        plain = engine.train_pack(cfgs)
        monkeypatch.setattr(shards, "MIN_THREAD_RUNS", 1)
        monkeypatch.setattr(shards, "MIN_THREAD_BYTES", 1)
        monkeypatch.setattr(shards, "CHUNK_BYTES", 1)               # two parts, a chunk per run
        chunked = engine.train_pack(cfgs)
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(chunked, plain):
        assert_same_run(got, want, rtol=1e-12, atol=1e-14)


def test_sparsity_of_the_user_mlp_matches_the_built_in_mlp_on_the_same_data_and_seed(user, monkeypatch):
    """The same network, init and data through model=module and model=mlp: the same training."""
    name, cfg = user
    monkeypatch.syspath_prepend(str(cfg))
    grid = ["data=teacher", "data.teacher=mlp", "data.out_dim=2", "data.dim=6", "optim.weight_decay=0.01,0.3,0.5,1",
            "seed=0,1", "optim.lr=0.2", "train.steps=800", "train.log_every=400", "train.dtype=float64", "device=cpu"]
    mine = engine.train_pack(_configs(["model=module", f"model._target_={name}.LikeBuiltIn", "+model.d_in=6",
                                       "+model.width=8", "+model.d_out=2", *grid, "model.mirrors=" + _flow(
                                           [{"kind": "rescaling", "slots": [["w1", 0], ["b1", 0], ["w2", 1]]}])]))
    built_in = engine.train_pack(_configs(["model=mlp", "model.width=8", *grid]))
    sparsity = [o.rows[-1]["sparsity"] for o in built_in]
    assert len(set(sparsity)) > 1                    # weight decay matters on this grid
    assert [o.rows[-1]["sparsity"] for o in mine] == sparsity
    for a, b in zip(mine, built_in):
        for k in ("train_loss", "weight_norm", "critical_wd_max.rescaling"):
            np.testing.assert_allclose(a.rows[-1][k], b.rows[-1][k], rtol=1e-9, err_msg=k)


def _check(*args):
    return CliRunner().invoke(cli_mod.app, ["check", *args])


def test_declared_mirrors_pass_symrun_check_and_a_wrong_declaration_fails(user):
    name, cfg = user
    ok = _check("-cd", str(cfg), "model=tanh_mlp", "data=digits", "--json")
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.output)
    assert {c["symmetry"] for c in report["checks"] if c["declared"] and c["holds"]} == {"flip hidden", "swap hidden"}
    # ReLU is not odd: its sign flips are not mirrors, and check says so (exit status 1)
    wrong = _check("-cd", str(cfg), "model=tanh_mlp", "+model.act=relu", "data=digits", "--json")
    assert wrong.exit_code == 1
    flip = [c for c in json.loads(wrong.output)["checks"] if c["symmetry"] == "flip hidden"]
    assert flip and not flip[0]["holds"] and flip[0]["invariance"] > 1e-6


@pytest.mark.parametrize("act, kinds", [("tanh", ["rescaling", "permutation"]), ("relu", ["permutation"])])
def test_discover_finds_the_flips_and_swaps_that_hold_and_proposes_none_that_does_not(user, act, kinds, tmp_path):
    name, cfg = user
    result = _check("model=module", f"model._target_={name}.TanhMLP", "+model.width=5", f"+model.act={act}",
                    "data=digits", "--discover", "-cd", str(cfg))
    assert result.exit_code == 0, result.output
    proposed = yaml.safe_load(result.output)["mirrors"]
    assert [m["kind"] for m in proposed] == kinds            # no sign flip for ReLU, no rotation across tanh
    assert all(m["slots"] == HIDDEN for m in proposed)
    # pasted into model.mirrors, every proposal is declared and holds
    again = _check("model=module", f"model._target_={name}.TanhMLP", "+model.width=5", f"+model.act={act}",
                   "data=digits", f"model.mirrors={_flow(proposed)}", "--json", "-cd", str(cfg))
    assert again.exit_code == 0
    checks = json.loads(again.output)["checks"]
    assert sum(c["declared"] and c["holds"] for c in checks) == len(kinds)


BAD = [
    (["model=module"], "model=module needs model._target_"),
    (["model=module", "model._target_=nowhere_at_all.Net"], "cannot import nowhere_at_all (ModuleNotFoundError"),
    (["model=module", "model._target_={name}.Missing"], "has no Missing"),
    (["model=module", "model._target_={name}.Broken", "+model.width=3"], "Broken(width=3) failed: ValueError: width must be even"),
    (["model=module", "model._target_={name}.TanhMLP", "+model.widht=3"], "unexpected keyword argument 'widht'"),
    (["model=module", "model._target_={name}.TanhMLP", "+model.d_out=3"], "the data needs (3, 10)"),
    (["model=module", "model._target_={name}.TanhMLP", "+model.d_in=5"], "its forward pass on a batch of 3 inputs of 64"),
    (["model=module", "model._target_={name}.NoParameters"], "has no parameters to train"),
    (["model=module", "model._target_={name}.WithBatchNorm"], "updates its buffers (bn.running_mean"),
    (["model=module", "model._target_={name}.WithDropout"], "draws random numbers"),
    (["model=tanh_mlp", "model.mirrors=[{kind:rescaling,slots:[[fc9.weight,0]]}]"], "no parameter 'fc9.weight'"),
    (["model=tanh_mlp", "model.mirrors=[{kind:rescaling,slots:[[fc1.bias,1]]}]"], "axis 1 of fc1.bias is out of range"),
    (["model=tanh_mlp", "model.mirrors=[{kind:permutation,slots:[[fc1.weight,0],[fc2.weight,0]]}]"],
     "fc1.weight[0] = 6, fc2.weight[0] = 10"),
    (["model=tanh_mlp", "model.mirrors=[{kind:rotation,left:fc1.weight,right:fc2.weight}]"], "a rotation needs left"),
    (["model=tanh_mlp", "model.mirrors=[{kind:shear}]"], "model.mirrors[0] must be a mapping with kind"),
]


@pytest.mark.parametrize("args, words", BAD, ids=[w[:30] for _, w in BAD])
def test_a_module_that_cannot_be_trained_is_one_error_line_before_any_work(user, tmp_path, monkeypatch, args, words):
    name, cfg = user
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{name}", name) for a in args]
    result = CliRunner().invoke(cli_mod.app, ["sweep", "-cd", str(cfg), *args, "data=digits", "train.steps=2",
                                              "--outputs", str(tmp_path / "out")])
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:") and words in " ".join(lines[0].split()), result.output
    assert not (tmp_path / "out").exists()


def test_init_scale_scales_the_modules_own_initialisation(user, monkeypatch):
    from symrun.models import build
    from symrun.models.module import ModuleConfig

    name, cfg = user
    monkeypatch.syspath_prepend(str(cfg))
    import torch

    one, half = (build(ModuleConfig(target=f"{name}.TanhMLP", init_scale=s), 64, 10) for s in (1.0, 0.5))
    a = one.init_params([3], torch.device("cpu"), torch.float64)
    b = half.init_params([3], torch.device("cpu"), torch.float64)
    assert all(torch.equal(a[k] * 0.5, b[k]) for k in a)
    assert not math.isclose(float(a["fc1.weight"].detach().std()), 0.0)


def test_a_saved_config_without_its_target_is_damaged(tmp_path):
    """A hand-edited config.yaml of a model=module run that lost `_target_` (which has no default)
    is a damaged file, named, not a run with an empty axis."""
    from symrun.sweeping import records

    run = tmp_path / "runs" / "module-s0-x"
    run.mkdir(parents=True)
    good = {"model": {"name": "module", "_target_": "pkg.Net", "mirrors": [], "width": 4}, "data": {"name": "digits"}}
    (run / "config.yaml").write_text(yaml.safe_dump(good))
    from symrun.sweeping import folder

    def read_config():
        with folder.opened(run, tmp_path, create=False) as opened:
            return records._read_config(opened)

    assert read_config()[1] is None
    (run / "config.yaml").write_text(yaml.safe_dump({**good, "model": {"name": "module", "width": 4}}))
    flat, problem = read_config()
    assert flat is None and "it lacks model._target_, which has no default" in problem


def test_runs_of_a_seed_start_alike_each_in_its_own_memory(user, monkeypatch):
    """A seed's module is built once for all its runs (a grid over weight decay repeats each seed)."""
    from symrun.models import build

    name, cfg = user
    monkeypatch.syspath_prepend(str(cfg))
    assert_a_seed_starts_its_runs_alike(build(ModuleConfig(target=f"{name}.TanhMLP"), 64, 10))
