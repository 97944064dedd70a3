"""Config tests: every YAML composes and validates, every preset runs, bad input is refused early."""


import pytest

from conftest import write_fake_cifar
from symrun import config
from symrun.sweeping import job, sweep, tables
from symrun.config import CONFIG_DIR, DATA_OPTIONS, MODEL_OPTIONS, ConfigError

PRESETS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def test_default_config_composes_to_the_documented_defaults(tmp_path):
    plan = sweep.plan([], tmp_path, single=True)
    (cfg,) = plan.configs.values()
    assert cfg.model.name == "hadamard" and cfg.data.name == "teacher"
    assert cfg.optim.weight_decay == 0.0 and cfg.data.batch_size is None


def _refusal(model: str, data: str):
    """The one-line error a model/data pair that cannot work together must give, or None."""
    if model == "module":            # a user's nn.Module: tests/test_module.py
        return "model=module needs model._target_"
    if (model == "transformer") != (data == "text"):
        return "model=transformer reads data=text"
    if model == "hadamard" and data == "digits":
        return "single regression target"
    if model == "resnet18":
        return "needs 3-channel square images"
    return None


@pytest.mark.parametrize("model", sorted(MODEL_OPTIONS))
@pytest.mark.parametrize("data", sorted(set(DATA_OPTIONS) - {"file", "cifar10"}))   # those need files: test_data, test_nets
def test_every_model_and_data_option_composes(tmp_path, model, data):
    if (refusal := _refusal(model, data)) is not None:
        with pytest.raises(ConfigError, match=refusal):
            sweep.plan([f"model={model}", f"data={data}"], tmp_path, single=True)
        return
    plan = sweep.plan([f"model={model}", f"data={data}"], tmp_path, single=True)
    (cfg,) = plan.configs.values()
    assert (cfg.model.name, cfg.data.name) == (model, data)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_validates_and_runs_a_few_steps(tmp_path, preset):
    # Presets on data a user supplies run here on a tiny stand-in of it.
    needs = {"resnet_cifar": lambda: [f"data.root={write_fake_cifar(tmp_path / 'cifar')}", "data.batch_size=4",
                                      "optim.weight_decay=0,0.01"]}
    extra = needs[preset]() if preset in needs else []
    # λ_c at the end on 32 examples: exercised for every preset, at a smoke test's cost.
    plans = sweep.plans([f"experiment={preset}", "train.steps=3", "train.log_every=1", "metrics.critical_examples=32",
                         *extra], tmp_path)
    for plan in plans:                     # a suite (symmetry_removal) is one sweep per member preset
        assert len(plan.configs) > 1 and plan.swept, "a preset defines a grid"
        assert all(c.name in (preset, f"{preset}/{plan.sweep_dir.name}") for c in plan.configs.values())
        sweep.write_plan(plan)
        job.run_plan(plan)
        runs, res = tables.write_tables(plan.sweep_dir)
        assert len(runs) == len(plan.configs)
        assert set(runs["status"]) == {"finished"}
        tasks = plan.configs[next(iter(plan.configs))].tasks.count     # a task sequence trains 3 steps per task
        assert set(res["step"]) == set(range(3 * tasks + 1))


def test_preset_grid_and_command_line_combine(tmp_path):
    plan = sweep.plan(["experiment=rescaling_sparsity", "seed=0,1", "optim.weight_decay=0.1,1.0"], tmp_path)
    assert len(plan.configs) == 8          # the command line replaces the preset's axes key by key
    assert sorted({c.noise.label_std for c in plan.configs.values()}) == [0.0, 1.0]    # the preset's own axis stays
    assert sorted({c.optim.weight_decay for c in plan.configs.values()}) == [0.1, 1.0]
    assert set(plan.swept) == {"optim.weight_decay", "noise.label_std", "seed"}
    assert len(plan.packs) == 1            # one shape → one pack


