"""Fixtures for the service tests: a real aiohttp server on 127.0.0.1, fresh registries, real engines."""

from __future__ import annotations

import os
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
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import QueuePool

import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter.web.app import Server

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


async def scrape(url: str, **kwargs: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET a /metrics URL and index every sample by (name, sorted labels)."""
    async with aiohttp.ClientSession() as client, client.get(url, **kwargs) as response:  # type: ignore[arg-type]
        assert response.status == 200, await response.text()
        return parse(await response.text())


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


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


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: ours minus any POOL_EXPORTER_/multiprocess settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POOL_EXPORTER_", "PROMETHEUS_MULTIPROC"))}
    env.update(extra)
    return env
