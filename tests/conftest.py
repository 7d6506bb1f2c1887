"""For every test: holder attribution (process-wide once any holder is set) starts off again, and so
does the root logger that an in-process `main()` configures.

Tests marked `both_loops` run twice, under asyncio's own event loop and under uvloop (uvicorn's
default whenever it is installed; its transports are not asyncio.Transport subclasses); every other
async test runs once, under asyncio's.

For any test that asks: a fresh registry and an Exporter of it; engines on the local PostgreSQL (asyncpg)
and SQLite, disposed after the test; a real aiohttp server on 127.0.0.1. Tests import the plain helpers
below with `from ..conftest import ...`; tests/reliability has its own throwaway cluster and servers.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.instrumentation import holders
from sqlalchemy_pool_exporter.logs import RedactFilter
from sqlalchemy_pool_exporter.web.app import Server

# A scraped page's samples, by (name, sorted labels).
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# Every async test takes one of these; `both_loops` ones take both (pytest-asyncio >= 1.4's hook).
ONE_LOOP: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
BOTH_LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {**ONE_LOOP, "uvloop": uvloop.new_event_loop}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    return BOTH_LOOPS if item.get_closest_marker("both_loops") is not None else ONE_LOOP


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


PYTHON = sys.executable
PG_HOST = os.environ.get("PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PGPORT", "5432"))
PG_DB = os.environ.get("PGDATABASE", "test")
PG_USER = os.environ.get("PGUSER", "postgres")
PG_URL = f"postgresql+asyncpg://{PG_USER}@{PG_HOST}:{PG_PORT}/{PG_DB}"
PG_DSN = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{PG_DB}"
PG_NAME = f"{PG_HOST}:{PG_PORT}/{PG_DB}"

_app_names = itertools.count(1)


def series(registry: CollectorRegistry, name: str) -> list[dict[str, str]]:
    """The label sets of every sample called `name`."""
    return [dict(s.labels) for m in registry.collect() for s in m.samples if s.name == name]


async def poll(condition: Callable[[], bool], timeout: float = 5.0, step: float = 0.005) -> None:
    """Yield to the loop until `condition()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(step)


def poll_sync(condition: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(step)


async def real_connections(app_name: str) -> int:
    """Open server connections tagged with `app_name`, counted by PostgreSQL itself."""
    conn = await asyncpg.connect(PG_DSN)
    try:
        n: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
            app_name,
        )
        return n
    finally:
        await conn.close()


async def terminate_backend(pid: int) -> None:
    conn = await asyncpg.connect(PG_DSN)
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid) is True
        # Wait until the server has really dropped it, so the next pre-ping sees a dead socket.
        for _ in range(500):
            if not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"backend {pid} still alive")
    finally:
        await conn.close()


PgEngineFactory = Callable[..., tuple[AsyncEngine, str]]


@pytest.fixture
async def pg_engine() -> AsyncIterator[PgEngineFactory]:
    """Make asyncpg engines whose connections carry a unique application_name; dispose them after."""
    made: list[AsyncEngine] = []

    def make(url: str = PG_URL, **kwargs: Any) -> tuple[AsyncEngine, str]:
        app = f"core_{os.getpid()}_{next(_app_names)}"
        connect_args = kwargs.pop("connect_args", {})
        connect_args.setdefault("server_settings", {})["application_name"] = app
        engine = create_async_engine(url, connect_args=connect_args, **kwargs)
        made.append(engine)
        return engine, app

    yield make
    for engine in made:
        pool_exporter.uninstrument(engine)
        await engine.dispose()


@pytest.fixture
def sync_engines() -> Iterator[list[Engine]]:
    """Sync engines a test creates; uninstrumented and disposed after it."""
    made: list[Engine] = []
    yield made
    for engine in made:
        pool_exporter.uninstrument(engine)
        engine.dispose()


def orders_sqlite(exporter: Exporter, engines: list[Engine], path: Path) -> Engine:
    """A SQLite QueuePool named `orders` (size 2, overflow 1, 10 ms timeout): a table, seven committed inserts."""
    engine = create_engine(f"sqlite:///{path}", poolclass=QueuePool, pool_size=2, max_overflow=1, pool_timeout=0.01)
    engines.append(engine)
    exporter.instrument(engine, name="orders")
    with engine.connect() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
        conn.commit()
    for i in range(7):
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": i})
    return engine


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
        return samples_of(await response.text())


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


# A worker of a multi-worker app: commits, holds connections, flushes its numbers, waits for stdin to close.
MP_WORKER = """
import sys
from sqlalchemy import create_engine
from sqlalchemy.pool import QueuePool
import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter import default_exporter

commits, held, db = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
engine = create_engine(f"sqlite:///{db}", poolclass=QueuePool, pool_size=5, max_overflow=0)
pool_exporter.instrument(engine, name="app")
for _ in range(commits):
    with engine.begin() as conn:
        conn.exec_driver_sql("SELECT 1")
conns = [engine.connect() for _ in range(held)]
default_exporter().flush()
print("ready", flush=True)
sys.stdin.read()  # until the test closes our stdin: then a clean exit
"""
