"""Transactions, savepoints, statements and their errors, Core and ORM alike."""

from __future__ import annotations

import asyncio
import gc
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import Integer, create_engine, event, select, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.engine.base import Connection, RootTransaction
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_pool_exporter import Exporter, compat, session_scope

from ..conftest import PG_NAME, PG_URL, PgEngineFactory, sample

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
    # Closed with the transaction open: SQLAlchemy sends ROLLBACK, but nobody rolled back.
    for _ in range(3):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    assert tx(registry, "commit") == 7
    assert tx(registry, "rollback") == 5
    assert tx(registry, "close") == 3
    assert sample(registry, "sqlalchemy_transaction_seconds_count", pool=PG_NAME, outcome="commit") == 7
    assert sample(registry, "sqlalchemy_transaction_seconds_count", pool=PG_NAME, outcome="rollback") == 5
    assert sample(registry, "sqlalchemy_transaction_seconds_count", pool=PG_NAME, outcome="close") == 3
    assert ops(registry) == {"select": 15}


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
    assert tx(registry, "close") == 0


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
    # PostgreSQL rolls the failed ones back, but the application did not (no rollback(), no begin()
    # block): they end as the connection closes.
    assert tx(registry, "rollback") == 0
    assert tx(registry, "close") == 3


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
    assert tx(registry, "rollback", name) == 3
    # The read-only session's transaction ends with a ROLLBACK when it closes: a close, not a rollback.
    assert tx(registry, "close", name) == 1
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
        assert tx(registry, "close") == 0
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


# -- how transactions end: commit, rollback (the application's) or close -----------------------------

PG_SYNC_URL = PG_URL.replace("+asyncpg", "+psycopg")


class Note(Base):
    __tablename__ = f"core_notes_{os.getpid()}"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(Integer)


class Failed(Exception):
    """A request that fails in the application."""


def outcomes(registry: CollectorRegistry, pool: str = PG_NAME) -> dict[str, float | None]:
    return {outcome: tx(registry, outcome, pool) for outcome in ("commit", "rollback", "close")}


def timed(registry: CollectorRegistry, pool: str = PG_NAME) -> dict[str, float | None]:
    return {
        outcome: sample(registry, "sqlalchemy_transaction_seconds_count", pool=pool, outcome=outcome)
        for outcome in ("commit", "rollback", "close")
    }


# A unique constraint checked at COMMIT: the COMMIT itself fails.
DEFERRED = f"core_deferred_{os.getpid()}"


async def test_a_read_heavy_orm_workload_without_errors_never_rolls_back(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = pg_engine(pool_size=4, max_overflow=0)
    async with engine.begin() as conn:
        await conn.run_sync(Note.metadata.drop_all, tables=[Note.__table__])
        await conn.run_sync(Note.metadata.create_all, tables=[Note.__table__])
        await conn.execute(Note.__table__.insert(), [{"id": i, "n": i} for i in range(10)])
    exporter.instrument(engine)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def read(i: int) -> int | None:
        async with sessions() as session:  # the ORM read: its transaction ends as the session closes
            return await session.scalar(select(Note.n).where(Note.id == i % 10))

    async def write(i: int) -> None:
        async with sessions() as session, session.begin():
            (await session.get_one(Note, i)).n += 1

    try:
        results = await asyncio.gather(*(read(i) for i in range(60)), *(write(i) for i in range(4)))
        assert results[:60] == [i % 10 for i in range(60)]
        assert outcomes(registry) == {"commit": 4, "rollback": 0, "close": 60}
        assert timed(registry) == {"commit": 4, "rollback": 0, "close": 60}
        assert sample(registry, "sqlalchemy_exporter_errors_total", pool=PG_NAME) == 0
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(Note.metadata.drop_all, tables=[Note.__table__])


async def test_each_failed_request_is_one_rollback(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    """rollback() or an exception out of begin(), through every API: rollback = the failures, exactly."""
    engine, _ = pg_engine(pool_size=2, max_overflow=0)
    async with engine.begin() as conn:
        await conn.run_sync(Note.metadata.drop_all, tables=[Note.__table__])
        await conn.run_sync(Note.metadata.create_all, tables=[Note.__table__])
        await conn.execute(text(f"DROP TABLE IF EXISTS {DEFERRED}"))
        await conn.execute(text(f"CREATE TABLE {DEFERRED} (id int, UNIQUE (id) DEFERRABLE INITIALLY DEFERRED)"))
    exporter.instrument(engine)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    failed = 0
    try:
        for i in range(3):  # an exception inside session.begin()
            with pytest.raises(Failed):
                async with sessions() as session, session.begin():
                    session.add(Note(id=1000 + i, n=0))
                    await session.flush()
                    raise Failed
            failed += 1
        for i in range(2):  # the application's own rollback()
            async with sessions() as session:
                session.add(Note(id=2000 + i, n=0))
                await session.flush()
                await session.rollback()
            failed += 1
        async with sessions() as session, session.begin():  # a successful write, then its duplicate
            session.add(Note(id=1, n=1))
        with pytest.raises(sa_exc.IntegrityError):  # the flush inside commit() fails: the session rolls back
            async with sessions() as session:
                session.add(Note(id=1, n=2))
                await session.commit()
        failed += 1
        with pytest.raises(Failed):  # session_scope rolls back on any exception
            async with session_scope(sessions) as session:
                await session.scalar(select(Note.n))
                raise Failed
        failed += 1
        with pytest.raises(Failed):  # Core: an exception leaves engine.begin()
            async with engine.begin() as conn:
                await conn.execute(text("SELECT 1"))
                raise Failed
        failed += 1
        with pytest.raises(sa_exc.IntegrityError):  # the COMMIT itself fails; SQLAlchemy sends no ROLLBACK
            async with engine.begin() as conn:
                await conn.execute(text(f"INSERT INTO {DEFERRED} VALUES (1), (1)"))
        failed += 1
        for _ in range(5):  # reads, which only close
            async with sessions() as session:
                await session.scalar(select(Note.n).where(Note.id == 1))

        assert failed == 9
        assert outcomes(registry) == {"commit": 1, "rollback": failed, "close": 5}
        assert timed(registry) == {"commit": 1, "rollback": failed, "close": 5}
        assert sample(registry, "sqlalchemy_exporter_errors_total", pool=PG_NAME) == 0
        assert sample(registry, "sqlalchemy_pool_connections", pool=PG_NAME, state="used") == 0
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(Note.metadata.drop_all, tables=[Note.__table__])
            await conn.execute(text(f"DROP TABLE IF EXISTS {DEFERRED}"))


def test_a_sync_driver_from_threads_counts_each_outcome_exactly(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine]
) -> None:
    """psycopg, eight threads sharing the pool: reads close, failures roll back, writes commit."""
    engine = create_engine(PG_SYNC_URL, pool_size=4, max_overflow=0)
    sync_engines.append(engine)
    Note.metadata.drop_all(engine, tables=[Note.__table__])
    Note.metadata.create_all(engine, tables=[Note.__table__])
    name = exporter.instrument(engine).name

    def request(i: int) -> None:
        kind = i % 4
        if kind in (0, 1):  # half are reads
            with Session(engine) as session:
                assert session.scalar(select(Note.n).where(Note.id == -1)) is None
        elif kind == 2:  # a write
            with Session(engine) as session, session.begin():
                session.add(Note(id=i, n=i))
        elif i % 8 == 3:  # a failure inside begin()
            with pytest.raises(Failed), Session(engine) as session, session.begin():
                session.add(Note(id=i, n=i))
                session.flush()
                raise Failed
        else:  # an explicit rollback
            with Session(engine) as session:
                session.add(Note(id=i, n=i))
                session.flush()
                session.rollback()

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(request, range(400)))
        assert outcomes(registry, name) == {"commit": 100, "rollback": 100, "close": 200}
        assert timed(registry, name) == {"commit": 100, "rollback": 100, "close": 200}
        assert sample(registry, "sqlalchemy_exporter_errors_total", pool=name) == 0
    finally:
        Note.metadata.drop_all(engine, tables=[Note.__table__])


