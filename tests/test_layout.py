"""The package's layout: every module imports on its own (no import cycle), the subpackages are
what README's module map says, and nothing outside the model registry lists the models."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import symrun

PACKAGE = Path(symrun.__file__).resolve().parent


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if rel.name != "__main__":          # `python -m symrun` runs the command on import
            names.append(".".join(parts))
    return names


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported before any other symrun module (the cache of symrun's modules emptied
    between them; torch and the rest stay loaded): a cycle at import time fails here."""
    code = (
        "import importlib, sys, traceback\n"
        "import torch, numpy, omegaconf, hydra, pandas, matplotlib\n"
        "bad = []\n"
        "for name in sys.argv[1:]:\n"
        "    for m in [m for m in sys.modules if m == 'symrun' or m.startswith('symrun.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{name}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n")
    done = subprocess.run([sys.executable, "-c", code, *_modules()], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", done.stdout


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The symrun modules a file imports at its top level (not inside functions): `from a import
    b` is module a.b when there is one, else module a."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("symrun"):
            for a in node.names:
                out.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("symrun")}
    return out


def test_the_static_import_graph_of_top_level_imports_has_no_cycle():
    modules = set(_modules())
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        # a module's own packages are imported before it whatever it imports: not an edge
        graph[name] = {m for m in _imports(path, modules) if m in modules and not name.startswith(m)}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " → ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_only_the_registry_and_the_model_modules_name_the_built_in_models():
    """config, the engine, the planner, check and the report ask symrun.models.registry."""
    pattern = re.compile(r"""["'](hadamard|factorization|ensemble|attention|resnet18|transformer)["']""")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "models" or rel.name in ("bench.py", "wholebench.py", "baselines.py", "gallery.py"):
            continue
        offenders += [f"{rel}: {m.group(0)}" for m in pattern.finditer(path.read_text())]
    assert not offenders, offenders


def test_the_subpackages_are_the_module_map_of_the_readme():
    readme = (PACKAGE.parent / "README.md").read_text()
    for sub in ("models", "models/nets", "training", "sweeping", "analysis", "data"):
        assert (PACKAGE / sub / "__init__.py").is_file(), sub
        assert f"symrun/{sub}/" in readme, sub
