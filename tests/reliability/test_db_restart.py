"""The database restarts in the middle of sustained load."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from sqlalchemy_pool_exporter import Exporter

pytestmark = pytest.mark.reliability


class Load:
    """Workers that check out, run one statement and return, counting what the app itself saw."""

    def __init__(self, engine: AsyncEngine, unwrap: Any) -> None:
        self.engine = engine
        self.unwrap = unwrap
        self.checkouts = 0
        self.ok = 0
        self.connect_errors: Counter[str] = Counter()
        self.timeouts = 0
        self.invalidated = 0
        self.other: Counter[str] = Counter()
        self.seen: list[BaseException] = []

    async def once(self) -> None:
        try:
            conn = await self.engine.connect()
        except sa_exc.TimeoutError as exc:
            self.seen.append(exc)
            self.timeouts += 1
            await asyncio.sleep(0.01)
            return
        except Exception as exc:
            self.seen.append(exc)
            self.connect_errors[self.unwrap(exc)] += 1
            await asyncio.sleep(0.01)
            return
        self.checkouts += 1
        try:
            await conn.execute(text("SELECT pg_sleep(0.002)"))
            self.ok += 1
        except sa_exc.DBAPIError as exc:
            self.seen.append(exc)
            if exc.connection_invalidated:
                self.invalidated += 1
            else:
                self.other[type(exc).__name__] += 1
        finally:
            try:
                await conn.close()
            except Exception as exc:  # the app's own close can fail on a dead socket, with or without us
                self.seen.append(exc)
                if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
                    self.invalidated += 1
                else:
                    self.other["close:" + type(exc).__name__] += 1

    async def run(self, workers: int, until: float) -> None:
        async def worker() -> None:
            while time.monotonic() < until:
                await self.once()

        await asyncio.gather(*(worker() for _ in range(workers)))


async def test_restart_under_load(
    make_engine,
    registry: CollectorRegistry,
    exporter: Exporter,
    witness,
    unwrap,
    at_rest,
    live_cluster,
    scrape_loop,
    raised_by_us,
) -> None:
    """Fault: PostgreSQL is stopped (fast shutdown) and started again while 10 workers hammer a pool.

    The app sees exactly the errors it would see without us; afterwards every counter equals what
    SQLAlchemy and the app really saw, the gauges equal the server's own count, and every scrape
    made during the outage was answered.
    """
    engine, app = make_engine(pool_size=5, max_overflow=5, pool_timeout=2)
    handle = exporter.instrument(engine, name="restart")
    seen = witness(engine)
    load = Load(engine, unwrap)

    async def restart() -> None:
        await asyncio.sleep(0.7)
        await asyncio.to_thread(live_cluster.stop, "fast")
        await asyncio.sleep(0.3)
        await asyncio.to_thread(live_cluster.start)

    async with scrape_loop(exporter) as scrapes:
        await asyncio.gather(load.run(10, time.monotonic() + 2.5), restart())
        # Recovery without any restart of ours: a clean round of work succeeds.
        before = (load.ok, load.checkouts, load.invalidated, sum(load.connect_errors.values()))
        await load.run(5, time.monotonic() + 0.3)
        after = (load.ok, load.checkouts, load.invalidated, sum(load.connect_errors.values()))
        assert after[0] - before[0] == after[1] - before[1] > 0
        assert after[2:] == before[2:]

    # (a) The outage was real and the app saw it; nothing unexpected reached it.
    assert load.invalidated > 0
    assert sum(load.connect_errors.values()) > 0
    assert not load.other, load.other
    assert not [e for e in load.seen if raised_by_us(e)]
    # (b) Our numbers equal what happened.
    s = registry.get_sample_value
    p = {"pool": "restart"}
    assert s("sqlalchemy_pool_checkouts_total", p) == load.checkouts == seen.events["checkout"]
    assert s("sqlalchemy_pool_timeouts_total", p) == load.timeouts
    for cls, n in load.connect_errors.items():
        assert s("sqlalchemy_pool_connect_errors_total", {**p, "error": cls}) == n, cls
    assert handle.stats.connect_errors == dict(load.connect_errors)
    assert s("sqlalchemy_pool_disconnects_total", p) == load.invalidated == seen.events["disconnect"]
    assert s("sqlalchemy_pool_invalidations_total", {**p, "kind": "hard"}) == seen.events["invalidate"] > 0
    assert s("sqlalchemy_pool_connections_created_total", p) == seen.events["connect"]
    assert s("sqlalchemy_pool_connections_closed_total", p) == seen.events["close"] + seen.events["close_detached"]
    assert s("sqlalchemy_exporter_errors_total", p) == 0
    # (c) Nothing held, gauges back to truth.
    await at_rest(handle, registry, live_cluster, app)
    # The exporter answered every scrape, including those made while the database was down.
    assert scrapes.failed == 0
    assert scrapes.ok >= 20
