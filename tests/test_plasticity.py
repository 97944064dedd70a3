"""Task sequences (loss of plasticity): the task data, the shrink-and-perturb remedy, per-task rows
and figures, and that a run's numbers still do not depend on its pack."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from symrun import data
from symrun.training import engine
from symrun.analysis import metrics
from symrun.config import Config, DigitsDataConfig, MLPConfig, TeacherDataConfig, validate
from symrun.models import build
from symrun.seeds import derive_seed
from conftest import assert_same_run, sweep_dirs

CPU = torch.device("cpu")


def make(*, seed=0, wd=0.0, shrink=1.0, perturb=0.0, count=3, steps=20, change="labels") -> Config:
    c = Config(model=MLPConfig(width=16, depth=1, activation="relu"), data=DigitsDataConfig(batch_size=32),
               seed=seed, device="cpu")
    c.optim.lr, c.optim.weight_decay = 0.1, wd
    c.train.steps, c.train.log_every, c.train.dtype = steps, 10, "float64"
    c.tasks.count, c.tasks.change, c.tasks.shrink, c.tasks.perturb = count, change, shrink, perturb
    return validate(c)


def test_task_zero_is_the_data_and_later_tasks_permute_pixels_or_labels():
    ds = data.load(DigitsDataConfig())
    assert data.for_task(ds, "pixels", 0, 0) is ds
    t1, t2 = data.for_task(ds, "pixels", 0, 1), data.for_task(ds, "pixels", 0, 2)
    perm = [int(np.flatnonzero((ds.x == t1.x[:, [j]]).all(0))[0]) if (ds.x == t1.x[:, [j]]).all(0).any() else -1
            for j in range(ds.in_dim)]
    assert -1 not in perm                                      # every task-1 column is a column of the data
    np.testing.assert_array_equal(t1.x_test, ds.x_test[:, perm])  # the same permutation on the test set
    np.testing.assert_array_equal(t1.y, ds.y)
    assert not np.array_equal(t1.x, t2.x)                      # a fresh permutation per task
    np.testing.assert_array_equal(data.for_task(ds, "pixels", 0, 1).x, t1.x)   # deterministic in (seed, k)
    lab = data.for_task(ds, "labels", 0, 1)
    np.testing.assert_array_equal(lab.x, ds.x)
    mapping = {int(a): int(b) for a, b in zip(ds.y, lab.y)}
    assert sorted(mapping) == sorted(mapping.values()) == list(range(10))      # a bijection of classes
    assert all(mapping[int(a)] == int(b) for a, b in zip(ds.y_test, lab.y_test))
    with pytest.raises(data.DataError, match="classification"):
        data.for_task(data.load(TeacherDataConfig()), "labels", 0, 1)


def test_shrink_and_perturb_is_the_formula_and_identity_when_off():
    cfgs = [make(seed=0, shrink=0.5, perturb=0.2), make(seed=1), make(seed=2, shrink=0.5, perturb=0.2)]
    model = build(cfgs[0].model, 64, 10)
    params = model.init_params([c.seed for c in cfgs], CPU, torch.float64)
    before = {k: v.detach().clone() for k, v in params.items()}
    alive = torch.tensor([True, True, False])                  # run 2 diverged: left alone
    engine.shrink_and_perturb(model, params, cfgs, 1, alive)
    fresh = model.init_params([derive_seed(0, "perturb-1")], CPU, torch.float64)
    for k in params:
        torch.testing.assert_close(params[k][0], 0.5 * before[k][0] + 0.2 * fresh[k][0].detach())
        assert torch.equal(params[k][1], before[k][1]) and torch.equal(params[k][2], before[k][2])


def test_a_run_through_a_task_sequence_does_not_depend_on_its_pack():
    solo = engine.train_pack([make(seed=1, wd=1e-3, shrink=0.8, perturb=0.1)])[0]
    pack = engine.train_pack([make(seed=0), make(seed=1, wd=1e-3, shrink=0.8, perturb=0.1), make(seed=2, wd=1e-2)])
    assert_same_run(solo, pack[1])
    # one row per task end (steps 20, 40, 60) and log step, each with its task index
    tasks = {r["step"]: r["task"] for r in solo.rows}
    assert tasks[0] == 0 and tasks[20] == 0 and tasks[30] == 1 and tasks[40] == 1 and tasks[60] == 2


def test_remedies_change_the_run_only_at_task_switches():
    plain, remedied = engine.train_pack([make(seed=0), make(seed=0, shrink=0.5, perturb=0.3)])
    for a, b in zip(plain.rows, remedied.rows):
        if a["step"] <= 20:                                    # task 0: the same run (to rounding)
            for k in a:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-9, atol=1e-12, err_msg=k)
    assert abs(plain.rows[-1]["weight_norm"] - remedied.rows[-1]["weight_norm"]) > 0.1


def test_dead_units_by_hand():
    h = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]], [[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]])   # (R=2, B=2, n=3)
    np.testing.assert_allclose(metrics.dead_units(h, 0.0).numpy(), [1 / 3, 2 / 3])
    np.testing.assert_allclose(metrics.dead_units(h, 0.6).numpy(), [1 / 3, 1.0])


@pytest.mark.slow
def test_per_task_rows_and_figures_through_the_cli(cli, tmp_path):
    cli("sweep", "model=mlp", "model.activation=relu", "model.width=16", "data=digits", "data.batch_size=32",
        "tasks.count=3", "train.steps=10", "train.log_every=100", "optim.weight_decay=0,1e-3", "seed=0,1")
    (sweep,) = sweep_dirs(tmp_path / "outputs")
    table = pd.read_csv(sweep / "results.csv")
    for _, rows in table.groupby("run_id"):
        assert rows[["step", "task"]].values.tolist() == [[0, 0], [10, 0], [20, 1], [30, 2]]
    assert {"dead_units", "feature_effective_rank", "accuracy"} <= set(table.columns)
    import matplotlib.image
    for metric in ("accuracy", "dead_units"):
        image = matplotlib.image.imread(sweep / f"tasks_{metric}.png")
        assert image.ndim == 3 and image.shape[0] > 100


def test_labels_change_needs_classification(cli, tmp_path):
    proc = cli("sweep", "data=teacher", "tasks.count=2", "tasks.change=labels", "train.steps=2", check=False)
    assert proc.returncode == 2 and "needs a classification task" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()
