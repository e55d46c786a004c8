# crm-mail: `make run` and `make test` set themselves up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: setup run test lint typecheck pytest bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

## run: set up, then run the demo in ./demo (web app, outbox worker, local mail catcher)
## until Ctrl-C
run: setup
	$(BIN)/crm demo --dir demo

## test: set up, lint and type-check, then run the whole suite (SQLite, and PostgreSQL
## in a throwaway cluster when its server binaries are installed)
test: lint typecheck pytest

lint: setup
	$(BIN)/ruff check crm_core plugins tests bench
	$(BIN)/ruff format --check crm_core plugins tests bench

typecheck: setup
	$(BIN)/mypy crm_core plugins tests

pytest: setup
	scripts/ensure-chromium
	scripts/with-postgres $(BIN)/pytest -n auto

## bench: the side-by-side benchmarks (docs/performance.md)
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) demo .pytest_cache .mypy_cache .ruff_cache
