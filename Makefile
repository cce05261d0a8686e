# The two commands of the README: `make train` (main job) and `make test`.
# Each makes its own virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: train test test-quick lint typecheck format clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Core install: what a user of the library needs.
$(VENV)/.core-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

# Development install: torch (pinned), scikit-learn, pytest, ... for tests and benchmarks.
$(VENV)/.dev-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@ $(VENV)/.core-installed

# Main job: the tutorial MLP on MNIST, offline (the user cache, else the embedded sample).
train: $(VENV)/.core-installed
	$(BIN)/jaxnet train --model mlp --no-download

# The whole test suite, slow real-data runs included.
test: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q

# The quick loop while developing.
test-quick: $(VENV)/.dev-installed
	$(BIN)/python -m pytest -q -m "not slow"

# Lint, format check and type check, as CI runs them before the tests.
lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The type checker alone (configured in pyproject.toml; make lint runs it too).
typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy

# Apply the formatter and the safe lint fixes.
format: $(VENV)/.dev-installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-venv:
	rm -rf $(VENV)
