"""The installed package finds its configs from a wheel, not only from the checkout."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_fake_cifar

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_the_configs_and_composes_every_preset(tmp_path):
    wheel_dir, site, src = tmp_path / "wheel", tmp_path / "site", tmp_path / "src"
    # Build from a copy of the tracked files: the build writes build/ and *.egg-info next to its source.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheel_dir), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheel_dir.glob("symrun-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    probe = (
        "import symrun, symrun.config as c, symrun.sweeping.sweep as s, pathlib, sys\n"
        "import hydra_plugins.symrun_sweeper.symrun_sweeper as plugin\n"
        "assert pathlib.Path(symrun.__file__).is_relative_to(sys.argv[1]), symrun.__file__\n"
        "assert pathlib.Path(plugin.__file__).is_relative_to(sys.argv[1]), plugin.__file__\n"
        "assert c.CONFIG_DIR.is_relative_to(sys.argv[1]), c.CONFIG_DIR\n"
        "names = sorted(p.stem for p in (c.CONFIG_DIR / 'experiment').glob('*.yaml'))\n"
        "assert names, 'no presets in the wheel'\n"
        "for n in names:\n"
        "    extra = [f'data.root={sys.argv[3]}'] if n == 'resnet_cifar' else []   # data a user supplies\n"
        "    for plan in s.plans([f'experiment={n}', *extra], pathlib.Path(sys.argv[2])):   # a suite: several\n"
        "        assert len(plan.configs) > 1\n"
        "print('ok', names)\n"
    )
    # Run from an empty folder with only the wheel's copy on the path: the checkout is not used.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    cifar = write_fake_cifar(tmp_path / "cifar", per_batch=64)
    out = subprocess.run([sys.executable, "-c", probe, str(site), str(tmp_path / "out"), str(cifar)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "rescaling_sparsity" in out.stdout
    # The command, as installed: Hydra finds the sweeper plugin and the configs in the wheel.
    shown = subprocess.run([sys.executable, "-m", "symrun", "sweep", "experiment=rescaling_sparsity", "--plan"],
                           cwd=tmp_path, env={**env, "COLUMNS": "200"}, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "rescaling_sparsity →" in shown.stdout and "96 runs over" in shown.stdout, shown.stdout
    assert not (tmp_path / "outputs").exists()
