# The two commands of the README. Each makes its own virtual environment on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install

$(BIN)/shoal: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch 2.13.0 is the CPU wheel on our machines; elsewhere any torch>=2.11 does.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q 'torch>=2.11'
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/shoal

demo: $(BIN)/shoal
	$(BIN)/shoal demo

# The linter first (configured in pyproject.toml): a lint failure is cheaper to see than a test failure.
test: $(BIN)/shoal
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests
