"""A pool exhaustion storm: far more concurrent callers than connections."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from sqlalchemy_pool_exporter import Exporter

pytestmark = pytest.mark.reliability

CALLERS = 200
POOL_SIZE = 5


async def test_exhaustion_storm(
    make_engine, registry: CollectorRegistry, exporter: Exporter, raised_by_us, at_rest, live_cluster
) -> None:
    """Fault: 200 callers at once on pool_size=5, max_overflow=0, pool_timeout=0.4 s, each holding 50 ms.

    Every caller either gets a connection or the pool's own TimeoutError, as without us; our
    timeout count equals the TimeoutErrors the app caught, checkouts equal the successes; while the
    storm rages no gauge is ever negative or above its bound; afterwards nothing is stuck.
    """
    engine, app = make_engine(pool_size=POOL_SIZE, max_overflow=0, pool_timeout=0.4)
    handle = exporter.instrument(engine, name="storm")
    async with engine.connect() as conn:  # open one connection first, so the storm is about waiting
        await conn.execute(text("SELECT 1"))
    ok = timeouts = 0
    start = asyncio.Event()

    async def caller() -> None:
        nonlocal ok, timeouts
        await start.wait()
        try:
            async with engine.connect() as c:
                await c.execute(text("SELECT pg_sleep(0.05)"))
            ok += 1
        except sa_exc.TimeoutError as exc:
            assert not raised_by_us(exc)
            timeouts += 1

    readings = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            readings.append(
                {
                    state: registry.get_sample_value("sqlalchemy_pool_connections", {"pool": "storm", "state": state})
                    for state in ("used", "idle")
                }
                | {"pending": registry.get_sample_value("sqlalchemy_pool_pending_requests", {"pool": "storm"})}
            )
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    tasks = [asyncio.create_task(caller()) for _ in range(CALLERS)]
    await asyncio.sleep(0)
    start.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    stop.set()
    await watcher
    assert [r for r in results if r is not None] == []  # nothing but successes and pool timeouts

    assert ok + timeouts == CALLERS
    assert timeouts > 0 and ok >= POOL_SIZE
    s = registry.get_sample_value
    p = {"pool": "storm"}
    assert s("sqlalchemy_pool_timeouts_total", p) == timeouts
    assert s("sqlalchemy_pool_checkouts_total", p) == ok + 1
    assert s("sqlalchemy_pool_wait_seconds_count", p) == ok + 1
    assert s("sqlalchemy_pool_use_seconds_count", p) == ok + 1
    # Each connect() block closes its transaction: nothing was rolled back by the application.
    assert s("sqlalchemy_transactions_total", {**p, "outcome": "close"}) == ok + 1
    assert s("sqlalchemy_transactions_total", {**p, "outcome": "rollback"}) == 0
    assert s("sqlalchemy_pool_connect_errors_total", {**p, "error": "TimeoutError"}) is None
    assert s("sqlalchemy_exporter_errors_total", p) == 0
    # During the storm: never negative, never beyond the pool's bounds, and the waiters were seen.
    assert readings
    for r in readings:
        assert 0 <= r["used"] <= POOL_SIZE and 0 <= r["idle"] <= POOL_SIZE and 0 <= r["pending"] <= CALLERS, r
        assert r["used"] + r["idle"] <= POOL_SIZE
    assert max(r["pending"] for r in readings) > POOL_SIZE
    assert s("sqlalchemy_pool_max_connections", p) == POOL_SIZE
    assert s("sqlalchemy_pool_overflow_connections", p) == 0
    await at_rest(handle, registry, live_cluster, app)
