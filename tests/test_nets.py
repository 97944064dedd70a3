"""Real networks on tiny stand-in data: model=resnet18 on data=cifar10 (a random CIFAR-10 folder
written in the on-disk format) and model=transformer on data=text.

Expected values come from independent computations: torchvision's own module loading the saved
state, hand-built dead and duplicate channels, a run trained alone for the pack, the mirror
algebra of docs/theory.md §2 (loss invariance, Oᵀ∇L = 0 on the constraint set).
"""

from __future__ import annotations

import json
import pickle
import sys

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch

from conftest import assert_same_run, sweep_dirs, write_fake_cifar
from symrun.data import corpora
from symrun.training import engine
from symrun.analysis import report
from symrun.sweeping import sweep
from symrun.config import (Cifar10DataConfig, Config, ConfigError, MetricsConfig, ResNetConfig, TextDataConfig,
                           TransformerConfig, validate)
from symrun.data import DataError, load
from symrun.training.engine import loss_per_run
from symrun.models import build
from symrun.analysis.symmetries import Rotation, apply_mirror

CPU = torch.device("cpu")


@pytest.fixture
def cifar(tmp_path):
    return write_fake_cifar(tmp_path / "cifar")


# ---------------------------------------------------------------------------------------------
# data=cifar10


def test_cifar_folder_is_read_standardised_and_subset(cifar):
    ds = load(validate(Config(model=ResNetConfig(), data=Cifar10DataConfig(root=str(cifar)))).data)
    assert ds.x.shape == (20, 3072) and ds.x.dtype == np.float32 and ds.x_test.shape == (4, 3072)
    assert ds.task == "classification" and ds.n_classes == 10
    with open(cifar / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(ds.y[4:8], raw[b"labels"])
    channels = ds.x.reshape(20, 3, -1)
    np.testing.assert_allclose(channels.mean(axis=(0, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(channels.std(axis=(0, 2)), 1, atol=1e-4)
    # the batches folder itself is accepted as root; a subset is a deterministic draw of rows
    inner = Cifar10DataConfig(root=str(cifar / "cifar-10-batches-py"), subset=6, test_subset=2, seed=3)
    a, b = load(inner), load(inner)
    assert a.x.shape == (6, 3072) and a.x_test.shape == (2, 3072)
    np.testing.assert_array_equal(a.x, b.x)
    assert set(a.y) <= set(ds.y)


def test_cifar_missing_or_malformed_is_one_clear_error(tmp_path, cifar):
    with pytest.raises(ConfigError, match="data.root is not a folder: .*nowhere"):
        validate(Config(model=ResNetConfig(), data=Cifar10DataConfig(root=str(tmp_path / "nowhere"))))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no CIFAR-10 at .*empty \(missing data_batch_1, .*test_batch"):
        load(Cifar10DataConfig(root=str(tmp_path / "empty")))
    batch = cifar / "cifar-10-batches-py" / "data_batch_3"
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match=r"data_batch_3: not a CIFAR-10 python batch .*uint8 \(2, 100\)"):
        load(Cifar10DataConfig(root=str(cifar)))
    with open(batch, "wb") as f:           # a pickle that would run code is refused, not executed
        pickle.dump({b"data": print}, f, protocol=2)
    with pytest.raises(DataError, match=r"refusing to load (__builtin__|builtins)\.print"):
        load(Cifar10DataConfig(root=str(cifar)))


# ---------------------------------------------------------------------------------------------
# model=resnet18


def resnet(cifar, dtype=torch.float32):
    cfg = validate(Config(model=ResNetConfig(), data=Cifar10DataConfig(root=str(cifar))))
    ds = load(cfg.data)
    model = build(cfg.model, ds.in_dim, ds.out_dim)
    params = model.init_params([0], CPU, dtype)
    return model, params, torch.as_tensor(ds.x[:4], dtype=dtype), torch.as_tensor(ds.y[:4])


def test_resnet_forward_backward_on_four_images(cifar):
    model, params, x, y = resnet(cifar)
    out = model.forward(params, x)                                   # training mode: autograd on
    assert out.shape == (1, 4, 10)
    loss = loss_per_run(out, y, "classification")
    grads = torch.autograd.grad(loss.sum(), list(params.values()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    assert model.stats["layer1.0.bn1.num_batches_tracked"].tolist() == [1]
    model.init_params([5], CPU, torch.float32)                       # a fresh draw (shrink-and-perturb)
    assert model.stats["layer1.0.bn1.num_batches_tracked"].tolist() == [1], "keeps the running statistics"
    assert params["conv1.weight"].shape == (1, 64, 3, 3, 3)          # the CIFAR stem
    with torch.no_grad():                                            # evaluation: running statistics
        np.testing.assert_array_equal(model.forward(params, x), model.forward(params, x))
        assert model.stats["layer1.0.bn1.num_batches_tracked"].tolist() == [1]


def test_resnet_state_loads_into_torchvision_and_gives_the_same_outputs(cifar):
    from torchvision.models import resnet18

    model, params, x, _ = resnet(cifar, torch.float64)
    model.forward(params, x)                                         # one training step's statistics
    net = resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
    net.load_state_dict(model.run_state(params, 0))                  # strict: every key, every shape
    net.double().eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward(params, x)[0], net(x.reshape(4, 3, 32, 32)))


def test_a_channel_swap_leaves_the_loss_unchanged(cifar):
    model, params, x, y = resnet(cifar, torch.float64)
    params = {k: v.detach() for k, v in params.items()}
    with torch.no_grad():
        params = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}   # BN scales/shifts differ too
    for sym in (model.symmetries()[0], model.symmetries()[5]):
        swapped = apply_mirror(sym, params, (1, 6))
        assert not torch.equal(swapped[f"{sym.neurons.name}.conv1.weight"], params[f"{sym.neurons.name}.conv1.weight"])
        torch.testing.assert_close(loss_per_run(model.forward(swapped, x), y, "classification"),
                                   loss_per_run(model.forward(params, x), y, "classification"), rtol=1e-10, atol=1e-10)


def test_dead_and_identical_channels_are_counted(cifar):
    model, params, x, _ = resnet(cifar)
    params = {k: v.detach().clone() for k, v in params.items()}
    b = "layer1.0"
    params[f"{b}.bn1.weight"][0, 3] = 0.0
    params[f"{b}.bn1.bias"][0, 3] = -1.0                             # relu(0·z − 1) = 0 everywhere
    for slot, axis in (("conv1.weight", 1), ("bn1.weight", 1), ("bn1.bias", 1), ("conv2.weight", 2)):
        t = params[f"{b}.{slot}"]
        t.select(axis, 10).copy_(t.select(axis, 11))                 # channel 10 = channel 11
    with torch.no_grad():
        m = model.probe_metrics(params, x, MetricsConfig())
    assert m[f"dead_fraction.{b}"].item() == 1 / 64
    # 64 channels: one dead (in no group), 10 and 11 one group, the other 61 each their own
    assert m[f"independent_fraction.{b}"].item() == pytest.approx(62 / 64)
    for key, value in m.items():
        assert 0 <= value.item() <= 1, key
    widths = [64, 64, 128, 128, 256, 256, 512, 512]
    dead = sum(m[f"dead_fraction.{blk}"].item() * w for blk, w in zip(model.BLOCKS, widths))
    assert m["dead_fraction"].item() == pytest.approx(dead / sum(widths))


def test_cluster_order_puts_correlated_features_together():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((200, 3))
    features = np.repeat(base, 4, axis=1) + 0.05 * rng.standard_normal((200, 12))   # 3 groups of 4
    perm = rng.permutation(12)
    order = report.cluster_order(np.corrcoef(features[:, perm].T))
    groups = (perm // 4)[order]
    assert sorted(set(np.flatnonzero(np.diff(groups)))) == [3, 7]          # contiguous blocks


@pytest.mark.slow
def test_resnet_sweep_through_the_cli(cli, tmp_path, cifar):
    cli("sweep", "model=resnet18", "data=cifar10", f"data.root={cifar}", "data.batch_size=4",
        "optim.weight_decay=0,0.01", "train.steps=2", "train.log_every=1", "optim.momentum=0.9", "optim.lr=0.01")
    (d,) = sweep_dirs(tmp_path / "outputs")
    plan = json.loads((d / "launches" / "0" / "plan.json").read_text())
    assert sorted(len(p) for p in plan["packs"]) == [1, 1]           # each run its own pack
    runs = pd.read_csv(d / "runs.csv")
    assert set(runs["status"]) == {"finished"}
    cols = [f"{m}.{b}" for m in ("dead_fraction", "independent_fraction") for b in
            ("layer1.0", "layer4.1")] + ["dead_fraction", "independent_fraction", "dead_fraction.penultimate",
                                         "accuracy", "test_loss", "constraint_fraction"]
    for col in cols:
        assert runs[col].between(0, 1).all() if col != "test_loss" else runs[col].gt(0).all(), col
    for rid in runs["run_id"]:
        image = plt.imread(d / "runs" / rid / "penultimate_correlation.png")
        w, h = report.CORRELATION_FIGSIZE
        assert image.shape == (h * report.CORRELATION_DPI, w * report.CORRELATION_DPI, 4)
        assert image[..., :3].std() > 0.05                           # a picture, not a blank page
        corr = np.load(d / "runs" / rid / "penultimate_correlation.npy")
        assert corr.shape == (512, 512)
    assert (d / "phase_dead_fraction_vs_optim.weight_decay.png").is_file()


def test_missing_cifar_folder_through_the_cli(cli, tmp_path):
    proc = cli("run", "model=resnet18", "data=cifar10", f"data.root={tmp_path / 'no-such-folder'}", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.root is not a folder:") and "no-such-folder" in lines[0]
    assert not (tmp_path / "outputs").exists()


def test_missing_torchvision_is_one_line_before_any_work(cli, tmp_path, monkeypatch, cifar):
    monkeypatch.setitem(sys.modules, "torchvision", None)            # `import torchvision` now fails
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    with pytest.raises(ConfigError, match=r"^model=resnet18 needs torchvision: pip install 'symrun\[vision\]'$"):
        sweep.plan(["model=resnet18", "data=cifar10", f"data.root={cifar}"], tmp_path / "outputs")
    hide = tmp_path / "hide" / "torchvision"                          # the same in a fresh process
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('torchvision is hidden by this test')\n")
    monkeypatch.setenv("PYTHONPATH", str(hide.parent))
    proc = cli("sweep", "model=resnet18", "data=cifar10", f"data.root={cifar}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: model=resnet18 needs torchvision: pip install 'symrun[vision]'"
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------------------------
# data=text


def test_text_windows_vocabulary_and_split(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcab" * 20)                                    # 100 characters, vocabulary abc
    ds = load(TextDataConfig(path=str(path), context=8, stride=4, test_fraction=0.2))
    assert ds.n_classes == 3 and ds.task == "classification"
    assert ds.x.shape == (18, 8) and ds.y.shape == (18, 8)           # starts 0, 4, …, 68 in the first 80
    np.testing.assert_array_equal(ds.y[:, :-1], ds.x[:, 1:])         # targets: the next character
    np.testing.assert_array_equal(ds.x[0], [0, 1, 2, 0, 1, 0, 1, 2])
    assert ds.x_test.shape == (3, 8)                                 # 20 test characters: starts 0, 4, 8
    with pytest.raises(ConfigError, match="data.path does not exist"):
        validate(Config(model=TransformerConfig(), data=TextDataConfig(path=str(tmp_path / "none.txt"))))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt: the text file is empty"):
        load(TextDataConfig(path=str(tmp_path / "empty.txt")))
    with pytest.raises(DataError, match="fewer than data.context"):
        load(TextDataConfig(path=str(path), context=200))


def test_generated_text_is_deterministic_and_grammatical():
    a, b = corpora.grammar_text(3000, 0), corpora.grammar_text(3000, 0)
    assert a == b and len(a) == 3000 and a != corpora.grammar_text(3000, 1)
    words = {w for ws in corpora._WORDS.values() for w in ws} | {"and"}
    tokens = a.replace(",", " ").replace(".", " ").lower().split()[:-1]   # the last word may be cut
    assert set(tokens) <= {w.lower() for w in words}


def test_text_pairs_only_with_the_transformer(tmp_path):
    with pytest.raises(ConfigError, match="model=transformer reads data=text"):
        sweep.plan(["model=mlp", "data=text"], tmp_path, single=True)
    with pytest.raises(ConfigError, match="model=transformer reads data=text"):
        sweep.plan(["model=transformer", "data=digits"], tmp_path, single=True)
    with pytest.raises(ConfigError, match="label_flip is not supported with data=text"):
        sweep.plan(["model=transformer", "data=text", "noise.label_flip=0.1"], tmp_path, single=True)
    with pytest.raises(ConfigError, match="permute characters"):
        sweep.plan(["model=transformer", "data=text", "tasks.count=2"], tmp_path, single=True)
    with pytest.raises(ConfigError, match="model.heads must be >= 1"):
        sweep.plan(["model=transformer", "data=text", "model.heads=0"], tmp_path, single=True)
    with pytest.raises(ConfigError, match="model.key_dim must be >= 1, or null with model.heads dividing"):
        sweep.plan(["model=transformer", "data=text", "model.heads=3"], tmp_path, single=True)


# ---------------------------------------------------------------------------------------------
# model=transformer


def transformer(r=2, layers=2, heads=2, d=8, t=6, v=5, seed=0):
    model = build(TransformerConfig(layers=layers, heads=heads, d_model=d), t, v)
    params = {k: p.detach() for k, p in model.init_params(list(range(seed, seed + r)), CPU, torch.float64).items()}
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, v, (7, t), generator=g).double()
    y = torch.randint(0, v, (7, t), generator=g)
    return model, params, x, y


def test_transformer_is_causal_and_per_run():
    model, params, x, _ = transformer()
    out = model.forward(params, x)
    assert out.shape == (2, 7, 6, 5)
    changed = x.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 5
    out2 = model.forward(params, changed)
    torch.testing.assert_close(out2[..., :4, :], out[..., :4, :])   # earlier positions never see later ones
    assert not torch.allclose(out2[..., 4:, :], out[..., 4:, :])
    per_run = model.forward(params, torch.stack([x, changed]))       # (R, B, T) inputs, one batch per run
    torch.testing.assert_close(per_run[0], out[0])
    torch.testing.assert_close(per_run[1], out2[1])


def test_rotation_mirrors_of_each_head():
    """L(Rθ) = L(θ) for every declared mirror, and Oᵀ∇L = 0 on its constraint set (Un = 0, nᵀW = 0)."""
    model, params, x, y = transformer()
    loss = lambda p: loss_per_run(model.forward(p, x), y, "classification")  # noqa: E731
    n = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    n = n / n.norm()
    syms = model.symmetries()
    assert len(syms) == 4 and all(isinstance(s, Rotation) for s in syms)
    for sym in syms:
        torch.testing.assert_close(loss(apply_mirror(sym, params, n)), loss(params), rtol=1e-12, atol=1e-12)
        project = torch.eye(4, dtype=torch.float64) - torch.outer(n, n)
        on_set = {**params, sym.left: params[sym.left] @ project, sym.right: project @ params[sym.right]}
        on_set = {k: v.clone().requires_grad_() for k, v in on_set.items()}
        g_left, g_right = torch.autograd.grad(loss(on_set).sum(), [on_set[sym.left], on_set[sym.right]])
        assert (g_left @ n).abs().max() < 1e-12 and (n @ g_right).abs().max() < 1e-12


def test_per_head_rank_columns_match_numpy():
    model, params, x, y = transformer()
    with torch.no_grad():
        params["layers.1.query"][:, 1, :, 2:] = 0                          # head 1 of layer 1: rank 2
        m = engine.evaluate(model, params, Config(model=TransformerConfig(), data=TextDataConfig()),
                            "classification", x, y, None, None)
    for l in range(2):
        for h in range(2):
            product = (params[f"layers.{l}.query"][:, h] @ params[f"layers.{l}.key"][:, h]).numpy()
            expected = [np.linalg.matrix_rank(p, tol=1e-3 * np.linalg.norm(p, 2)) for p in product]
            np.testing.assert_array_equal(m[f"rank.layer{l}.head{h}"].numpy(), expected)
            assert (m[f"effective_rank.layer{l}.head{h}"] <= m[f"rank.layer{l}.head{h}"] + 1e-9).all()
    assert m["rank.layer1.head1"].tolist() == [2, 2]
    assert m["rank"].tolist() == pytest.approx([(4 + 4 + 4 + 2) / 4] * 2)
    assert 0 <= m["train_accuracy"].min() and m["train_accuracy"].max() <= 1


def text_run(path, seed=0, **optim):
    cfg = Config(model=TransformerConfig(layers=1, heads=2, d_model=16), data=TextDataConfig(
        path=str(path), context=8, stride=2, batch_size=8), seed=seed)
    cfg.optim.name, cfg.optim.lr, cfg.train.steps, cfg.train.log_every, cfg.train.dtype = "adamw", 0.01, 40, 20, "float64"
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return validate(cfg)


def test_transformer_learns_a_repeated_pattern_and_a_run_does_not_depend_on_its_pack(tmp_path):
    path = tmp_path / "pattern.txt"
    path.write_text("symmetry! " * 60)
    alone = engine.train_pack([text_run(path, seed=1, weight_decay=0.1)])[0]
    losses = [r["train_loss"] for r in alone.rows]
    assert losses[-1] < 0.25 * losses[0]                             # from ≈ ln(8) towards 0
    assert alone.rows[-1]["train_accuracy"] > 0.8
    packed = engine.train_pack([text_run(path, seed=0), text_run(path, seed=1, weight_decay=0.1),
                                text_run(path, seed=2, weight_decay=1.0)])
    assert_same_run(alone, packed[1])


def test_rank_of_query_key_falls_as_weight_decay_rises(tmp_path):
    """AdamW (decoupled decay) on the grammar text: W_Q W_Kᵀ is full rank without decay, loses
    directions under moderate decay and collapses onto its symmetric point W_Q W_Kᵀ = 0 (rank 0:
    every σ ≤ metrics.rank_atol) under strong decay (docs/theory.md §3, rotation symmetry)."""
    path = tmp_path / "grammar.txt"
    path.write_text(corpora.grammar_text(3000, 0))

    def cfg(wd):
        c = Config(model=TransformerConfig(layers=1, heads=2, d_model=16),
                   data=TextDataConfig(path=str(path), context=16, stride=4, batch_size=16))
        c.optim.name, c.optim.lr, c.optim.weight_decay, c.train.steps, c.train.log_every = "adamw", 0.01, wd, 300, 300
        return validate(c)

    outcomes = engine.train_pack([cfg(wd) for wd in (0.0, 1.0, 8.0)])
    ranks = [o.rows[-1]["rank"] for o in outcomes]
    assert ranks[0] == 8 and ranks[-1] == 0
    assert ranks[0] >= ranks[1] >= ranks[2]
    assert outcomes[1].rows[-1]["effective_rank"] < outcomes[0].rows[-1]["effective_rank"]


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.cuda
def test_resnet_on_cuda_gives_the_cpu_numbers(cifar):
    def run(device):
        cfg = Config(model=ResNetConfig(), data=Cifar10DataConfig(root=str(cifar), batch_size=4), device=device)
        cfg.train.steps, cfg.train.log_every, cfg.train.dtype, cfg.optim.lr = 3, 1, "float64", 0.01
        return engine.train_pack([validate(cfg)])[0]

    on_gpu, on_cpu = run("cuda"), run("cpu")
    assert on_gpu.status == on_cpu.status == "finished"
    for rg, rc in zip(on_gpu.rows, on_cpu.rows):
        for key in ("train_loss", "test_loss", "weight_norm", "independent_fraction"):
            assert rg[key] == pytest.approx(rc[key], rel=1e-6, abs=1e-9), key
    np.testing.assert_allclose(on_gpu.arrays["penultimate_correlation"], on_cpu.arrays["penultimate_correlation"],
                               atol=1e-6)


@pytest.mark.cuda
def test_transformer_pack_on_cuda_gives_the_cpu_numbers(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(corpora.grammar_text(1500, 0))

    def run(device):
        cfgs = [text_run(path, seed=s, weight_decay=wd) for s, wd in [(0, 0.0), (1, 0.1)]]
        for c in cfgs:
            c.device = device
        return engine.train_pack(cfgs)

    for g, c in zip(run("cuda"), run("cpu")):
        for rg, rc in zip(g.rows, c.rows):
            for key in rc:
                assert rg[key] == pytest.approx(rc[key], rel=1e-6, abs=1e-9), key
