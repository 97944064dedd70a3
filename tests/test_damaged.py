"""Damaged run files: `status`, `collect`, `report` and a resumed sweep name each one in a line
that says what to do, never with a traceback, and never replace a finished run's files."""

import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import trained_sweep
from symrun import cli as cli_mod
from symrun.sweeping import records, results

GRID = ["optim.weight_decay=0,0.5", "train.steps=6", "train.log_every=3"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return trained_sweep(GRID, tmp_path_factory.mktemp("finished"))


def _truncate_at_line(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))


DAMAGE = {   # file → (how it is damaged, what the line says)
    "status.json empty": ("status.json", lambda p: p.write_text(""), "is damaged (empty)"),
    "status.json null": ("status.json", lambda p: p.write_text("null"), "is damaged (it holds null, not a run's status)"),
    "status.json a list": ("status.json", lambda p: p.write_text("[]"), "is damaged (it holds a list"),
    "status.json a string": ("status.json", lambda p: p.write_text('"abc"'), "is damaged (it holds a string"),
    "status.json without run_id": ("status.json", lambda p: p.write_text('{"status": "finished"}'),
                                   "is damaged (no run_id)"),
    "status.json garbage": ("status.json", lambda p: p.write_bytes(b"\x00\xff{"), "is damaged (not valid JSON)"),
    "metrics.csv empty": ("metrics.csv", lambda p: p.write_text(""), "is damaged (empty)"),
    "metrics.csv garbage": ("metrics.csv", lambda p: p.write_text("no,table\nhere\n"), "is damaged"),
    "metrics.csv cut mid-line": ("metrics.csv", lambda p: p.write_text(p.read_text()[:-7]),
                                 "is damaged (its last line is cut short)"),
    "metrics.csv cut at a line": ("metrics.csv", _truncate_at_line,
                                  "is damaged (its rows do not end with the final row status.json records)"),
    "config.yaml garbage": ("config.yaml", lambda p: p.write_text("model: [\n"), "is damaged (not valid YAML)"),
    "config.yaml missing": ("config.yaml", lambda p: p.unlink(), "is damaged (missing)"),
    "config.yaml of an unknown model": ("config.yaml", lambda p: p.write_text(p.read_text().replace(
        "name: hadamard", "name: bogus")), "is damaged (unknown model 'bogus'"),
    "config.yaml with a value of the wrong type": ("config.yaml", lambda p: p.write_text(re.sub(
        r"weight_decay: .*", "weight_decay: abc", p.read_text())), "is damaged (optim.weight_decay: 'abc' is not a"),
}


def _invoke(*args):
    result = CliRunner().invoke(cli_mod.app, list(args))
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception, SystemExit)), \
        result.output
    return result


def _tree(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_a_damaged_file_is_named_in_one_line_by_status_collect_report_and_a_resume(finished, tmp_path, monkeypatch,
                                                                                  case):
    name, damage, words = DAMAGE[case]
    d = tmp_path / "sweep"
    shutil.copytree(finished, d)
    rid = sorted(p.name for p in (d / "runs").iterdir())[0]
    damage(d / "runs" / rid / name)
    path = str(d / "runs" / rid / name)
    assert records.read_run(d, rid, metrics=True).status == "damaged"
    monkeypatch.chdir(tmp_path)

    status = _invoke("status", str(d))
    assert status.exit_code == 0 and "1 damaged" in status.stdout and f"{path} {words}" in status.stdout.replace("\n", " ")
    for command in ("collect", "report"):
        result = _invoke(command, str(d))
        warned = [ln for ln in result.stderr.splitlines() if "damaged" in ln]
        assert result.exit_code == 0 and len(warned) == 1, result.stderr
        assert path in warned[0] and words in warned[0] and f"delete the folder {d / 'runs' / rid}" in warned[0]
    runs = results.read_csv(d / "runs.csv").set_index("run_id")
    assert runs.loc[rid, "status"] == "damaged" and words in runs.loc[rid, "error"]

    # A resume never replaces a finished run's files: a run whose status.json is unreadable may be a
    # finished one, so the sweep is refused; other damage is skipped and named at the end.
    before = _tree(d / "runs" / rid)
    resumed = _invoke("sweep", *GRID, f"hydra.sweep.dir={d}")
    if name == "status.json":
        lines = [ln for ln in resumed.stderr.splitlines() if ln.strip()]
        assert resumed.exit_code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {path} {words}"), resumed.stderr
    else:
        assert resumed.exit_code == 0 and "2 already finished" in resumed.stdout
        assert any(path in ln and words in ln for ln in resumed.stderr.splitlines()), resumed.stderr
    assert _tree(d / "runs" / rid) == before


@pytest.mark.parametrize("text", ["{ not json", '{"swept": ["step"]}', '{"swept": [["a"]]}', '{"swept": [], "launches": 5}'])
def test_a_damaged_sweep_json_is_named_and_a_resume_refused(finished, tmp_path, monkeypatch, text):
    d = tmp_path / "sweep"
    shutil.copytree(finished, d)
    (d / "sweep.json").write_text(text)
    monkeypatch.chdir(tmp_path)
    result = _invoke("report", str(d))
    assert result.exit_code == 0 and f"{d / 'sweep.json'} is damaged" in result.stderr.replace("\n", " ")
    resumed = _invoke("sweep", *GRID, f"hydra.sweep.dir={d}")
    assert resumed.exit_code == 2 and "sweep.json is damaged: restore it, or delete it" in resumed.stderr
    assert (d / "sweep.json").read_text() == text


@pytest.mark.parametrize("text", ['{"grid": 5, "packs": 7}', '{"grid": [1], "packs": [1]}'])
def test_a_damaged_plan_json_is_left_out(finished, tmp_path, monkeypatch, text):
    d = tmp_path / "sweep"
    shutil.copytree(finished, d)
    (d / "launches" / "0" / "plan.json").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert _invoke("collect", str(d)).exit_code == 0
    runs = results.read_csv(d / "runs.csv")
    assert sorted(runs["run_id"]) == results.run_ids(d) and (runs["status"] == "finished").all()
    assert _invoke("sweep", *GRID, f"hydra.sweep.dir={d}").exit_code == 0      # every run finished: nothing to train
