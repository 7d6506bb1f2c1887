# `make test` and `make demo` do their own set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# `make test` leaves out the `bench`-marked tests: the benchmark harness's smoke tests (minutes of
# subprocesses to show finite numbers) and the fresh-venv install test (a minute of pip); `make test-bench`
# runs just those, and CI runs both. PYTEST_MARK= runs everything.
PYTEST_MARK ?= not bench

.PHONY: setup services lint test test-bench matrix demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

services:
	bash scripts/ensure-services.sh

lint: setup
	$(VENV)/bin/ruff check exporter tests dashboards benchmarks scripts
	$(VENV)/bin/mypy

test: setup services lint
	$(PY) -m pytest -m "$(PYTEST_MARK)" $(PYTEST_ARGS)

test-bench: setup services
	$(PY) -m pytest -m bench $(PYTEST_ARGS)

# The library and service tests (scripts/matrix.py TESTS) on the declared floors and the latest releases, one venv each under
# .matrix/ (docs/compatibility.md). CI runs it after `make test` and `make test-bench`.
matrix: services
	$(PYTHON) scripts/matrix.py $(MATRIX_ARGS)

demo: setup
	$(VENV)/bin/pool-exporter demo

bench: setup
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .matrix .pytest_cache .mypy_cache .ruff_cache
