"""Transactions, savepoints, statements and their errors, Core and ORM alike."""

from __future__ import annotations

import os
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Integer, create_engine, event, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_pool_exporter import Exporter

from ..conftest import PG_NAME, PgEngineFactory, sample

TABLE = f"core_tx_{os.getpid()}"


def tx(registry: CollectorRegistry, outcome: str, pool: str = PG_NAME) -> float | None:
    return sample(registry, "sqlalchemy_transactions_total", pool=pool, outcome=outcome)


def ops(registry: CollectorRegistry, pool: str = PG_NAME) -> dict[str, float]:
    found: dict[str, float] = {}
    for op in ("select", "insert", "update", "delete", "other"):
        n = sample(registry, "sqlalchemy_statement_seconds_count", pool=pool, operation=op)
        if n is not None:
            found[op] = n
    return found


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = f"core_orm_{os.getpid()}"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)


async def test_core_commits_and_rollbacks(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = pg_engine()
    exporter.instrument(engine)

    for _ in range(7):
        async with engine.begin() as conn:
            await conn.execute(text("SELECT 1"))
    for _ in range(4):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            await conn.rollback()
    # A failing block inside begin() rolls back too.
    with pytest.raises(ValueError):
        async with engine.begin() as conn:
            await conn.execute(text("SELECT 1"))
            raise ValueError("app error")

    assert tx(registry, "commit") == 7
    assert tx(registry, "rollback") == 5
    assert sample(registry, "sqlalchemy_transaction_seconds_count", pool=PG_NAME, outcome="commit") == 7
    assert sample(registry, "sqlalchemy_transaction_seconds_count", pool=PG_NAME, outcome="rollback") == 5
    assert ops(registry) == {"select": 12}


async def test_savepoints_release_and_rollback(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = pg_engine()
    exporter.instrument(engine)

    async with engine.begin() as conn:
        for _ in range(3):
            async with conn.begin_nested():
                await conn.execute(text("SELECT 1"))
        for _ in range(2):
            savepoint = await conn.begin_nested()
            await conn.execute(text("SELECT 1"))
            await savepoint.rollback()

    assert sample(registry, "sqlalchemy_savepoints_total", pool=PG_NAME, outcome="release") == 3
    assert sample(registry, "sqlalchemy_savepoints_total", pool=PG_NAME, outcome="rollback") == 2
    # Savepoints are not transactions: one outer commit.
    assert tx(registry, "commit") == 1
    assert tx(registry, "rollback") == 0


async def test_statements_by_operation(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = pg_engine()
    exporter.instrument(engine)

    async with engine.begin() as conn:
        await conn.execute(text(f"CREATE TEMPORARY TABLE {TABLE} (id int PRIMARY KEY, n int)"))
        for i in range(3):
            await conn.execute(text(f"INSERT INTO {TABLE} VALUES (:i, 0)"), {"i": i})
        await conn.execute(text(f"  \n\tupdate {TABLE} SET n = 1 WHERE id = 0"))
        await conn.execute(text(f"DELETE FROM {TABLE} WHERE id = 2"))
        assert (await conn.execute(text(f"SELECT count(*) FROM {TABLE}"))).scalar_one() == 2
        assert (await conn.execute(text(f"select sum(n) from {TABLE}"))).scalar_one() == 1
        await conn.execute(text(f"WITH x AS (SELECT 1) SELECT * FROM {TABLE}"))
        await conn.execute(text(f"DROP TABLE {TABLE}"))

    assert ops(registry) == {"select": 2, "insert": 3, "update": 1, "delete": 1, "other": 3}
    assert tx(registry, "commit") == 1


async def test_statement_errors_are_counted_by_the_class_handle_error_sees(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = pg_engine()
    exporter.instrument(engine)
    seen: list[str] = []

    @event.listens_for(engine.sync_engine, "handle_error")
    def remember(ctx: object) -> None:
        seen.append(type(ctx.original_exception).__name__)  # type: ignore[attr-defined]

    for _ in range(2):
        with pytest.raises(sa_exc.DBAPIError):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1 / 0"))
    with pytest.raises(sa_exc.ProgrammingError):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT * FROM core_no_such_table"))

    # handle_error sees the asyncpg adapter's classes: for division by zero a bare `Error` up to
    # SQLAlchemy 2.0.58 and 2.1.9 (no mapping; chained to the driver's DivisionByZeroError), `DataError`
    # from 2.0.59 (it maps the driver's data exceptions); ProgrammingError for a missing table.
    assert seen[2:] == ["ProgrammingError"]
    assert seen[:2] in (["Error", "Error"], ["DataError", "DataError"])
    # A bare `Error` says nothing: then the label names the driver's class; a mapped class names itself.
    division = "DivisionByZeroError" if seen[0] == "Error" else "DataError"
    assert sample(registry, "sqlalchemy_statement_errors_total", pool=PG_NAME, error=division) == 2
    assert sample(registry, "sqlalchemy_statement_errors_total", pool=PG_NAME, error="ProgrammingError") == 1
    assert sample(registry, "sqlalchemy_statement_errors_total", pool=PG_NAME, error="Error") is None
    assert sample(registry, "sqlalchemy_pool_disconnects_total", pool=PG_NAME) == 0
    assert sample(registry, "sqlalchemy_exporter_errors_total", pool=PG_NAME) == 0
    # The failed ones are rolled back.
    assert tx(registry, "rollback") == 3


async def test_connect_errors_by_exception_class(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = pg_engine("postgresql+asyncpg://postgres@127.0.0.1:1/test", pool_size=1)
    handle = exporter.instrument(engine)
    for _ in range(2):
        # Not a DBAPI error, so SQLAlchemy lets it through unwrapped.
        with pytest.raises(ConnectionRefusedError):
            async with engine.connect():
                pass

    name = handle.name
    assert name == "127.0.0.1:1/test"
    error = "ConnectionRefusedError"
    assert [s for s in _connect_error_labels(registry) if s["pool"] == name] == [{"pool": name, "error": error}]
    assert sample(registry, "sqlalchemy_pool_connect_errors_total", pool=name, error=error) == 2
    assert sample(registry, "sqlalchemy_pool_connections_created_total", pool=name) == 0
    assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=name) == 0
    assert sample(registry, "sqlalchemy_pool_pending_requests", pool=name) == 0
    assert sample(registry, "sqlalchemy_pool_connections", pool=name, state="used") == 0
    assert sample(registry, "sqlalchemy_statement_errors_total", pool=name, error=error) is None
    assert sample(registry, "sqlalchemy_pool_disconnects_total", pool=name) == 0


def _connect_error_labels(registry: CollectorRegistry) -> list[dict[str, str]]:
    return [
        dict(s.labels)
        for m in registry.collect()
        for s in m.samples
        if s.name == "sqlalchemy_pool_connect_errors_total"
    ]


def test_sync_orm_session_commits_and_rollbacks(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/orm.db")
    sync_engines.append(engine)
    Base.metadata.create_all(engine)
    handle = exporter.instrument(engine)
    name = handle.name

    for i in range(7):
        with Session(engine) as session, session.begin():
            session.add(Item(id=i, n=i))
    for _ in range(3):
        with Session(engine) as session:
            session.add(Item(id=100, n=0))
            session.flush()
            session.rollback()
    with Session(engine) as session:
        assert session.scalar(select(Item.n).where(Item.id == 6)) == 6

    assert tx(registry, "commit", name) == 7
    # The read-only session's transaction ends in a rollback when it closes.
    assert tx(registry, "rollback", name) == 3 + 1
    assert ops(registry, name) == {"insert": 7 + 3, "select": 1}


async def test_async_orm_session_commits_and_rollbacks(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = pg_engine()
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.drop_all)
        await conn.run_sync(Base.metadata.create_all)
    exporter.instrument(engine)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    try:
        for i in range(7):
            async with sessions() as session, session.begin():
                session.add(Item(id=i, n=i))
        for _ in range(3):
            async with sessions() as session:
                session.add(Item(id=100, n=0))
                await session.flush()
                await session.rollback()
        async with sessions() as session:
            item = await session.get(Item, 3)
            assert item is not None
            item.n = 30
            await session.delete(await session.get(Item, 4))
            await session.commit()
            assert isinstance(session, AsyncSession)

        assert tx(registry, "commit") == 8
        assert tx(registry, "rollback") == 3
        assert ops(registry) == {"insert": 7 + 3, "select": 2, "update": 1, "delete": 1}
        assert sample(registry, "sqlalchemy_pool_connections", pool=PG_NAME, state="used") == 0
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)


async def test_connect_error_from_the_server_names_the_driver_class(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = pg_engine("postgresql+asyncpg://postgres@127.0.0.1:5432/core_no_such_database")
    handle = exporter.instrument(engine)
    # SQLAlchemy 2.1 wraps a failed asyncpg connect in DBAPIError; 2.0 lets the driver's error out.
    with pytest.raises((sa_exc.DBAPIError, asyncpg.PostgresError), match="does not exist"):
        async with engine.connect():
            pass
    assert [s["error"] for s in _connect_error_labels(registry) if s["pool"] == handle.name] == [
        "InvalidCatalogNameError"
    ]
    assert (
        sample(registry, "sqlalchemy_pool_connect_errors_total", pool=handle.name, error="InvalidCatalogNameError") == 1
    )
