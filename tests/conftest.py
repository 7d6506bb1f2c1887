"""For every test: holder attribution (process-wide once any holder is set) starts off again, and so
does the root logger that an in-process `main()` configures.

For any test that asks: a fresh registry, and an Exporter of it. The plain helpers below (sample readers,
a clean environment for child processes) are the folders' own conftest files' too: they import them with
`from ..conftest import ...`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.instrumentation import holders
from sqlalchemy_pool_exporter.logs import RedactFilter

# A scraped page's samples, by (name, sorted labels).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(autouse=True)
def _holders_off() -> Iterator[None]:
    yield
    holders.ATTRIBUTING[0] = False


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    # main() calls logs.setup(): a handler on this test's (soon closed) stderr whose RedactFilter
    # moves exc_info into exc_text, which later tests' caplog would see. Remove it and the levels.
    root, access = logging.getLogger(), logging.getLogger("aiohttp.access")
    levels = root.level, access.level
    yield
    for handler in root.handlers[:]:
        if any(isinstance(f, RedactFilter) for f in handler.filters):
            root.removeHandler(handler)
    root.setLevel(levels[0])
    access.setLevel(levels[1])


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def exporter(registry: CollectorRegistry) -> Iterator[Exporter]:
    """An Exporter of the test's own registry; closed after the test (every engine uninstrumented)."""
    made = Exporter(registry)
    yield made
    made.close()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """One sample's value, or None when the series is absent."""
    return registry.get_sample_value(name, labels)


def samples_of(text: str) -> Samples:
    """Every sample of a scraped page (text exposition format), by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: Samples, name: str, **labels: str) -> float | None:
    """One sample's value from `samples_of(...)`, or None when the series is absent."""
    return samples.get((name, tuple(sorted(labels.items()))))


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without any POOL_EXPORTER_ or multiprocess setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POOL_EXPORTER_", "PROMETHEUS_MULTIPROC"))}
    env.update(extra)
    return env
