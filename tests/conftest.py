"""For every test: holder attribution (process-wide once any holder is set) starts off again, and so
does the root logger that an in-process `main()` configures."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from sqlalchemy_pool_exporter.instrumentation import holders
from sqlalchemy_pool_exporter.logs import RedactFilter


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
