"""session_scope / session_dependency, async and sync: commit, rollback on any exception, always close, count, log."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterator

import greenlet
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter import Exporter

from ..conftest import PG_NAME, PG_URL, PgEngineFactory, sample

TABLE = f"core_session_{os.getpid()}"


def scopes(registry: CollectorRegistry, outcome: str) -> float | None:
    return sample(registry, "sqlalchemy_session_scopes_total", pool=PG_NAME, outcome=outcome)


def used(registry: CollectorRegistry) -> float | None:
    return sample(registry, "sqlalchemy_pool_connections", pool=PG_NAME, state="used")


@pytest.fixture
async def table(pg_engine: PgEngineFactory) -> AsyncEngine:
    engine, _ = pg_engine(pool_size=2, max_overflow=0)
    async with engine.begin() as conn:
        await conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
        await conn.execute(text(f"CREATE TABLE {TABLE} (n int)"))
    return engine


async def rows(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        n: int = (await conn.execute(text(f"SELECT count(*) FROM {TABLE}"))).scalar_one()
    return n


async def drop(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))


async def test_commit_on_success_rollback_on_any_exception(
    table: AsyncEngine, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine = table
    exporter.instrument(engine)
    sessions = async_sessionmaker(engine)
    try:
        for _ in range(3):
            async with pool_exporter.session_scope(sessions) as session:
                await session.execute(text(f"INSERT INTO {TABLE} VALUES (1)"))
        # Not only SQLAlchemy errors: a plain ValueError rolls back too.
        with pytest.raises(ValueError, match="app"):
            async with pool_exporter.session_scope(sessions) as session:
                await session.execute(text(f"INSERT INTO {TABLE} VALUES (2)"))
                raise ValueError("app")
        with pytest.raises(KeyError):
            async with pool_exporter.session_scope(sessions) as session:
                await session.execute(text(f"INSERT INTO {TABLE} VALUES (3)"))
                raise KeyError("x")

        assert await rows(engine) == 3
        assert scopes(registry, "commit") == 3
        assert scopes(registry, "rollback") == 2
        assert scopes(registry, "cancelled") is None
        assert sample(registry, "sqlalchemy_transactions_total", pool=PG_NAME, outcome="commit") == 3
        # Two rolled-back scopes; the read in rows() only closes.
        assert sample(registry, "sqlalchemy_transactions_total", pool=PG_NAME, outcome="rollback") == 2
        assert sample(registry, "sqlalchemy_transactions_total", pool=PG_NAME, outcome="close") == 1
        # Always closed: every connection is back.
        assert used(registry) == 0
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        await drop(engine)


async def test_cancellation_rolls_back_and_counts_cancelled(
    table: AsyncEngine, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine = table
    exporter.instrument(engine)
    sessions = async_sessionmaker(engine)
    inside = asyncio.Event()
    try:

        async def request() -> None:
            async with pool_exporter.session_scope(sessions) as session:
                await session.execute(text(f"INSERT INTO {TABLE} VALUES (1)"))
                inside.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(request())
        await asyncio.wait_for(inside.wait(), 5)
        assert used(registry) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        assert scopes(registry, "cancelled") == 1
        assert scopes(registry, "commit") is None
        assert scopes(registry, "rollback") is None
        assert used(registry) == 0
        assert await rows(engine) == 0
    finally:
        await drop(engine)


async def test_session_dependency_the_way_fastapi_drives_it(
    table: AsyncEngine, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine = table
    exporter.instrument(engine)
    get_session = pool_exporter.session_dependency(async_sessionmaker(engine))
    # FastAPI wraps generator dependencies in an async context manager: success resumes the
    # generator, an exception is thrown into it.
    as_dependency = contextlib.asynccontextmanager(get_session)
    try:
        async with as_dependency() as session:
            assert isinstance(session, AsyncSession)
            await session.execute(text(f"INSERT INTO {TABLE} VALUES (1)"))
        with pytest.raises(RuntimeError):
            async with as_dependency() as session:
                await session.execute(text(f"INSERT INTO {TABLE} VALUES (2)"))
                raise RuntimeError("handler failed")

        assert await rows(engine) == 1
        assert scopes(registry, "commit") == 1
        assert scopes(registry, "rollback") == 1
        assert used(registry) == 0
    finally:
        await drop(engine)


async def test_debug_log_carries_pool_status_as_fields(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter, caplog: pytest.LogCaptureFixture
) -> None:
    engine, _ = pg_engine(pool_size=2, max_overflow=1)
    exporter.instrument(engine)
    sessions = async_sessionmaker(engine)
    caplog.set_level(logging.DEBUG, logger="sqlalchemy_pool_exporter.session")

    async with engine.connect() as other:
        await other.execute(text("SELECT 1"))
        async with pool_exporter.session_scope(sessions) as session:
            await session.execute(text("SELECT 1"))

    records = [r for r in caplog.records if r.name == "sqlalchemy_pool_exporter.session" and r.levelno == logging.DEBUG]
    assert len(records) == 1
    record = records[0]
    fields = {k: record.__dict__[k] for k in ("pool", "size", "used", "idle", "overflow", "pending", "outcome")}
    # Logged after the session closed, while `other` still holds its connection.
    assert fields == {
        "pool": PG_NAME,
        "size": 2,
        "used": 1,
        "idle": 1,
        "overflow": 0,
        "pending": 0,
        "outcome": "commit",
    }
    assert "used=1" in record.getMessage()


async def test_session_scope_on_an_uninstrumented_engine_still_works(
    pg_engine: PgEngineFactory, caplog: pytest.LogCaptureFixture
) -> None:
    engine, _ = pg_engine()
    caplog.set_level(logging.DEBUG, logger="sqlalchemy_pool_exporter.session")
    async with pool_exporter.session_scope(async_sessionmaker(engine)) as session:
        assert (await session.execute(text("SELECT 7"))).scalar_one() == 7
    (record,) = [r for r in caplog.records if r.name == "sqlalchemy_pool_exporter.session"]
    assert record.__dict__["outcome"] == "commit"


# -- the sync scope: the same outcomes, counted the same way ---------------------------------------

PG_SYNC_URL = PG_URL.replace("+asyncpg", "+psycopg")


@pytest.fixture
def sync_table(sync_engines: list[Engine]) -> Iterator[Engine]:
    """A psycopg (3) engine, pool_size=2, on a fresh table; the table dropped after the test."""
    engine = create_engine(PG_SYNC_URL, pool_size=2, max_overflow=0)
    sync_engines.append(engine)
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
        conn.execute(text(f"CREATE TABLE {TABLE} (n int)"))
    yield engine
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))


def sync_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        n: int = conn.execute(text(f"SELECT count(*) FROM {TABLE}")).scalar_one()
    return n


def test_sync_scope_commits_rolls_back_on_any_exception_and_always_closes(
    sync_table: Engine, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine = sync_table
    exporter.instrument(engine)
    sessions = sessionmaker(engine)
    for _ in range(3):
        with pool_exporter.session_scope(sessions) as session:
            assert isinstance(session, Session)
            session.execute(text(f"INSERT INTO {TABLE} VALUES (1)"))
    with pytest.raises(ValueError, match="app"), pool_exporter.session_scope(sessions) as session:
        session.execute(text(f"INSERT INTO {TABLE} VALUES (2)"))
        raise ValueError("app")
    # A failed statement: the database's own error rolls back the same way.
    with pytest.raises(sa_exc.ProgrammingError), pool_exporter.session_scope(sessions) as session:
        session.execute(text("SELECT * FROM no_such_table_at_all"))

    assert sync_rows(engine) == 3
    assert scopes(registry, "commit") == 3
    assert scopes(registry, "rollback") == 2
    assert scopes(registry, "cancelled") is None
    assert sample(registry, "sqlalchemy_transactions_total", pool=PG_NAME, outcome="commit") == 3
    assert used(registry) == 0
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]


def test_sync_scope_names_its_holder_and_a_scoped_session_works(
    sync_table: Engine, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine = sync_table
    exporter.instrument(engine)
    scoped = scoped_session(sessionmaker(engine))
    with pool_exporter.session_scope(scoped, holder="nightly-report") as session:
        session.execute(text(f"INSERT INTO {TABLE} VALUES (1)"))
    with pool_exporter.session_scope(scoped) as session:
        session.execute(text(f"INSERT INTO {TABLE} VALUES (1)"))
    assert sync_rows(engine) == 2
    assert scopes(registry, "commit") == 2
    holder = "sqlalchemy_pool_holder_checkouts_total"
    assert sample(registry, holder, pool=PG_NAME, holder="nightly-report") == 1
    # The scope's own checkout and sync_rows(): no holder. (The fixture's table was made before instrument().)
    assert sample(registry, holder, pool=PG_NAME, holder="none") == 2


def test_sync_dependency_the_way_a_framework_drives_a_generator(
    sync_table: Engine, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine = sync_table
    exporter.instrument(engine)
    get_session = pool_exporter.session_dependency(sessionmaker(engine))
    as_dependency = contextlib.contextmanager(get_session)  # what FastAPI does with a sync generator
    with as_dependency() as session:
        assert isinstance(session, Session)
        session.execute(text(f"INSERT INTO {TABLE} VALUES (1)"))
    with pytest.raises(RuntimeError), as_dependency() as session:
        session.execute(text(f"INSERT INTO {TABLE} VALUES (2)"))
        raise RuntimeError("handler failed")
    assert sync_rows(engine) == 1
    assert scopes(registry, "commit") == 1
    assert scopes(registry, "rollback") == 1
    assert used(registry) == 0


def test_a_killed_greenlet_inside_a_sync_scope_is_cancelled(
    sync_table: Engine, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine = sync_table
    exporter.instrument(engine)
    sessions = sessionmaker(engine)

    def request() -> None:
        with pool_exporter.session_scope(sessions) as session:
            session.execute(text(f"INSERT INTO {TABLE} VALUES (1)"))
            greenlet.getcurrent().parent.switch()  # parked, holding its connection

    job = greenlet.greenlet(request)
    job.switch()
    assert used(registry) == 1
    job.throw(greenlet.GreenletExit)  # what gevent's Greenlet.kill() raises in it
    assert job.dead
    assert scopes(registry, "cancelled") == 1
    assert scopes(registry, "rollback") is None
    assert used(registry) == 0
    assert sync_rows(engine) == 0
