# symrun — the two set-up commands are `make run` and `make test`; both install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install bytecode run test test-fast bench results clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# compat: the checkout goes on sys.path, where Hydra's plugin scan finds hydra_plugins/ (it
	# cannot list packages behind setuptools' default editable finder: no symrun sweeper then)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]" --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

# Python keeps a module's compiled bytecode beside it (__pycache__/), unless PYTHONDONTWRITEBYTECODE
# is set, as on some shared machines and containers: there every symrun process compiled its 73
# modules afresh, up to 0.2 s of each command's start. pip compiles an installed package; this
# editable checkout is compiled here, before the targets that run it (only files changed since).
bytecode: install
	$(BIN)/python -m compileall -q symrun hydra_plugins

## run: the built-in default sweep (rescaling → sparsity, 16 weight decays × 2 label noises × 3 seeds)
run: bytecode
	$(BIN)/symrun sweep experiment=rescaling_sparsity

## test: the whole test suite (a few minutes on 2 cores)
test: bytecode
	$(BIN)/python -m pytest -q

## test-fast: everything but the tests marked slow
test-fast: bytecode
	$(BIN)/python -m pytest -q -m "not slow"

## bench: symrun sweep vs a plain loop and torch.func (whole processes), then the engine alone → BENCHMARKS.md
bench: bytecode
	$(BIN)/python -m symrun.bench --profile --write BENCHMARKS.md

## results: every experiment preset at its CPU size → docs/results.md and docs/results/*/*.png
results: bytecode
	$(BIN)/python -m symrun.gallery

clean:
	rm -rf $(VENV) build *.egg-info
