"""Pool state and pool events against PostgreSQL: timeouts, waiters, no drift, dispose()."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import warnings
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from sqlalchemy_pool_exporter import Exporter

from ..conftest import PG_NAME, PgEngineFactory, poll, poll_sync, real_connections, sample, terminate_backend

P = {"pool": PG_NAME}


def used(registry: CollectorRegistry, pool: str = PG_NAME) -> float | None:
    return sample(registry, "sqlalchemy_pool_connections", pool=pool, state="used")


def idle(registry: CollectorRegistry, pool: str = PG_NAME) -> float | None:
    return sample(registry, "sqlalchemy_pool_connections", pool=pool, state="idle")


async def hold_six(engine: AsyncEngine, registry: CollectorRegistry) -> dict[str, float]:
    """3 holders take every connection of a 2+1 pool, 3 more callers wait and time out.

    Returns what was read from the registry while the waiters were waiting and while the
    holders still held their connections.
    """
    release = asyncio.Event()
    acquired = 0

    async def holder() -> None:
        nonlocal acquired
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            acquired += 1
            await release.wait()

    holders = [asyncio.create_task(holder()) for _ in range(3)]
    await poll(lambda: acquired == 3)
    waiters = [asyncio.create_task(holder()) for _ in range(3)]
    seen: dict[str, float] = {}
    # The waiters have 0.2 s before they time out: read while they wait.
    await poll(lambda: (sample(registry, "sqlalchemy_pool_pending_requests", **P) or 0) == 3, step=0.001)
    seen["pending"] = sample(registry, "sqlalchemy_pool_pending_requests", **P) or 0
    seen["oldest_pending"] = sample(registry, "sqlalchemy_pool_oldest_pending_seconds", **P) or 0
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert [type(r) for r in results] == [sa_exc.TimeoutError] * 3
    seen["used"] = used(registry) or 0
    seen["idle"] = idle(registry) or 0
    seen["overflow"] = sample(registry, "sqlalchemy_pool_overflow_connections", **P) or 0
    seen["oldest_checkout"] = sample(registry, "sqlalchemy_pool_oldest_checkout_seconds", **P) or 0
    seen["pending_after"] = sample(registry, "sqlalchemy_pool_pending_requests", **P) or 0
    release.set()
    await asyncio.gather(*holders)
    return seen


async def test_six_holders_on_a_two_plus_one_pool(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, app = pg_engine(pool_size=2, max_overflow=1, pool_timeout=0.2)
    exporter.instrument(engine)

    seen = await hold_six(engine, registry)

    assert seen["pending"] == 3
    assert seen["oldest_pending"] > 0
    assert seen["used"] == 3
    assert seen["idle"] == 0
    assert seen["overflow"] == 1
    assert seen["oldest_checkout"] > 0
    assert seen["pending_after"] == 0
    assert sample(registry, "sqlalchemy_pool_timeouts_total", **P) == 3
    assert sample(registry, "sqlalchemy_pool_checkouts_total", **P) == 3
    assert sample(registry, "sqlalchemy_pool_wait_seconds_count", **P) == 3
    assert sample(registry, "sqlalchemy_pool_use_seconds_count", **P) == 3
    assert sample(registry, "sqlalchemy_pool_connections_created_total", **P) == 3
    assert sample(registry, "sqlalchemy_pool_create_seconds_count", **P) == 3
    # The overflow connection is closed when it comes back to a full pool.
    assert sample(registry, "sqlalchemy_pool_connections_closed_total", **P) == 1
    assert sample(registry, "sqlalchemy_pool_max_connections", **P) == 3
    assert sample(registry, "sqlalchemy_pool_size", **P) == 2
    assert sample(registry, "sqlalchemy_pool_timeout_seconds", **P) == 0.2
    # After: nothing held, nobody waiting.
    assert used(registry) == 0
    assert idle(registry) == 2
    assert sample(registry, "sqlalchemy_pool_overflow_connections", **P) == 0
    assert sample(registry, "sqlalchemy_pool_pending_requests", **P) == 0
    assert sample(registry, "sqlalchemy_pool_oldest_pending_seconds", **P) == 0
    assert sample(registry, "sqlalchemy_pool_oldest_checkout_seconds", **P) == 0
    assert await real_connections(app) == 2


async def test_timeout_logs_one_warning_with_the_pool_numbers(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter, caplog: pytest.LogCaptureFixture
) -> None:
    engine, _ = pg_engine(pool_size=2, max_overflow=1, pool_timeout=0.2)
    exporter.instrument(engine)
    caplog.set_level(logging.INFO, logger="sqlalchemy_pool_exporter")

    await hold_six(engine, registry)

    warnings_ = [r for r in caplog.records if r.name == "sqlalchemy_pool_exporter" and r.levelno == logging.WARNING]
    assert len(warnings_) == 3
    for record in warnings_:
        message = record.getMessage()
        assert "timed out" in message
        for part in ("size=2", "used=3", "idle=0", "overflow=1", "timeout=0.2s"):
            assert part in message
        assert "pending=" in message
        assert record.__dict__["pool"] == PG_NAME
        assert (record.size, record.used, record.idle, record.overflow, record.timeout) == (2, 3, 0, 1, 0.2)  # type: ignore[attr-defined]
    # The first to give up still sees the other two waiting; the last one sees nobody.
    assert sorted(r.pending for r in warnings_) == [0, 1, 2]  # type: ignore[attr-defined]


async def test_waits_pending_and_timeouts_keep_working_after_dispose(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, app = pg_engine(pool_size=2, max_overflow=1, pool_timeout=0.2)
    exporter.instrument(engine)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    old_pool = engine.sync_engine.pool

    await engine.dispose()

    assert engine.sync_engine.pool is not old_pool
    assert sample(registry, "sqlalchemy_pool_connections_closed_total", **P) == 1
    assert used(registry) == 0
    assert idle(registry) == 0
    seen = await hold_six(engine, registry)
    assert seen["pending"] == 3
    assert seen["oldest_pending"] > 0
    assert seen["overflow"] == 1
    assert seen["used"] == 3
    assert sample(registry, "sqlalchemy_pool_timeouts_total", **P) == 3
    assert sample(registry, "sqlalchemy_pool_checkouts_total", **P) == 1 + 3
    assert sample(registry, "sqlalchemy_pool_wait_seconds_count", **P) == 1 + 3
    assert sample(registry, "sqlalchemy_pool_connections_created_total", **P) == 1 + 3
    assert sample(registry, "sqlalchemy_pool_pending_requests", **P) == 0
    assert sample(registry, "sqlalchemy_pool_oldest_pending_seconds", **P) == 0
    assert used(registry) == 0
    assert idle(registry) == 2
    assert await real_connections(app) == 2


async def assert_no_drift(engine: AsyncEngine, registry: CollectorRegistry, app: str) -> None:
    pool = engine.sync_engine.pool
    in_use = used(registry)
    at_rest = idle(registry)
    assert in_use == pool.checkedout()  # type: ignore[attr-defined]
    assert in_use is not None and at_rest is not None
    assert in_use + at_rest == await real_connections(app)


async def test_no_drift_through_invalidate_detach_recycle_preping_dispose_and_gc(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, app = pg_engine(pool_size=2, max_overflow=1, pool_pre_ping=True)
    exporter.instrument(engine)
    created = closed = checkouts = 0

    # Three at once (one overflow), all returned: the overflow one is closed.
    conns = [await engine.connect() for _ in range(3)]
    for c in conns:
        await c.execute(text("SELECT 1"))
    assert used(registry) == 3
    await assert_no_drift(engine, registry, app)
    for c in conns:
        await c.close()
    created, closed, checkouts = created + 3, closed + 1, checkouts + 3
    await assert_no_drift(engine, registry, app)
    assert_counts(registry, created, closed, checkouts)

    # Hard invalidate: the DBAPI connection is closed; its slot comes back empty.
    conn = await engine.connect()
    await conn.execute(text("SELECT 1"))
    await conn.invalidate()
    await conn.close()
    closed, checkouts = closed + 1, checkouts + 1
    await assert_no_drift(engine, registry, app)
    assert_counts(registry, created, closed, checkouts)
    assert sample(registry, "sqlalchemy_pool_invalidations_total", pool=PG_NAME, kind="hard") == 1

    # Soft invalidate: still open now, replaced at its next checkout.
    conn = await engine.connect()
    raw = await conn.get_raw_connection()
    raw.invalidate(soft=True)
    await conn.close()
    checkouts += 1
    await assert_no_drift(engine, registry, app)
    assert sample(registry, "sqlalchemy_pool_invalidations_total", pool=PG_NAME, kind="soft") == 1

    # Detach: the empty slot reconnects at checkout; the connection then leaves the pool and is
    # closed (close_detached) when the app closes it.
    conn = await engine.connect()
    raw = await conn.get_raw_connection()
    raw.detach()
    created, checkouts = created + 1, checkouts + 1
    assert used(registry) == 0
    await conn.close()
    closed += 1
    await assert_no_drift(engine, registry, app)
    assert_counts(registry, created, closed, checkouts)

    # Take both slots: the soft-invalidated one is closed and replaced, the empty one reconnects.
    a, b = await engine.connect(), await engine.connect()
    await a.execute(text("SELECT 1"))
    pid = (await b.execute(text("SELECT pg_backend_pid()"))).scalar_one()
    await a.close()
    await b.close()
    created, closed, checkouts = created + 2, closed + 1, checkouts + 2
    await assert_no_drift(engine, registry, app)
    assert_counts(registry, created, closed, checkouts)
    assert await real_connections(app) == 2

    # Pre-ping meets a connection the server killed: invalidated, closed, replaced.
    await terminate_backend(pid)
    # Take both so the killed one is surely pre-pinged.
    a, b = await engine.connect(), await engine.connect()
    await a.execute(text("SELECT 1"))
    await b.execute(text("SELECT 1"))
    await a.close()
    await b.close()
    checkouts += 2
    created, closed = created + 1, closed + 1
    assert sample(registry, "sqlalchemy_pool_disconnects_total", **P) == 1
    assert_counts(registry, created, closed, checkouts)
    assert sample(registry, "sqlalchemy_pool_invalidations_total", pool=PG_NAME, kind="hard") == 2
    await assert_no_drift(engine, registry, app)

    # A connection dropped without close and garbage-collected. The disconnect above made the
    # pool recycle every older connection at its next checkout: this one is closed and reopened
    # first, then terminated by the garbage collector.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        leaked = await engine.connect()
        await leaked.execute(text("SELECT 1"))
        checkouts += 1
        del leaked
        gc.collect()
    created, closed = created + 1, closed + 2
    await poll(lambda: sample(registry, "sqlalchemy_pool_connections_leaked_total", **P) == 1)
    assert used(registry) == 0
    await poll_real(app, 1)
    await assert_no_drift(engine, registry, app)
    assert_counts(registry, created, closed, checkouts)

    # dispose(): the idle ones are closed and the pool object replaced.
    await engine.dispose()
    closed += 1
    await assert_no_drift(engine, registry, app)
    assert used(registry) == 0
    assert idle(registry) == 0

    # The replaced pool is read too.
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        assert used(registry) == 1
    created, checkouts = created + 1, checkouts + 1
    await assert_no_drift(engine, registry, app)

    assert (created, closed, checkouts) == (9, 8, 12)  # one connection still open, idle
    assert_counts(registry, created, closed, checkouts)
    assert sample(registry, "sqlalchemy_pool_connections_leaked_total", **P) == 1
    assert sample(registry, "sqlalchemy_pool_invalidations_total", pool=PG_NAME, kind="hard") == 2
    assert sample(registry, "sqlalchemy_pool_invalidations_total", pool=PG_NAME, kind="soft") == 1
    assert sample(registry, "sqlalchemy_pool_disconnects_total", **P) == 1
    assert sample(registry, "sqlalchemy_exporter_errors_total", **P) == 0


def assert_counts(registry: CollectorRegistry, created: int, closed: int, checkouts: int) -> None:
    assert sample(registry, "sqlalchemy_pool_connections_created_total", **P) == created
    assert sample(registry, "sqlalchemy_pool_connections_closed_total", **P) == closed
    assert sample(registry, "sqlalchemy_pool_checkouts_total", **P) == checkouts
    assert sample(registry, "sqlalchemy_pool_use_seconds_count", **P) == checkouts


async def poll_real(app: str, expected: int) -> None:
    for _ in range(500):
        if await real_connections(app) == expected:
            return
        await asyncio.sleep(0.01)
    assert await real_connections(app) == expected


async def test_recycle_closes_and_reopens_without_drift(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, app = pg_engine(pool_size=2, max_overflow=0, pool_recycle=3600)
    exporter.instrument(engine)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    # Age the pooled connection past pool_recycle instead of waiting an hour.
    pool = engine.sync_engine.pool
    records = []

    @event.listens_for(pool, "checkout")
    def remember(dbapi_connection: object, record: object, proxy: object) -> None:
        records.append(record)

    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    (record,) = records
    record.starttime -= 7200  # type: ignore[attr-defined]
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        assert used(registry) == 1
    assert sample(registry, "sqlalchemy_pool_connections_created_total", **P) == 2
    assert sample(registry, "sqlalchemy_pool_connections_closed_total", **P) == 1
    assert sample(registry, "sqlalchemy_pool_checkouts_total", **P) == 3
    await assert_no_drift(engine, registry, app)
    assert await real_connections(app) == 1


def test_sync_connection_garbage_collected_is_returned_and_counted_as_leaked(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/core.db", poolclass=QueuePool, pool_size=1, max_overflow=0)
    sync_engines.append(engine)
    handle = exporter.instrument(engine)
    name = handle.name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conn = engine.connect()
        conn.execute(text("SELECT 1"))
        assert used(registry, name) == 1
        del conn
        gc.collect()
    # A sync pool takes the connection back (checkin), so it stays open and idle.
    assert sample(registry, "sqlalchemy_pool_connections_leaked_total", pool=name) == 1
    assert used(registry, name) == 0
    assert idle(registry, name) == 1
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    assert engine.pool.checkedin() == 1  # type: ignore[attr-defined]
    assert sample(registry, "sqlalchemy_pool_connections_created_total", pool=name) == 1
    assert sample(registry, "sqlalchemy_pool_connections_closed_total", pool=name) == 0
    assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=name) == 1
    assert sample(registry, "sqlalchemy_pool_use_seconds_count", pool=name) == 1


def test_sync_threads_waiting_and_timing_out(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/threads.db", pool_size=1, max_overflow=0, pool_timeout=0.3)
    sync_engines.append(engine)
    name = exporter.instrument(engine).name
    failures: list[BaseException] = []

    def wait_for_a_connection() -> None:
        try:
            with engine.connect():
                pass
        except sa_exc.TimeoutError as exc:
            failures.append(exc)

    with engine.connect() as held:
        held.execute(text("SELECT 1"))
        threads = [threading.Thread(target=wait_for_a_connection) for _ in range(2)]
        for t in threads:
            t.start()
        poll_sync(lambda: sample(registry, "sqlalchemy_pool_pending_requests", pool=name) == 2, step=0.001)
        assert (sample(registry, "sqlalchemy_pool_oldest_pending_seconds", pool=name) or 0) > 0
        for t in threads:
            t.join(10)

    assert len(failures) == 2
    assert sample(registry, "sqlalchemy_pool_timeouts_total", pool=name) == 2
    assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=name) == 1
    assert sample(registry, "sqlalchemy_pool_pending_requests", pool=name) == 0
    assert sample(registry, "sqlalchemy_pool_oldest_pending_seconds", pool=name) == 0
    assert used(registry, name) == 0
    assert idle(registry, name) == 1
