"""The fast paths of reading a sweep back give exactly what the plain paths give: metrics.csv files
parsed together, and config.yaml files this process wrote taken from memory."""

import io
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import write_fake_cifar
from symrun.sweeping import job, records, results, sweep
from symrun.config import CONFIG_DIR

GRID = ["optim.weight_decay=0,0.1,0.5", "seed=0,1", "train.steps=6", "train.log_every=3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    plan = sweep.plan([*GRID, "model.init_scale=1,1e30"], tmp_path_factory.mktemp("trained"))
    sweep.write_plan(plan)
    job.run_plan(plan)
    return plan.sweep_dir


def _damage(sweep_dir: Path) -> None:
    """A run each of: a cut metrics.csv, a garbage one, one with a blank line, one with a quoted
    cell, one cut mid-line, one whose header differs, one missing."""
    edits = [
        lambda t: "".join(t.splitlines(keepends=True)[:-1]),
        lambda t: "no,table\nhere\n",
        lambda t: t.replace("\n", "\n\n", 1),
        lambda t: t.replace("step", '"step"', 1),
        lambda t: t[:-7],
        lambda t: t.replace("step,", "step,extra,", 1),
        None,
    ]
    for rid, edit in zip(results.run_ids(sweep_dir), edits):
        path = results.run_dir(sweep_dir, rid) / "metrics.csv"
        if edit is None:
            path.unlink()
        else:
            path.write_text(edit(path.read_text()))


def _as_text(record: records.RunRecord) -> tuple:
    metrics = None if record.metrics is None else record.metrics.to_csv(index=False)
    return record.run_id, record.status, record.problem, metrics, repr(record.info), repr(record.config)


def test_runs_read_together_are_the_runs_read_one_by_one(trained, tmp_path):
    states = {records.read_run(trained, r).status for r in results.run_ids(trained)}
    assert states == {results.FINISHED, results.DIVERGED}        # a diverged run's metrics end early
    ids = results.run_ids(trained)
    assert [_as_text(r) for r in records.read_runs(trained, ids)] == \
        [_as_text(records.read_run(trained, r, metrics=True)) for r in ids]

    damaged = tmp_path / "damaged"
    shutil.copytree(trained, damaged)
    _damage(damaged)
    together = records.read_runs(damaged, ids)
    assert [_as_text(r) for r in together] == [_as_text(records.read_run(damaged, r, metrics=True)) for r in ids]
    assert sum(r.status == results.DAMAGED for r in together) >= 4      # cut, garbage, cut mid-line, missing


def test_a_field_too_many_in_the_first_file_of_a_header_damages_that_run_only(trained, tmp_path):
    """pandas takes a first data row with one field more than the header for an index column:
    read together, every run's rows would shift and be split by step instead of by run."""
    damaged = tmp_path / "extra"
    shutil.copytree(trained, damaged)
    ids = results.run_ids(damaged)
    first = next(r for r in ids if records.read_run(damaged, r).status == results.FINISHED)
    path = results.run_dir(damaged, first) / "metrics.csv"
    head, *rows = path.read_text().splitlines()
    path.write_text("\n".join([head, *(row + ",9" for row in rows)]) + "\n")
    together = records.read_runs(damaged, ids)
    assert [_as_text(r) for r in together] == [_as_text(records.read_run(damaged, r, metrics=True)) for r in ids]
    assert [r.run_id for r in together if r.status == results.DAMAGED] == [first]


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_a_config_written_here_reads_back_as_its_file_parses(preset, tmp_path):
    extra = [f"data.root={write_fake_cifar(tmp_path / 'cifar')}", "data.batch_size=4"] if preset == "resnet_cifar" else []
    plans = sweep.plans([f"experiment={preset}", *extra], tmp_path)
    for p in plans:
        for rid, cfg in list(p.configs.items())[:3]:
            results.save_config(tmp_path, rid, cfg)
            path = results.run_dir(tmp_path, rid) / "config.yaml"
            raw = path.read_bytes()
            remembered, parsed = results.parse_config(path, raw), yaml.load(raw, Loader=results.YAML_LOADER)
            assert remembered is results.WRITTEN_CONFIGS[os.path.abspath(path)][1]
            assert repr(remembered) == repr(parsed)                     # the same values of the same types
            path.write_bytes(raw.replace(b"seed: ", b"seed:  "))        # the same YAML, other bytes: parsed
            assert results.parse_config(path, path.read_bytes()) is not remembered


def test_metric_rows_written_fast_read_back_as_pandas_writes_them():
    import numpy as np
    import pandas as pd

    rows = [{"step": 0, "loss": 0.1, "rank": 3, "flag": True, "note": "a,b", "tiny": 1e-300, "gone": None},
            {"step": 5, "loss": float("nan"), "rank": 2.5, "flag": False, "note": 'say "x"', "tiny": -0.0,
             "gone": float("inf"), "late": np.float64(1 / 3)},
            {"step": 10, "loss": 1e-05, "rank": 4, "flag": None, "note": "", "tiny": 2 ** -1074, "late": 7}]
    for these in (rows, rows[:1], rows[2:], []):
        ours = results.read_csv(io.StringIO(results.csv_text(these)))
        theirs = results.read_csv(io.StringIO((pd.DataFrame(these) if these else pd.DataFrame(columns=["step"]))
                                              .to_csv(index=False)))
        pd.testing.assert_frame_equal(ours, theirs)
        assert ours.to_csv(index=False) == theirs.to_csv(index=False)


@pytest.mark.parametrize("preset", ["rescaling_sparsity", "plasticity", "dcs", "rotation_noise"])
def test_config_yaml_from_its_shape_is_the_yaml_dump(preset, tmp_path):
    from symrun.config import to_dict

    values = [0, 1, -1, 0.0, -0.0, 0.1, 1e-05, 1e300, 3.0e-200, float("inf"), float("-inf"), True, None, 12345678901]
    for p in sweep.plans([f"experiment={preset}"], tmp_path):
        for cfg in list(p.configs.values())[:4]:
            tree = to_dict(cfg)
            assert results.config_yaml(tree) == yaml.dump(tree, Dumper=results.YAML_DUMPER, sort_keys=False)
            for i, value in enumerate(values):                  # any number in any per-run slot
                tree["seed"], tree["optim"]["weight_decay"] = values[-1 - i], value
                assert results.config_yaml(tree) == yaml.dump(tree, Dumper=results.YAML_DUMPER, sort_keys=False)
            for word in ["cosine", "0.1", "yes", "null", "a:b", "#x", "-", "'q'", "x" * 40, "é", "~"]:   # quoted or not
                tree["optim"]["schedule"] = word
                assert results.config_yaml(tree) == yaml.dump(tree, Dumper=results.YAML_DUMPER, sort_keys=False)
            tree["optim"]["schedule"] = "two words"             # not a short word: dumped whole
            assert "schedule: two words" in results.config_yaml(tree)


@pytest.mark.parametrize("preset", ["rescaling_sparsity", "dcs"])
def test_config_yaml_dumps_a_shape_once_not_each_run(preset, tmp_path, monkeypatch):
    """Every per-run slot (13 of them: slot 1 must not read as the start of slot 10) is filled
    from the shape's template: after a shape's first run, no run's whole config goes through
    yaml.dump."""
    from symrun.config import to_dict

    whole = []
    dump = yaml.dump
    monkeypatch.setattr(yaml, "dump", lambda data, *a, **k: (whole.append(data) if isinstance(data, dict) else None,
                                                           dump(data, *a, **k))[1])
    configs = [cfg for p in sweep.plans([f"experiment={preset}"], tmp_path) for cfg in p.configs.values()]
    trees = [to_dict(cfg) for cfg in configs]
    for tree in trees:
        results.config_yaml(tree)
    shapes = {repr(results._with_slots(t)[0]) for t in trees}
    assert results._with_slots(trees[0])[1] is not None and len(results._with_slots(trees[0])[1]) > 10
    assert len(whole) <= len(shapes) < len(trees)


@pytest.mark.parametrize("preset", ["rescaling_sparsity", "plasticity", "dcs", "rotation_noise"])
def test_a_config_checked_by_its_shape_reads_as_checked_whole(preset, tmp_path, monkeypatch):
    """records reads a config.yaml of a known shape (one this process wrote, or one matching a
    shape read before) from the shape's checks and its per-run values: the same flat config, or
    the same problem, as the file parsed and checked whole, in a new process or this one."""
    from symrun.config import to_dict
    from symrun.sweeping import folder, records

    configs = [cfg for p in sweep.plans([f"experiment={preset}"], tmp_path / "plan") for cfg in list(p.configs.values())[:3]]
    rids = []
    for i, cfg in enumerate(configs):
        rid = f"r{i}"
        results.save_config(tmp_path, rid, cfg)            # written here: known by its bytes
        rids.append(rid)
        tree = to_dict(cfg)
        for j, (seed, wd) in enumerate([(7, 0.5), ("abc", 0.1), (1.5, 0.1), (None, 0.1), (3, "yes"), (3, None),
                                        (3, float("nan")), (-0.0, 1e300), (True, 0)]):
            tree["seed"], tree["optim"]["weight_decay"] = seed, wd
            path = results.run_dir(tmp_path, f"r{i}-{j}") / "config.yaml"
            path.parent.mkdir(parents=True)
            path.write_text(results.config_yaml(tree))
            rids.append(f"r{i}-{j}")
    damaged = results.run_dir(tmp_path, "r0-0") / "config.yaml"
    damaged.write_text(damaged.read_text().replace("  name: ", "  name: x", 1))     # the shape itself fails a check
    (results.run_dir(tmp_path, "r1") / "config.yaml").write_text("seed: 1\n")

    def read_all():
        out = []
        for rid in rids:
            with folder.opened(results.run_dir(tmp_path, rid), tmp_path, create=False) as run:
                out.append(records._read_config(run))
        return out

    by_shape, real, checked = [], results.read_shaped, records._shape_checked
    for fresh in (False, True):                    # this process, then as a new one reads them
        if fresh:
            monkeypatch.setattr(results, "WRITTEN_CONFIGS", {})
        monkeypatch.setattr(results, "_SHAPES", [])
        monkeypatch.setattr(records, "_SHAPE_CHECKS", {})
        taken = []

        def counted(*args):
            got = checked(*args)
            taken.append(got is not None)
            return got
        monkeypatch.setattr(records, "_shape_checked", counted)
        monkeypatch.setattr(results, "read_shaped", real)
        fast = read_all()
        monkeypatch.setattr(results, "read_shaped", lambda path, raw: None)
        assert fast == read_all()
        by_shape.append(sum(taken))
    assert min(by_shape) >= 2 * len(configs)       # most sound files went by their shape, in both passes
    problems = [problem for _, problem in fast if problem]
    assert any("seed: 'abc' is not a value of its type" in p for p in problems)
    assert any("unknown model" in p for p in problems) and any("no model and data sections" in p for p in problems)


@pytest.mark.parametrize("preset", ["rescaling_sparsity", "plasticity", "dcs", "rotation_noise"])
def test_a_config_read_by_its_shape_is_what_yaml_parses(preset, tmp_path, monkeypatch):
    """A new process reads a sweep's config.yaml files by matching them against the shape of one
    parsed before (results._read_yaml): every value, of every type, is the one yaml.load gives,
    and a file that differs anywhere outside the per-run values is parsed whole."""
    from symrun.config import to_dict

    monkeypatch.setattr(results, "_SHAPES", [])
    monkeypatch.setattr(results, "_VALUES", {})
    whole = []
    load = yaml.load
    monkeypatch.setattr(yaml, "load", lambda raw, *a, **k: (whole.append(raw) if isinstance(raw, bytes) and len(raw) > 60 else None,
                                                                 load(raw, *a, **k))[1])
    values = [0, 1, -1, 0.0, -0.0, 0.1, 1e-05, 1e300, float("inf"), float("-inf"), float("nan"), True, False, None, 12345678901]
    words = ["cosine", "0.1", "yes", "null", "a:b", "#x", "-", "'q'", "x" * 40, "é", "~", "two words"]
    numbers, others = [], []
    configs = [cfg for p in sweep.plans([f"experiment={preset}"], tmp_path) for cfg in list(p.configs.values())[:3]]
    for cfg in configs:
        tree = to_dict(cfg)
        numbers.append(results.config_yaml(tree))
        for i, value in enumerate(values):
            tree["seed"], tree["optim"]["weight_decay"], tree["noise"]["temperature"] = values[-1 - i], value, values[i - 3]
            numbers.append(results.config_yaml(tree))
        for word in words:                                  # quoted, non-ASCII or two words: parsed whole
            tree["optim"]["schedule"] = word
            others.append(results.config_yaml(tree))
    edited = [numbers[0].replace("seed: ", "seed:  "), numbers[0].replace("\n", "\n\n", 1), numbers[1] + "extra: 1\n"]
    edited += [re.sub(r"\nseed: [^\n]*", "\nseed: " + text, numbers[1]) for text in
               ["-", "---", "...", "-1", "+.5", ".inf", "-.Inf", ".NaN", "0x1F", "1_000", "1e5", "Yes", "off", "~", "-x"]]
    texts = numbers + others + edited
    def read(how, raw):
        try:
            return repr(how(raw))                           # the same values of the same types
        except yaml.YAMLError as e:
            return type(e).__name__                         # or the same error

    for k, text in enumerate(texts):
        raw = text.encode()
        assert read(results._read_yaml, raw) == read(lambda r: load(r, Loader=results.YAML_LOADER), raw)
        if k == len(numbers) - 1:           # every number went by its shape: one file per shape parsed whole
            assert 0 < len(whole) <= len({repr(results._with_slots(to_dict(c))[0]) for c in configs})
    with pytest.raises(yaml.YAMLError):
        results._read_yaml(numbers[0].replace("seed: ", "seed: [").encode())
