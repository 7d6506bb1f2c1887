"""For every test: holder attribution (process-wide once any holder is set) starts off again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sqlalchemy_pool_exporter.instrumentation import holders


@pytest.fixture(autouse=True)
def _holders_off() -> Iterator[None]:
    yield
    holders.ATTRIBUTING[0] = False
