# `make test` and `make demo` do their own set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup services lint test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

services:
	bash scripts/ensure-services.sh

lint: setup
	$(VENV)/bin/ruff check exporter tests dashboards benchmarks
	$(VENV)/bin/mypy

test: setup services lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/pool-exporter demo

bench: setup
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
