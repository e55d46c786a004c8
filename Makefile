# crm-mail: `make run` and `make test` set themselves up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
# The lock and audit tools live in a venv of their own: their dependencies are not the
# product's, and nothing of `make test` needs them.
TOOLS  := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed
LOCK_FLAGS := --generate-hashes --universal --python-version 3.11 --custom-compile-command "make lock"

.PHONY: setup run test lint typecheck pytest bench lock audit clean

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

$(TOOLS_STAMP):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet 'pip-audit>=2.9,<3' 'uv>=0.5'
	touch $(TOOLS_STAMP)

## lock: pin every dependency with the hashes of its files, for CI and deployment:
## requirements.lock (the product and PostgreSQL), requirements-test.lock (+ tests)
lock: $(TOOLS_STAMP)
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra postgres $(LOCK_FLAGS) -o requirements.lock
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra postgres --extra test $(LOCK_FLAGS) \
		-o requirements-test.lock

## audit: the locked versions against PyPI's advisories (docs/security.md); --strict:
## a package that could not be checked fails the audit instead of passing unseen
audit: $(TOOLS_STAMP)
	$(TOOLS)/bin/pip-audit --strict --disable-pip --require-hashes \
		-r requirements.lock -r requirements-test.lock

clean:
	rm -rf $(VENV) $(TOOLS) demo .pytest_cache .mypy_cache .ruff_cache
