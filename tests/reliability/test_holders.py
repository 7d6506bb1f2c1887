"""Who holds the pool, exactly: an aiohttp app on real PostgreSQL, its routes named by the middleware.

At a checkpoint the connections held by each route equal what its requests hold (and sum to
`used`); after a storm on a small pool, each route's timeouts equal the 503s its clients saw.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from sqlalchemy_pool_exporter import Exporter, holder_middleware
from sqlalchemy_pool_exporter.web.app import Server

pytestmark = pytest.mark.reliability

ENGINE = web.AppKey("engine", AsyncEngine)
RELEASE = web.AppKey("release", asyncio.Event)
HOLD = web.AppKey("hold", float)


async def hold_until_released(request: web.Request) -> web.Response:
    async with request.app[ENGINE].connect() as conn:
        await conn.execute(text("SELECT 1"))
        await request.app[RELEASE].wait()
    return web.Response(text="released")


async def hold_for_a_while(request: web.Request) -> web.Response:
    try:
        async with request.app[ENGINE].begin() as conn:
            await conn.execute(text("SELECT 1"))
            await asyncio.sleep(request.app[HOLD])  # the slow external call, transaction open
    except sa_exc.TimeoutError:
        return web.Response(status=503, text="pool exhausted")
    return web.Response(text="done")


def app_for(engine: AsyncEngine, hold: float = 0.0) -> web.Application:
    app = web.Application(middlewares=[holder_middleware])
    app[ENGINE] = engine
    app[RELEASE] = asyncio.Event()
    app[HOLD] = hold
    app.router.add_get("/orders/{order_id}", hold_until_released)
    app.router.add_get("/reports", hold_until_released)
    app.router.add_get("/slow/a/{n}", hold_for_a_while)
    app.router.add_get("/slow/b", hold_for_a_while)
    return app


def by_holder(registry: CollectorRegistry, name: str, pool: str) -> dict[str, float]:
    return {
        s.labels["holder"]: s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == f"sqlalchemy_pool_holder_{name}" and s.labels.get("pool") == pool
    }


async def test_held_by_route_equals_what_each_route_holds(
    make_engine, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = make_engine(pool_size=10, max_overflow=0)
    exporter.instrument(engine, name="app")
    app = app_for(engine)
    server = Server(app)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:

            async def get(path: str) -> int:
                async with http.get(server.url + path) as r:
                    await r.read()
                    return r.status

            calls = [asyncio.create_task(get(f"/orders/{i}")) for i in range(4)]
            calls += [asyncio.create_task(get("/reports")) for _ in range(3)]
            for _ in range(500):
                if exporter.handles()[0].stats.wait.count == 7:
                    break
                await asyncio.sleep(0.01)
            held = by_holder(registry, "connections", "app")
            assert held == {"none": 0, "GET /orders/{order_id}": 4, "GET /reports": 3}
            used = registry.get_sample_value("sqlalchemy_pool_connections", {"pool": "app", "state": "used"})
            assert sum(held.values()) == used == 7
            app[RELEASE].set()
            assert await asyncio.gather(*calls) == [200] * 7
            assert by_holder(registry, "checkouts_total", "app") == {
                "none": 0,
                "GET /orders/{order_id}": 4,
                "GET /reports": 3,
            }
            assert set(by_holder(registry, "connections", "app").values()) == {0}
            # A path no route matches is one name, however many such paths an attacker tries.
            for i in range(20):
                assert await get(f"/nothing/{i}") == 404
            assert len(by_holder(registry, "connections", "app")) == 3
    finally:
        await server.stop()


async def test_timeouts_by_route_equal_the_503s_its_clients_saw(
    make_engine, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = make_engine(pool_size=2, max_overflow=0, pool_timeout=0.2)
    exporter.instrument(engine, name="small")
    server = Server(app_for(engine, hold=0.6))
    await server.start()
    seen: Counter[tuple[str, int]] = Counter()
    try:
        async with aiohttp.ClientSession() as http:

            async def get(route: str, path: str) -> None:
                async with http.get(server.url + path) as r:
                    await r.read()
                    seen[(route, r.status)] += 1

            for _ in range(2):  # two storms
                await asyncio.gather(
                    *(get("GET /slow/a/{n}", f"/slow/a/{i}") for i in range(6)),
                    *(get("GET /slow/b", "/slow/b") for _ in range(6)),
                )
    finally:
        await server.stop()
    timeouts = by_holder(registry, "timeouts_total", "small")
    checkouts = by_holder(registry, "checkouts_total", "small")
    for route in ("GET /slow/a/{n}", "GET /slow/b"):
        assert timeouts[route] == seen[(route, 503)]
        assert checkouts[route] == seen[(route, 200)]
    assert seen[("GET /slow/a/{n}", 503)] + seen[("GET /slow/b", 503)] > 0, seen
    assert sum(timeouts.values()) == registry.get_sample_value("sqlalchemy_pool_timeouts_total", {"pool": "small"})
    assert sum(checkouts.values()) == registry.get_sample_value("sqlalchemy_pool_checkouts_total", {"pool": "small"})
    # Each route's requests that got a connection held it for about the 0.6 s sleep.
    hold = by_holder(registry, "hold_seconds_total", "small")
    for route in ("GET /slow/a/{n}", "GET /slow/b"):
        assert 0.6 * checkouts[route] <= hold[route] < 0.6 * checkouts[route] + 1.0
