# `make test` and `make demo` do their own set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# `make test` leaves out the `bench`-marked tests: the benchmark harness's smoke tests (minutes of
# subprocesses to show finite numbers) and the fresh-venv install test (a minute of pip); `make test-bench`
# runs just those, and CI runs both. PYTEST_MARK= runs everything.
PYTEST_MARK ?= not bench

.PHONY: setup services lint test test-bench matrix demo bench fuzz fuzz-smoke clean

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

# Coverage-guided fuzzing (atheris, the `fuzz` extra) of every parser of untrusted input, FUZZ_SECONDS
# each (docs/reliability.md). New inputs go to .fuzz/<harness>/, crashes to .fuzz/<harness>-crash-*;
# the committed seeds in tests/fuzz/corpus/ are only read. CI runs `make fuzz-smoke`: 30 s each.
FUZZ_SECONDS ?= 180
FUZZ_ARGS ?=
FUZZERS := mpfile journal web_config http settings names checkouts

fuzz: setup
	$(PY) -m pip install -q -e '.[dev,fuzz]'
	@mkdir -p .fuzz
	@for f in $(FUZZERS); do \
	  mkdir -p .fuzz/$$f; \
	  dict=; if [ -f tests/fuzz/$$f.dict ]; then dict=-dict=tests/fuzz/$$f.dict; fi; \
	  echo "fuzz_$$f: $(FUZZ_SECONDS) s (log: .fuzz/$$f.log)"; \
	  if ! $(PY) tests/fuzz/fuzz_$$f.py .fuzz/$$f tests/fuzz/corpus/$$f $$dict -max_len=20000 \
	      -max_total_time=$(FUZZ_SECONDS) $(FUZZ_ARGS) -artifact_prefix=.fuzz/$$f- -print_final_stats=1 > .fuzz/$$f.log 2>&1; then \
	    grep -v '^INFO: Instrumenting' .fuzz/$$f.log | tail -n 40; exit 1; \
	  fi; \
	  grep -a 'DONE\|stat::number_of_executed_units' .fuzz/$$f.log; \
	done

# A fixed seed: CI's smoke replays the same inputs each run (it checks that no harness rots; finding
# new classes is `make fuzz`'s job), so a red CI run is a regression, not a lucky draw.
fuzz-smoke:
	$(MAKE) fuzz FUZZ_SECONDS=30 FUZZ_ARGS=-seed=1

clean:
	rm -rf $(VENV) .matrix .pytest_cache .mypy_cache .ruff_cache .fuzz
