"""`symrun check`: declared mirrors hold on every model, undeclared candidates are classified
correctly (a neuron sign flip fails with ReLU/GELU and holds with tanh), a broken declaration is
caught with a non-zero exit, and the command's table, --json and errors through the real CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from symrun.analysis import check
from symrun.sweeping import sweep
from symrun.models.nets.mlp import MLP
from symrun.cli import app
from symrun.analysis.symmetries import SignFlip

SMALL = ["data.n=40", "data.dim=8"]


def verdicts(overrides: list[str]) -> dict[tuple[str, bool], bool]:
    report = check.run(sweep.compose_one(overrides + SMALL), mirrors=4)
    return {(c.symmetry, c.declared): c.holds for c in report.checks}


@pytest.mark.parametrize("overrides", [
    ["model=hadamard"], ["model=factorization"], ["model=mlp", "model.depth=2", "model.width=5"],
    ["model=ensemble", "model.width=3", "model.members=3"], ["model=attention", "model.tokens=2"],
    ["model=linear", "constraint=dcs", "constraint.kind=sum_zero", "constraint.params=[w]"],
    ["model=mlp", "model.width=4", "constraint=dcs", "constraint.kind=sum_zero", "constraint.params=[layers.0.weight]"],
    ["model=hadamard", "constraint=dcs", "constraint.kind=group", "constraint.params=[u]"],
    ["model=factorization", "constraint=dcs", "constraint.kind=sparse", "constraint.params=[U]", "optim.weight_decay=0.1"],
], ids=lambda o: " ".join(o))
def test_every_declared_mirror_holds(overrides):
    report = check.run(sweep.compose_one(overrides + SMALL), mirrors=4)
    declared = [c for c in report.checks if c.declared]
    assert declared and report.ok
    for c in declared:
        assert c.invariance <= check.TOLERANCE and c.gradient <= check.TOLERANCE and c.hessian <= check.TOLERANCE


@pytest.mark.parametrize("activation, holds", [("relu", False), ("gelu", False), ("tanh", True)])
def test_neuron_sign_flips_hold_only_for_an_odd_activation(activation, holds):
    got = verdicts(["model=mlp", f"model.activation={activation}", "model.width=4"])
    assert got[("swap layer0", True)] is True                    # permutation mirrors: declared for all
    if holds:
        assert got[("flip layer0", True)] is True           # declared, and checked
    else:
        assert got == {("swap layer0", True): True, ("flip layer0", False): False}


def test_candidates_that_are_not_symmetries_fail():
    assert verdicts(["model=hadamard"])[("swap coef", False)] is False
    assert verdicts(["model=factorization", "model.residual=true", "model.hidden=8"]) == {("rotate U·W", False): False}
    # symmetry removal: the model's own mirrors become candidates, and fail
    removed = verdicts(["model=mlp", "model.width=4", "symmetry.remove=true"])
    assert removed == {("swap layer0", False): False, ("flip layer0", False): False}


def broken_declaration(monkeypatch):
    """A ReLU MLP that wrongly declares neuron sign flips."""
    real = MLP.symmetries
    monkeypatch.setattr(MLP, "symmetries", lambda self: real(self) + [SignFlip(self.neuron_sets()[0])])


def test_a_wrong_declaration_is_caught(monkeypatch):
    broken_declaration(monkeypatch)
    report = check.run(sweep.compose_one(["model=mlp", "model.activation=relu", "model.width=4"] + SMALL), mirrors=4)
    assert not report.ok
    wrong = next(c for c in report.checks if c.symmetry == "flip layer0")
    assert wrong.declared and not wrong.holds and wrong.invariance > 1e-3
    result = CliRunner().invoke(app, ["check", "model=mlp", "model.activation=relu", "model.width=4", *SMALL])
    assert result.exit_code == 1 and "FAILS" in result.output


def test_check_through_the_cli(cli, tmp_path):
    out = cli("check", "model=mlp", "model.activation=relu", "model.width=4", *SMALL)
    assert "all declared mirrors hold" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if " layer0 " in line]
    assert rows[0][:4] == ["swap", "layer0", "permutation", "yes"] and rows[0][-1] == "holds"
    assert rows[1][:4] == ["flip", "layer0", "rescaling", "no"] and rows[1][-1] == "no"
    data = json.loads(cli("check", "model=mlp", "model.width=4", "--json", *SMALL).stdout)
    assert data["ok"] is True and data["model"] == "mlp"
    assert {(c["symmetry"], c["declared"], c["holds"]) for c in data["checks"]} == {
        ("swap layer0", True, True), ("flip layer0", True, True)}
    bad = cli("check", "model=mlp", "model.width=-1", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
    sweeping = cli("check", "model=mlp", "model.width=2,4", check=False)
    assert sweeping.returncode == 2 and "not sweep syntax" in sweeping.stderr
    assert not any(tmp_path.iterdir())                              # check writes nothing
