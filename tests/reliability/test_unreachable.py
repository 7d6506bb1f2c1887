"""The database is unreachable when the app starts, then comes up."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.web.app import pool_checks
from sqlalchemy_pool_exporter.web.readyz import Readiness

pytestmark = pytest.mark.reliability


async def test_unreachable_at_start_then_recovers(
    make_engine,
    registry: CollectorRegistry,
    exporter: Exporter,
    unwrap,
    raised_by_us,
    at_rest,
    live_cluster,
    serve,
    emitted,
) -> None:
    """Fault: the server is down when the app starts; a second engine names a database that does not exist.

    Each failed connect is counted once under the class the pool raised, exactly as often as the app
    saw it; no connection is left counted as used or pending; /readyz says 503 while /healthz says
    200; when the server comes up the same engine (and /readyz) recover with no restart, and the
    numbers carry on from where they were.
    """
    live_cluster.stop("fast")
    engine, app = make_engine(pool_size=2, max_overflow=0, pool_timeout=1)
    handle = exporter.instrument(engine, name="down")
    readiness = Readiness(pool_checks(exporter), timeout=2.0, cache_for=0.0)
    async with serve(exporter, readiness=readiness) as base, aiohttp.ClientSession() as http:

        async def get(path: str) -> tuple[int, bytes]:
            async with http.get(base + path) as r:
                body = await r.read()
            emitted.add(body)
            return r.status, body

        try:
            await _down_phase(engine, handle, registry, unwrap, raised_by_us, get)
        finally:
            await asyncio.to_thread(live_cluster.start)
        # Recovery, no restart of the app or the exporter; the probe's own connection is not counted.
        status, body = await get("/readyz")
        assert status == 200, body
        assert json.loads(body) == {"ready": True, "checks": {"pool down": "ok"}}
        assert (await get("/healthz"))[0] == 200

    s = registry.get_sample_value
    p = {"pool": "down"}
    for _ in range(2):
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    assert s("sqlalchemy_pool_checkouts_total", p) == 2
    assert s("sqlalchemy_pool_connections_created_total", p) == 1
    assert sum(handle.stats.connect_errors.values()) == 7
    await at_rest(handle, registry, live_cluster, app)

    # A server that is up but refuses: the database does not exist.
    missing, _ = make_engine(live_cluster.url().rsplit("/", 1)[0] + "/no_such_db", pool_size=1)
    other = exporter.instrument(missing, name="missing-db")
    for _ in range(3):
        with pytest.raises(Exception) as info:
            async with missing.connect():
                pass
        assert unwrap(info.value) == "InvalidCatalogNameError"
    assert s("sqlalchemy_pool_connect_errors_total", {"pool": "missing-db", "error": "InvalidCatalogNameError"}) == 3
    assert other.stats.waiting == [] and other.stats.checkouts == {}


async def _down_phase(engine, handle, registry, unwrap, raised_by_us, get) -> None:  # type: ignore[no-untyped-def]
    seen: Counter[str] = Counter()
    for _ in range(7):
        try:
            async with engine.connect():
                pass
        except Exception as exc:
            assert not raised_by_us(exc)
            seen[unwrap(exc)] += 1
    assert sum(seen.values()) == 7
    assert handle.stats.waiting == [] and handle.stats.checkouts == {}
    s = registry.get_sample_value
    p = {"pool": "down"}
    for cls, n in seen.items():
        assert s("sqlalchemy_pool_connect_errors_total", {**p, "error": cls}) == n
    assert s("sqlalchemy_pool_connections", {**p, "state": "used"}) == 0
    assert s("sqlalchemy_pool_connections", {**p, "state": "idle"}) == 0
    assert s("sqlalchemy_pool_pending_requests", p) == 0
    assert s("sqlalchemy_pool_checkouts_total", p) == 0
    assert s("sqlalchemy_pool_connections_created_total", p) == 0
    # The database is down: readiness says so, liveness does not care; the probes' own failed
    # connects are not the app's, and are not counted.
    for _ in range(2):
        status, raw = await get("/readyz")
        assert status == 503
        answer = json.loads(raw)
        assert answer["ready"] is False and answer["checks"]["pool down"].startswith("failing: ")
        assert (await get("/healthz"))[0] == 200
    assert sum(handle.stats.connect_errors.values()) == 7