def test_packs_split_by_shape_and_by_pack_size(tmp_path):
    plan = sweep.plan(["model=factorization", "model.hidden=2,4", "seed=range(0,5)", "pack_size=3"], tmp_path)
    sizes = sorted(len(p) for p in plan.packs)
    assert sizes == [2, 2, 3, 3]           # two shapes × ceil(5 / 3) packs each
    for pack in plan.packs:
        assert len({plan.configs[r].model.hidden for r in pack}) == 1


def test_run_ids_are_stable_and_distinct(tmp_path):
    a = sweep.plan(["optim.weight_decay=0.1,0.2", "seed=0,1"], tmp_path)
    b = sweep.plan(["seed=0,1", "optim.weight_decay=0.1,0.2"], tmp_path)
    assert set(a.configs) == set(b.configs) and len(a.configs) == 4
    # execution settings do not change a run's identity
    c = sweep.plan(["optim.weight_decay=0.1", "seed=0", "pack_size=7", "name=other"], tmp_path, single=True)
    assert set(c.configs) <= set(a.configs)


@pytest.mark.parametrize("args, message", [
    (["model.nonsense=1"], "model.nonsense"),
    (["nonsense=1"], "nonsense"),
    (["model=transformerz"], "unknown model option 'transformerz'"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay must be >= 0"),
    (["optim.lr=-1"], "optim.lr must be a positive number"),
    (["optim.lr=abc"], "optim.lr"),
    (["optim.name=rmsprop"], "optim.name"),
    (["model=mlp", "model.activation=sigmoid"], "model.activation"),
    (["data=file"], "data.path"),
    (["data=file", "data.path=/nonexistent/file.npz"], "does not exist"),
    (["seed=range(0,0)"], "grid is empty"),
    (["data.batch_size=100000"], "batch_size"),
    (["model=factorization", "model.residual=true", "model.hidden=3"], "model.residual"),
    (["noise.label_flip=0.1"], "noise.label_flip applies to classification"),
    (["model=mlp", "data=digits", "noise.label_std=0.1"], "noise.label_std applies to regression"),
    (["data.rank=0"], "data.rank"),
    (["noise.temperature=inf"], "noise.temperature"),
    (["metrics.critical_examples=0"], "metrics.critical_examples >= 1"),
    (["pack_size=0"], "pack_size must be >= 1 or null"),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
    with pytest.raises(ConfigError) as err:
        sweep.plan(args, tmp_path)
    assert message in str(err.value)
    assert "\n" not in str(err.value).strip()
    assert not any(tmp_path.iterdir()), "nothing is written before the plan is valid"


def test_cuda_requested_without_cuda_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA device"):
        sweep.plan(["device=cuda"], tmp_path)


@pytest.mark.parametrize("interpolated", [False, True])
def test_runs_set_on_a_copy_equal_a_full_hydra_composition_per_run(tmp_path, interpolated):
    """The planner composes each shape once and sets per-run values on copies (or, in a config with
    interpolations, through OmegaConf): every run must equal Hydra's own composition of its grid
    point, which is what a launcher's job composes."""
    from symrun.sweeping.composition import composer, drop_hydra
    from symrun.config import to_config

    args = ["experiment=rescaling_sparsity", "model=hadamard,factorization", "++optim.momentum=0.5",
            "optim.weight_decay=0.1,1", "seed=range(0,2)", "noise.label_std=0.5", "optim.lr='0.25'"]
    if interpolated:        # a preset of the user's whose values read per-run ones
        (tmp_path / "cfg" / "experiment").mkdir(parents=True)
        (tmp_path / "cfg" / "experiment" / "linked.yaml").write_text(
            "# @package _global_\ndefaults:\n  - rescaling_sparsity\nnoise:\n  temperature: ${optim.weight_decay}\n")
        args = [f"hydra.searchpath=[file://{tmp_path / 'cfg'}]", "experiment=linked", *args[1:]]
    plan = sweep.plan(args, tmp_path / "out")
    assert len(plan.configs) == 8 and not (tmp_path / "out").exists()
    with composer(args) as comp:
        for rid, cfg in plan.configs.items():
            assert cfg == to_config(drop_hydra(comp.compose([s.text for s in plan.settings[rid]]))), rid
    assert {c.optim.weight_decay for c in plan.configs.values()} == {0.1, 1.0}      # 1 → 1.0, as OmegaConf converts
    assert {c.optim.lr for c in plan.configs.values()} == {0.25}
    if interpolated:
        assert all(c.noise.temperature == c.optim.weight_decay for c in plan.configs.values())


def test_a_config_saved_with_model_offset_std_still_loads():
    """Run folders written before symmetry removal moved to symmetry.* stay readable."""
    from symrun.config import to_config

    old = {"model": {"name": "hadamard", "init_scale": 1.0, "offset_std": 0.3}, "data": {"name": "teacher"}}
    cfg = to_config(old)
    assert cfg.symmetry.remove is True and cfg.symmetry.remove_std == 0.3
    plain = to_config({"model": {"name": "hadamard", "offset_std": 0.0}, "data": {"name": "teacher"}})
    assert plain.symmetry.remove is False


def test_to_dict_is_dataclasses_asdict():
    import dataclasses

    from symrun.config import Config, DigitsDataConfig, EnsembleConfig, TeacherDataConfig, TextDataConfig, TransformerConfig

    for model, data in ((EnsembleConfig(), TeacherDataConfig(teacher="mlp")), (TransformerConfig(), TextDataConfig()),
                        (EnsembleConfig(members=3), DigitsDataConfig())):
        cfg = Config(model=model, data=data)
        cfg.constraint.params = ["layers.0.weight", "layers.1.bias"]
        out = config.to_dict(cfg)
        assert out == dataclasses.asdict(cfg) and isinstance(out["optim"]["betas"], type(cfg.optim.betas))
        out["constraint"]["params"].append("x")                     # a copy, not the config's own list
        assert cfg.constraint.params == ["layers.0.weight", "layers.1.bias"]


def _configs_to_flatten():
    from symrun.config import Config, DigitsDataConfig
    from symrun.models.module import ModuleConfig

    for model in MODEL_OPTIONS.values():
        for data in DATA_OPTIONS.values():
            yield Config(model=model(), data=data())
    yield Config(model=ModuleConfig(target="pkg.Net", args={"hidden": {"width": 4.0}, "sizes": [1, 2]},
                                    mirrors=[{"kind": "sign"}]), data=DigitsDataConfig())


def test_flattened_is_flatten_of_to_dict():
    """Run ids and pack keys hash config.flattened: it must be flatten(to_dict(cfg)), key for key, in order."""
    for cfg in _configs_to_flatten():
        expected = config.flatten(config.to_dict(cfg))
        assert config.flattened(cfg) == expected and list(config.flattened(cfg)) == list(expected)


def test_run_ids_do_not_change_between_versions():
    """A folder swept by an earlier version resumes only if its runs keep their ids."""
    from symrun.config import Config, DigitsDataConfig, HadamardConfig, MLPConfig, TeacherDataConfig
    from symrun.models.module import ModuleConfig
    from symrun.sweeping import results

    mlp = Config(model=MLPConfig(width=7), data=DigitsDataConfig(), seed=3)
    mlp.optim.betas, mlp.optim.weight_decay = [0.5, 0.6], 0.01
    module = Config(model=ModuleConfig(target="pkg.Net", args={"hidden": {"width": 4.0}, "sizes": [1, 2]}, mirrors=[]),
                    data=DigitsDataConfig())
    assert results.run_id(Config(model=HadamardConfig(), data=TeacherDataConfig())) == "hadamard-s0-8d48105de6"
    assert results.run_id(mlp) == "mlp-s3-1db0ee24e0"
    assert results.run_id(module) == "module-s0-4ec8dc46ad"
