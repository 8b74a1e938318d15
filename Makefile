# Quick start: `make demo` (the fleet on the bundled tiny models), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch; CUDA users set TORCH='torch' (or their own pin).
TORCH ?= torch==2.13.0
CONFIG ?= examples/demo.yaml
PROBLEMS ?= examples/problems.jsonl
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast lint models fleet clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev,redis]"
	touch $@

venv: $(VENV)/.installed

# Starts Redis if none answers, one worker per model, runs the example problems,
# prints a summary and leaves the dataset in data/demo/.
demo: venv
	$(BIN)/cord-coord demo --config $(CONFIG) --problems $(PROBLEMS)

# The whole suite: real Redis (started if none answers), real workers, real tiny models.
test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy common workers coordinator tests

# Rebuild the bundled tiny models (seeded, no download).
models: venv
	$(BIN)/python -m cord.common.lab.tinymodels --out models

# The demo fleet under honcho (see Procfile); stop with Ctrl-C.
fleet: venv
	$(BIN)/honcho start

clean:
	rm -rf .run data/demo .pytest_cache .mypy_cache .ruff_cache
