"""The database is unreachable when the app starts, then comes up."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

import exporter

pytestmark = pytest.mark.reliability


async def test_unreachable_at_start_then_recovers(
    make_engine, registry: CollectorRegistry, unwrap, raised_by_us, at_rest, live_cluster
) -> None:
    """Fault: the server is down when the app starts; a second engine names a database that does not exist.

    Each failed connect is counted once under the class the pool raised, exactly as often as the app
    saw it; no connection is left counted as used or pending; when the server comes up the same
    engine works with no restart, and the numbers carry on from where they were.
    """
    live_cluster.stop("fast")
    try:
        engine, app = make_engine(pool_size=2, max_overflow=0, pool_timeout=1)
        handle = exporter.instrument(engine, registry=registry, name="down")
        seen: Counter[str] = Counter()
        for _ in range(7):
            try:
                async with engine.connect():
                    pass
            except Exception as exc:
                assert not raised_by_us(exc)
                seen[unwrap(exc)] += 1
        assert sum(seen.values()) == 7
        assert handle.stats.waiting == {} and handle.stats.checkouts == {}
        s = registry.get_sample_value
        p = {"pool": "down"}
        for cls, n in seen.items():
            assert s("sqlalchemy_pool_connect_errors_total", {**p, "error": cls}) == n
        assert s("sqlalchemy_pool_connections", {**p, "state": "used"}) == 0
        assert s("sqlalchemy_pool_connections", {**p, "state": "idle"}) == 0
        assert s("sqlalchemy_pool_pending_requests", p) == 0
        assert s("sqlalchemy_pool_checkouts_total", p) == 0
        assert s("sqlalchemy_pool_connections_created_total", p) == 0
    finally:
        await asyncio.to_thread(live_cluster.start)

    for _ in range(3):
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    assert s("sqlalchemy_pool_checkouts_total", p) == 3
    assert s("sqlalchemy_pool_connections_created_total", p) == 1
    assert sum(handle.stats.connect_errors.values()) == 7
    await at_rest(handle, registry, live_cluster, app)

    # A server that is up but refuses: the database does not exist.
    missing, _ = make_engine(live_cluster.url().rsplit("/", 1)[0] + "/no_such_db", pool_size=1)
    other = exporter.instrument(missing, registry=registry, name="missing-db")
    for _ in range(3):
        with pytest.raises(Exception) as info:
            async with missing.connect():
                pass
        assert unwrap(info.value) == "InvalidCatalogNameError"
    assert s("sqlalchemy_pool_connect_errors_total", {"pool": "missing-db", "error": "InvalidCatalogNameError"}) == 3
    assert other.stats.waiting == {} and other.stats.checkouts == {}