def test_outcomes_are_per_engine_and_survive_a_stacked_wrapper(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine]
) -> None:
    """An engine not instrumented counts nothing; another layer's wrapper on top of ours changes nothing;
    a connection dropped with its transaction open closes when the pool resets it."""
    ours, theirs = create_engine("sqlite://"), create_engine("sqlite://")
    sync_engines.extend((ours, theirs))
    name = exporter.instrument(ours, name="ours").name
    for engine in (ours, theirs):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))  # close
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            conn.rollback()  # rollback
    assert outcomes(registry, name) == {"commit": 0, "rollback": 1, "close": 1}

    # A tracer stacked on our do_rollback: the wrapper looks past its frame.
    stacked = ours.dialect.do_rollback
    calls: list[object] = []

    def tracer(dbapi_connection: object) -> None:
        calls.append(dbapi_connection)
        stacked(dbapi_connection)

    ours.dialect.do_rollback = tracer  # type: ignore[method-assign]
    with ours.connect() as conn:
        conn.execute(text("SELECT 1"))
        conn.rollback()
    with ours.connect() as conn:
        conn.execute(text("SELECT 1"))
    with pytest.raises(Failed), ours.begin() as conn:
        conn.execute(text("SELECT 1"))
        raise Failed
    assert outcomes(registry, name) == {"commit": 0, "rollback": 3, "close": 2}
    # ROLLBACK three times, plus the pool's reset on the two returns whose transaction was already over.
    assert len(calls) == 3 + 2

    # Dropped unclosed with a transaction open: the pool's reset on return ends it.
    conn = ours.connect()
    conn.execute(text("SELECT 1"))
    del conn
    gc.collect()
    assert outcomes(registry, name) == {"commit": 0, "rollback": 3, "close": 3}
    assert sample(registry, "sqlalchemy_exporter_errors_total", pool=name) == 0


def test_without_the_transaction_chain_every_end_without_commit_is_a_rollback() -> None:
    """compat.transaction_ends checks each link; a SQLAlchemy that reshaped one gets the old count."""
    assert compat.TRANSACTION_ENDS
    assert compat.transaction_ends() == (
        RootTransaction._do_rollback.__code__,
        RootTransaction._do_close.__code__,
        Connection._rollback_impl.__code__,
        Connection._commit_impl.__code__,
    )

    class Reshaped(RootTransaction):
        __slots__ = ()

        def _close_impl(self, try_deactivate: bool = False) -> None:  # reaches ROLLBACK some other way
            self.connection.rollback()

    assert compat.transaction_ends(root=Reshaped) == (None, None, None, None)
