"""The benchmark harness's smoke tests: every test here is marked `bench`.

They run `python -m benchmarks --quick` and `python -m benchmarks.growth --quick` in subprocesses for
minutes, to show the reports stay complete and finite; `make test` leaves them out (`-m "not bench"`),
`make test-bench` and CI run them. The benchmarks package lives at the repository root, beside
exporter/; this makes it importable.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = str(HERE.parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(HERE):
            item.add_marker(pytest.mark.bench)
            # Their children have their own 180 s limits; a loaded CI machine must not cut them at 120 s.
            item.add_marker(pytest.mark.timeout(900))
