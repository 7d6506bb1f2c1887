"""Real parts for the core tests: the local PostgreSQL through asyncpg, SQLite, a fresh registry each."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import QueuePool

import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter import Exporter

from ..conftest import sample as sample  # the core tests import it from here

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
