"""asyncio task cancellation while waiting for a connection and while holding one."""

from __future__ import annotations

import asyncio
import gc
import warnings

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from sqlalchemy_pool_exporter import Exporter

pytestmark = pytest.mark.reliability


async def _until(condition, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met")


async def test_cancel_while_waiting(
    make_engine, registry: CollectorRegistry, exporter: Exporter, at_rest, live_cluster
) -> None:
    """Fault: 20 tasks wait on an exhausted pool (size 1) and are cancelled before it frees up.

    Each task ends in CancelledError, as without us; pending drops from 20 to 0 at once; no timeout
    and no connect error is counted; the pool then serves normally.
    """
    engine, app = make_engine(pool_size=1, max_overflow=0, pool_timeout=10)
    handle = exporter.instrument(engine, name="cancel-wait")
    s = registry.get_sample_value
    p = {"pool": "cancel-wait"}
    held = await engine.connect()
    await held.execute(text("SELECT 1"))

    async def wait_for_connection() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    waiters = [asyncio.create_task(wait_for_connection()) for _ in range(20)]
    await _until(lambda: s("sqlalchemy_pool_pending_requests", p) == 20)
    assert s("sqlalchemy_pool_oldest_pending_seconds", p) > 0
    for t in waiters:
        t.cancel()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    assert s("sqlalchemy_pool_pending_requests", p) == 0
    assert s("sqlalchemy_pool_oldest_pending_seconds", p) == 0
    assert s("sqlalchemy_pool_connections", {**p, "state": "used"}) == 1
    await held.close()

    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    assert s("sqlalchemy_pool_checkouts_total", p) == 2
    assert s("sqlalchemy_pool_timeouts_total", p) == 0
    assert handle.stats.connect_errors == {}
    assert s("sqlalchemy_exporter_errors_total", p) == 0
    await at_rest(handle, registry, live_cluster, app)


async def test_cancel_while_holding(
    make_engine, registry: CollectorRegistry, exporter: Exporter, witness, at_rest, live_cluster
) -> None:
    """Fault: 5 tasks are cancelled in the middle of a statement, inside `async with engine.connect()`.

    Each task ends in CancelledError, as without us; SQLAlchemy returns or discards each connection
    and our used gauge, checkout table and counts follow it exactly, back to zero.
    """
    engine, app = make_engine(pool_size=5, max_overflow=0, pool_timeout=5)
    handle = exporter.instrument(engine, name="cancel-hold")
    seen = witness(engine)
    s = registry.get_sample_value
    p = {"pool": "cancel-hold"}

    async def hold() -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(30)"))

    tasks = [asyncio.create_task(hold()) for _ in range(5)]
    await _until(lambda: s("sqlalchemy_pool_connections", {**p, "state": "used"}) == 5)
    await asyncio.sleep(0.1)  # let the statements reach the server
    for t in tasks:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results), results
    await _until(lambda: not handle.stats.checkouts)
    gc.collect()
    assert s("sqlalchemy_pool_connections", {**p, "state": "used"}) == 0
    assert s("sqlalchemy_pool_checkouts_total", p) == seen.events["checkout"] == 5
    assert s("sqlalchemy_pool_use_seconds_count", p) == seen.events["checkin"] == 5
    assert s("sqlalchemy_pool_connections_leaked_total", p) == 0
    assert s("sqlalchemy_pool_invalidations_total", {**p, "kind": "hard"}) == seen.events["invalidate"]
    assert s("sqlalchemy_pool_connections_closed_total", p) == seen.events["close"] + seen.events["close_detached"]
    async with engine.connect() as conn:
        assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    assert s("sqlalchemy_exporter_errors_total", p) == 0
    await at_rest(handle, registry, live_cluster, app)


async def test_dropped_connection_reclaimed_by_gc(
    make_engine, registry: CollectorRegistry, exporter: Exporter, witness, at_rest, live_cluster
) -> None:
    """Fault: a cancelled task leaves 3 AsyncConnections unclosed; the garbage collector reclaims them.

    SQLAlchemy detaches and closes each one (with its own warning); we count exactly 3 leaks, the used
    gauge and our checkout table go back to zero, and the closes are counted.
    """
    engine, app = make_engine(pool_size=5, max_overflow=0)
    handle = exporter.instrument(engine, name="gc-leak")
    seen = witness(engine)
    s = registry.get_sample_value
    p = {"pool": "gc-leak"}
    gate, ready = asyncio.Event(), asyncio.Event()

    async def leak() -> None:
        conns = [await engine.connect() for _ in range(3)]
        for c in conns:
            await c.execute(text("SELECT 1"))
        ready.set()
        await gate.wait()  # cancelled here, never closing what it holds

    task = asyncio.create_task(leak())
    await asyncio.wait_for(ready.wait(), 10)
    assert s("sqlalchemy_pool_connections", {**p, "state": "used"}) == 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    del task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SQLAlchemy's own "connection not returned" warning
        for _ in range(3):
            gc.collect()
            await asyncio.sleep(0.01)
    await _until(lambda: not handle.stats.checkouts)
    assert s("sqlalchemy_pool_connections_leaked_total", p) == 3
    assert s("sqlalchemy_pool_connections", {**p, "state": "used"}) == 0
    assert s("sqlalchemy_pool_checkouts_total", p) == 3
    assert s("sqlalchemy_pool_connections_closed_total", p) == seen.events["close"] + seen.events["close_detached"]
    assert s("sqlalchemy_exporter_errors_total", p) == 0
    await at_rest(handle, registry, live_cluster, app)
