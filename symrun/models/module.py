"""model=module: any torch.nn.Module of the user's, trained as a pack (symrun.models.nets.module).

    symrun sweep model=module model._target_=mypkg.nets.MLP +model.width=128 …

`_target_` names the class (Hydra's convention); every other key of `model` but `name`,
`init_scale` and `mirrors` is a keyword argument of its constructor. The class is imported from
the current folder, PYTHONPATH or a config folder of the user's (`-cd DIR`).

Its mirrors are declared in `model.mirrors` on the module's own parameter names and per-run
shapes (the run axis is symrun's), one mapping each:

    {kind: rescaling, name: hidden, slots: [[fc1.weight, 0], [fc1.bias, 0], [fc2.weight, 1]]}
    {kind: permutation, name: hidden, slots: [[fc1.weight, 0], [fc1.bias, 0], [fc2.weight, 1]]}
    {kind: rotation, left: fc2.weight, right: fc1.weight}

rescaling: a sign flip of each unit k, the slices `[param, axis]` at index k together (its
constraint: the unit is dead) → sparsity; permutation: a swap of each pair of units (constraint:
identical units) → independent_fraction; rotation: (U, W) → (U(I − 2nnᵀ), (I − 2nnᵀ)W) for the
product U·W of `left` (…, a, h) and `right` (…, h, b) → rank of U·W (docs/theory.md §3).
`symrun check model=module … --discover` finds candidates and prints those that hold as YAML.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

from omegaconf import MISSING

from symrun.config import ConfigError, ModelConfig
from symrun.models.registry import ModelSpec

KINDS = ("rescaling", "permutation", "rotation")
IMPORT_PATH = "SYMRUN_IMPORT_PATH"   # the user's config folders (os.pathsep-separated): model._target_ imports from them
# The keys of `model` that are symrun's; every other key is a constructor argument.
OWN_KEYS = ("name", "init_scale", "_target_", "mirrors")


@dataclass
class ModuleConfig(ModelConfig):
    """A user's torch.nn.Module: `_target_` = package.module.Class, its constructor's keyword
    arguments as further keys of `model`, and its declared mirrors (`mirrors`)."""

    name: str = "module"
    target: str = MISSING
    """package.module.Class of the nn.Module (the key `_target_`)."""
    args: dict = field(default_factory=dict)
    """The constructor's keyword arguments (every key of `model` that is not symrun's)."""
    mirrors: List[Any] = field(default_factory=list)
    """Declared mirrors, a list of {kind, name, slots} or {kind: rotation, left, right}."""

    def to_plain(self) -> dict:
        """As the user writes it (and config.yaml holds it): `_target_` and the arguments as keys."""
        return {"name": self.name, "init_scale": self.init_scale, "_target_": self.target,
                "mirrors": [dict(m) for m in self.mirrors], **self.args}

    @classmethod
    def from_plain(cls, d: dict) -> "ModuleConfig":
        d = dict(d)
        if d.get("_target_") in (None, "???", ""):
            raise ConfigError("model=module needs model._target_=package.module.Class (the nn.Module to train)")
        mirrors = d.pop("mirrors", None) or []
        if not isinstance(mirrors, list):
            raise ConfigError(f"model.mirrors must be a list of mirrors, got {mirrors!r}")
        init_scale = d.pop("init_scale", 1.0)
        if not isinstance(init_scale, (int, float)) or isinstance(init_scale, bool):
            raise ConfigError(f"wrong type for model.init_scale: {init_scale!r} is not a number")
        target = d.pop("_target_")
        d.pop("name", None)
        return cls(init_scale=float(init_scale), target=str(target), args=d, mirrors=[parse_mirror(m, i) for i, m in enumerate(mirrors)])


def parse_mirror(m: Any, i: int) -> dict:
    """One declared mirror, checked for form (its parameters and sizes are checked against the
    module when it is built): one-line ConfigError otherwise."""
    where = f"model.mirrors[{i}]"
    if not isinstance(m, dict) or m.get("kind") not in KINDS:
        raise ConfigError(f"{where} must be a mapping with kind: {' | '.join(KINDS)}, got {m!r}")
    if m["kind"] == "rotation":
        extra = set(m) - {"kind", "name", "left", "right"}
        if extra or not all(isinstance(m.get(k), str) for k in ("left", "right")):
            raise ConfigError(f"{where}: a rotation is {{kind: rotation, left: PARAM, right: PARAM}}, got {m!r}")
        return {"kind": "rotation", "name": str(m.get("name") or f"{m['left']}·{m['right']}"), "left": m["left"], "right": m["right"]}
    slots = m.get("slots")
    extra = set(m) - {"kind", "name", "slots"}
    good = isinstance(slots, list) and slots and all(
        isinstance(s, (list, tuple)) and len(s) == 2 and isinstance(s[0], str) and isinstance(s[1], int)
        and not isinstance(s[1], bool) for s in slots)
    if extra or not good:
        raise ConfigError(f"{where}: a {m['kind']} mirror is {{kind: {m['kind']}, name: NAME, slots: [[PARAM, AXIS], …]}}, "
                          f"got {m!r}")
    return {"kind": m["kind"], "name": str(m.get("name") or slots[0][0].rpartition(".")[0] or slots[0][0]),
            "slots": [[s[0], s[1]] for s in slots]}


def use_config_folders(hydra_runtime) -> None:
    """Let model._target_ import from the folder symrun started in and the user's config folders
    (Hydra's file config sources but symrun's own): recorded in the environment, which launcher
    workers inherit, for jobs that run elsewhere."""
    from symrun.config import CONFIG_DIR

    folders = [hydra_runtime.cwd] + [s.path for s in hydra_runtime.config_sources if s.schema == "file"
                                     and s.provider != "main" and Path(s.path).resolve() != CONFIG_DIR]
    os.environ[IMPORT_PATH] = os.pathsep.join(dict.fromkeys(str(f) for f in folders))


def node() -> dict:
    """A plain mapping, so that any constructor argument composes (+model.width=128, or a key of
    a model config file of the user's that starts from `module`)."""
    return {"name": "module", "init_scale": 1.0, "_target_": None, "mirrors": []}


SPEC = ModelSpec("module", ModuleConfig, "symrun.models.nets.module:ModuleModel",
                 primary=("sparsity", "independent_fraction", "rank"), node=node)
