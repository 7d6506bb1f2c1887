"""instrument()/uninstrument(): one handle per engine, symmetric teardown, weak engines, own failures."""

from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import Pool

import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.instrumentation.dialect import STATEMENT_METHODS, TRANSACTION_METHODS

from ..conftest import PG_NAME, PgEngineFactory, sample, series


def pool_labels(registry: CollectorRegistry) -> set[str]:
    return {labels["pool"] for labels in series(registry, "sqlalchemy_pool_checkouts_total")}


async def test_instrument_twice_returns_the_same_handle(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = pg_engine()
    handle = exporter.instrument(engine)
    assert exporter.instrument(engine) is handle
    assert exporter.instrument(engine.sync_engine, name=PG_NAME) is handle
    # An execution_options() copy shares the engine's pool and dialect: the same engine to us.
    assert exporter.instrument(engine.sync_engine.execution_options(isolation_level="AUTOCOMMIT")) is handle
    assert pool_exporter.handle_for(engine) is handle
    assert pool_exporter.handle_for(engine.sync_engine) is handle
    assert exporter.handles() == [handle]
    assert handle not in pool_exporter.handles()  # the default Exporter's, not ours
    assert len(handle.hooks.listeners) == len({(n, id(f)) for n, f in handle.hooks.listeners})
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    # Listeners were attached once: one checkout counted once.
    assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=PG_NAME) == 1
    assert sample(registry, "sqlalchemy_transactions_total", pool=PG_NAME, outcome="close") == 1


async def test_uninstrument_removes_listeners_wrapper_and_series_and_is_idempotent(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = pg_engine()
    sync = engine.sync_engine
    handle = exporter.instrument(engine)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    # Also wrap the pool dispose() puts in place, so both must be restored.
    first_pool = sync.pool
    await engine.dispose()
    second_pool = sync.pool
    assert "connect" in vars(first_pool)
    assert "connect" in vars(second_pool)
    listeners = list(handle.hooks.listeners)
    assert {name for name, _ in listeners} == {
        "detach", "connect", "close", "close_detached", "invalidate", "soft_invalidate",
    }  # fmt: skip
    # Returns are seen by wrapping each pool's _return_conn, not through the `checkin` event.
    assert not sync.pool.dispatch.checkin
    assert all(event.contains(sync, name, fn) for name, fn in listeners)
    # Connections, transactions and statements are seen through this engine's dialect methods.
    wrapped = {"connect", "is_disconnect", *TRANSACTION_METHODS, *STATEMENT_METHODS}
    assert wrapped <= set(vars(sync.dialect))
    assert pool_labels(registry) == {PG_NAME}

    handle.uninstrument()

    assert not any(event.contains(sync, name, fn) for name, fn in listeners)
    assert not wrapped & set(vars(sync.dialect))
    for pool in (first_pool, second_pool):
        assert "connect" not in vars(pool) and "_return_conn" not in vars(pool)
        assert pool.connect.__func__ is type(pool).connect  # type: ignore[attr-defined]
        assert type(pool).connect is Pool.connect
    assert pool_labels(registry) == set()
    assert series(registry, "sqlalchemy_pool_connections") == []
    assert pool_exporter.handle_for(engine) is None
    assert handle not in exporter.handles()
    assert "_sqlalchemy_pool_exporter_handle" not in vars(sync.dialect)
    # Idempotent, by the handle and by the engine.
    handle.uninstrument()
    pool_exporter.uninstrument(engine)
    pool_exporter.uninstrument(create_engine("sqlite://"))
    assert handle.active is False
    # The engine still works and nothing is counted any more.
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    assert series(registry, "sqlalchemy_pool_connections") == []

    # Instrumenting again starts afresh under the same default name.
    again = exporter.instrument(engine)
    assert again is not handle
    assert again.name == PG_NAME
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=PG_NAME) == 1
    assert sample(registry, "sqlalchemy_pool_connections", pool=PG_NAME, state="idle") == 1


def test_sync_engine_is_held_weakly_and_its_series_vanish(
    registry: CollectorRegistry, exporter: Exporter, tmp_path: Path
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/weak.db")
    handle = exporter.instrument(engine)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert pool_labels(registry) == {handle.name}
    ref = weakref.ref(engine)

    engine.dispose()
    del engine, conn
    gc.collect()

    assert ref() is None
    assert handle.engine is None
    assert handle.read() is None
    assert pool_labels(registry) == set()
    assert series(registry, "sqlalchemy_pool_connections") == []
    assert handle not in pool_exporter.handles()
    # The build info stays: it is not a pool series.
    assert sample(registry, "sqlalchemy_exporter_build_info", version=pool_exporter.__version__) == 1
    handle.uninstrument()


async def test_async_engine_is_held_weakly_and_its_series_vanish(
    registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    handle = exporter.instrument(engine)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    assert pool_labels(registry) == {"sqlite:memory"}
    await engine.dispose()
    refs = [weakref.ref(engine), weakref.ref(engine.sync_engine)]

    del engine, conn
    gc.collect()

    assert [r() for r in refs] == [None, None]
    assert pool_labels(registry) == set()
    handle.uninstrument()


async def test_several_engines_get_their_own_pool_label(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter, caplog: pytest.LogCaptureFixture
) -> None:
    first, _ = pg_engine()
    second, _ = pg_engine()
    named, _ = pg_engine()
    h1 = exporter.instrument(first)
    h2 = exporter.instrument(second)
    h3 = exporter.instrument(named, name="reports")
    assert (h1.name, h2.name, h3.name) == (PG_NAME, f"{PG_NAME}#2", "reports")

    for engine, n in ((first, 3), (second, 1), (named, 2)):
        for _ in range(n):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

    assert pool_labels(registry) == {PG_NAME, f"{PG_NAME}#2", "reports"}
    assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=PG_NAME) == 3
    assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=f"{PG_NAME}#2") == 1
    assert sample(registry, "sqlalchemy_pool_checkouts_total", pool="reports") == 2
    for name in (PG_NAME, f"{PG_NAME}#2", "reports"):
        assert sample(registry, "sqlalchemy_pool_connections", pool=name, state="idle") == 1
        assert sample(registry, "sqlalchemy_pool_connections_created_total", pool=name) == 1

    # An explicit name a live engine uses is not an error (an engine factory, the app and Alembic
    # from one URL): the newcomer gets the next free suffix, and one WARNING says so.
    fourth, _ = pg_engine()
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_pool_exporter"):
        assert exporter.instrument(fourth, name="reports").name == "reports#2"
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "'reports'" in warning.getMessage() and "'reports#2'" in warning.getMessage()
    # Names are per Exporter: the same name in another registry is fine.
    fifth, _ = pg_engine()
    with Exporter(CollectorRegistry()) as other:
        assert other.instrument(fifth, name="reports").name == "reports"

    # A freed name can be taken again.
    h3.uninstrument()
    sixth, _ = pg_engine()
    assert exporter.instrument(sixth, name="reports").name == "reports"


