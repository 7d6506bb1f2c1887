"""engine.dispose() while the app is busy."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from sqlalchemy_pool_exporter import Exporter

pytestmark = pytest.mark.reliability


async def test_dispose_under_load(
    make_engine,
    registry: CollectorRegistry,
    exporter: Exporter,
    witness,
    raised_by_us,
    at_rest,
    live_cluster,
    scrape_loop,
) -> None:
    """Fault: engine.dispose() is called 4 times while 12 workers check out and run statements.

    Every operation of the app succeeds, as without us (dispose only swaps the pool); checkouts and
    waits equal the app's own count across all the pools dispose() created; the checkout table
    drains even for connections returned to a replaced pool; gauges read the current pool and
    equal the server's count once the replaced pools are gone.
    """
    engine, app = make_engine(pool_size=4, max_overflow=4, pool_timeout=5)
    handle = exporter.instrument(engine, name="dispose")
    seen = witness(engine)
    done = 0
    pools = {id(engine.pool)}
    until = time.monotonic() + 1.5

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < until:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT pg_sleep(0.003)"))
            done += 1

    async def disposer() -> None:
        for _ in range(4):
            await asyncio.sleep(0.3)
            await engine.dispose()
            pools.add(id(engine.pool))

    async with scrape_loop(exporter) as scrapes:
        results = await asyncio.gather(*(worker() for _ in range(12)), disposer(), return_exceptions=True)
    errors = [r for r in results if r is not None]
    assert not [e for e in errors if raised_by_us(e)]
    assert errors == []
    assert len(pools) == 5
    s = registry.get_sample_value
    p = {"pool": "dispose"}
    assert s("sqlalchemy_pool_checkouts_total", p) == done == seen.events["checkout"]
    assert s("sqlalchemy_pool_use_seconds_count", p) == done == seen.events["checkin"]
    assert s("sqlalchemy_pool_connections_created_total", p) == seen.events["connect"]
    assert handle.stats.checkouts == {}
    assert s("sqlalchemy_exporter_errors_total", p) == 0
    assert scrapes.failed == 0
    # Connections returned to a replaced pool stay open until that pool is garbage-collected, with
    # no `close` event; once it is, created - closed is again the number the server has open.
    await engine.dispose()
    gc.collect()
    await at_rest(handle, registry, live_cluster, app)
