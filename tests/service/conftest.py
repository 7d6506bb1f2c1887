"""Fixtures for the service tests: a real aiohttp server on 127.0.0.1, fresh registries, real engines."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import QueuePool

import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter.web.app import Server

from ..conftest import Samples

# The service tests' own names for the shared helpers (they import them from here): `sample` here reads
# a scraped page, where the core tests' `sample` reads a registry.
from ..conftest import clean_env as cli_env
from ..conftest import metric as sample
from ..conftest import samples_of as parse

__all__ = ["cli_env", "parse", "sample"]

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


@asynccontextmanager
async def serving(app: web.Application, **kwargs: object) -> AsyncIterator[Server]:
    """Serve `app` on a free port of 127.0.0.1 for the duration of the block."""
    server = Server(app, "127.0.0.1", 0, **kwargs)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def scrape(url: str, **kwargs: object) -> Samples:
    """GET a /metrics URL and index every sample by (name, sorted labels)."""
    async with aiohttp.ClientSession() as client, client.get(url, **kwargs) as response:  # type: ignore[arg-type]
        assert response.status == 200, await response.text()
        return parse(await response.text())


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}", poolclass=QueuePool, pool_size=2, max_overflow=1)
    yield engine
    pool_exporter.uninstrument(engine)
    engine.dispose()


def wait_for_line(proc: subprocess.Popen[str], pattern: str, lines: list[str], limit: float = 60.0) -> re.Match[str]:
    """Read `proc`'s output until a line matches (the limit only guards a hung child)."""
    deadline = time.monotonic() + limit
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"process ended before printing {pattern!r}:\n" + "".join(lines))
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no line matched {pattern!r}:\n" + "".join(lines))