def test_a_listener_bug_never_reaches_the_app(
    registry: CollectorRegistry,
    exporter: Exporter,
    sync_engines: list[Engine],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="sqlalchemy_pool_exporter")
    engine = create_engine("sqlite://")
    sync_engines.append(engine)
    handle = exporter.instrument(engine)

    def broken(operation: str) -> None:
        raise RuntimeError("exporter bug")

    monkeypatch.setattr(handle.stats, "statement_histogram", broken)
    with engine.connect() as conn:
        for _ in range(3):
            assert conn.execute(text("SELECT 42")).scalar_one() == 42

    assert sample(registry, "sqlalchemy_exporter_errors_total", pool=handle.name) == 3
    errors = [r for r in caplog.records if r.name == "sqlalchemy_pool_exporter" and r.levelno == logging.ERROR]
    assert len(errors) == 1  # rate-limited per listener
    assert "'statement'" in errors[0].getMessage()
    assert errors[0].exc_info is not None and str(errors[0].exc_info[1]) == "exporter bug"
    # Everything else kept counting.
    assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=handle.name) == 1


def test_a_failing_reading_is_counted_and_other_pools_still_export(
    registry: CollectorRegistry,
    exporter: Exporter,
    sync_engines: list[Engine],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="sqlalchemy_pool_exporter")
    broken_engine, healthy_engine = create_engine("sqlite://"), create_engine("sqlite://")
    sync_engines.extend((broken_engine, healthy_engine))
    broken = exporter.instrument(broken_engine, name="broken")
    exporter.instrument(healthy_engine, name="healthy")

    def boom() -> None:
        raise RuntimeError("reading failed")

    monkeypatch.setattr(broken, "read", boom)
    assert sample(registry, "sqlalchemy_pool_connections", pool="healthy", state="used") == 0
    assert pool_labels(registry) == {"healthy"}
    assert broken.stats.errors == 2  # one per collect above
    monkeypatch.undo()
    assert sample(registry, "sqlalchemy_exporter_errors_total", pool="broken") == 2
    assert len([r for r in caplog.records if r.levelno == logging.ERROR and r.name == "sqlalchemy_pool_exporter"]) == 1


def test_instrument_rejects_what_is_not_an_engine_and_bad_options(
    registry: CollectorRegistry, exporter: Exporter
) -> None:
    with pytest.raises(TypeError, match="Engine or AsyncEngine"):
        exporter.instrument("sqlite://")  # type: ignore[arg-type]
    engine = create_engine("sqlite://")
    with pytest.raises(ValueError, match="namespace"):
        Exporter(CollectorRegistry(), namespace="bad-name")
    with pytest.raises(ValueError, match="namespace"):
        Exporter(CollectorRegistry(), namespace="pööl")
    with pytest.raises(ValueError, match="finite"):
        exporter.instrument(engine, buckets={"wait": [0.1, float("inf")]})
    with pytest.raises(ValueError, match="finite"):
        exporter.instrument(engine, leak_threshold=float("nan"))
    with pytest.raises(ValueError, match="buckets"):
        exporter.instrument(engine, buckets={"wait": [1.0, 0.5]})
    with pytest.raises(ValueError, match="bucket set"):
        exporter.instrument(engine, buckets={"nope": [1.0]})
    with pytest.raises(ValueError, match="name"):
        exporter.instrument(engine, name="")
    assert pool_exporter.handle_for(engine) is None


def test_namespace_and_buckets_options(registry: CollectorRegistry, sync_engines: list[Engine]) -> None:
    engine = create_engine("sqlite://")
    sync_engines.append(engine)
    exporter = Exporter(registry, namespace="app_db")
    handle = exporter.instrument(engine, buckets={"wait": [0.5, 1.0]})
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert sample(registry, "app_db_pool_checkouts_total", pool=handle.name) == 1
    assert sample(registry, "app_db_pool_wait_seconds_bucket", pool=handle.name, le="0.5") == 1
    assert sample(registry, "app_db_pool_wait_seconds_bucket", pool=handle.name, le="+Inf") == 1
    assert sample(registry, "app_db_pool_wait_seconds_bucket", pool=handle.name, le="0.0001") is None
    assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=handle.name) is None
