"""The CUDA path (skipped cleanly without a GPU): same numbers as the CPU, runs independent of packs."""

import json

import pytest
import torch

from conftest import sweep_dirs
from symrun.training import engine
from symrun.config import Config, DigitsDataConfig, HadamardConfig, MLPConfig, TeacherDataConfig, validate

pytestmark = pytest.mark.cuda


def _cfg(model, data, device, seed=0, **kw):
    c = Config(model=model, data=data, device=device, seed=seed)
    c.train.steps, c.train.log_every, c.train.dtype = 60, 20, "float64"
    for key, value in kw.items():
        section, name = key.split("__")
        setattr(getattr(c, section), name, value)
    return validate(c)


@pytest.mark.parametrize("model, data", [
    (HadamardConfig(), TeacherDataConfig()),
    (MLPConfig(width=16), DigitsDataConfig(batch_size=32)),   # minibatch order is drawn on the CPU
])
def test_a_pack_on_cuda_gives_the_cpu_numbers(model, data):
    def pack(device):
        return [_cfg(model, data, device, seed=s, optim__weight_decay=wd, optim__lr=lr)
                for s, wd, lr in [(0, 0.0, 0.05), (1, 1e-3, 0.1), (2, 1e-2, 0.02)]]

    on_gpu, on_cpu = engine.train_pack(pack("cuda")), engine.train_pack(pack("cpu"))
    for g, c in zip(on_gpu, on_cpu):
        assert g.status == c.status == "finished"
        for rg, rc in zip(g.rows, c.rows):
            for key in rc:
                assert rg[key] == pytest.approx(rc[key], rel=1e-6, abs=1e-9), key


def test_on_cuda_a_run_does_not_depend_on_its_pack():
    def cfg(seed, flip, temp):
        return _cfg(MLPConfig(width=16), DigitsDataConfig(batch_size=32), "cuda", seed=seed,
                    noise__label_flip=flip, noise__temperature=temp)

    alone = engine.train_pack([cfg(3, 0.2, 1e-6)])[0]
    packed = engine.train_pack([cfg(s, 0.1 * (s % 3), 1e-6 * (s % 2)) for s in range(8)] + [cfg(3, 0.2, 1e-6)])[-1]
    for ra, rp in zip(alone.rows, packed.rows):
        for key in ra:
            assert rp[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), key


def test_auto_device_is_cuda_and_the_cli_records_it(cli, tmp_path):
    assert engine.resolve_device("auto").type == "cuda"
    cli("sweep", "model=mlp", "data=digits", "data.batch_size=64", "seed=0,1", "train.steps=10",
        "train.log_every=5", "device=cuda")
    (d,) = sweep_dirs(tmp_path / "outputs")
    statuses = [json.loads(p.read_text()) for p in d.glob("runs/*/status.json")]
    assert len(statuses) == 2
    assert all(s["status"] == "finished" and s["device"].startswith("cuda") for s in statuses)
    assert torch.cuda.is_available()
