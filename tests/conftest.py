"""For every test: holder attribution (process-wide once any holder is set) starts off again.

For any test that asks: a fresh registry, and an Exporter of it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.instrumentation import holders


@pytest.fixture(autouse=True)
def _holders_off() -> Iterator[None]:
    yield
    holders.ATTRIBUTING[0] = False


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def exporter(registry: CollectorRegistry) -> Iterator[Exporter]:
    """An Exporter of the test's own registry; closed after the test (every engine uninstrumented)."""
    made = Exporter(registry)
    yield made
    made.close()
