# symrun — the two set-up commands are `make run` and `make test`; both install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test test-fast bench results clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# compat: the checkout goes on sys.path, where Hydra's plugin scan finds hydra_plugins/ (it
	# cannot list packages behind setuptools' default editable finder: no symrun sweeper then)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]" --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

## run: the built-in default sweep (rescaling → sparsity, 16 weight decays × 2 label noises × 3 seeds)
run: install
	$(BIN)/symrun sweep experiment=rescaling_sparsity

## test: the whole test suite (a few minutes on 2 cores)
test: install
	$(BIN)/python -m pytest -q

## test-fast: everything but the tests marked slow
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

## bench: symrun sweep vs a plain loop and torch.func (whole processes), then the engine alone → BENCHMARKS.md
bench: install
	$(BIN)/python -m symrun.bench --profile --write BENCHMARKS.md

## results: every experiment preset at its CPU size → docs/results.md and docs/results/*/*.png
results: install
	$(BIN)/python -m symrun.gallery

clean:
	rm -rf $(VENV) build *.egg-info
