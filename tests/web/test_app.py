"""Every endpoint and content type, on a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import errno
import gzip
import json

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine

import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.web.app import PortInUse, add_routes, make_app, start_http_server
from sqlalchemy_pool_exporter.web.readyz import Readiness, check_pool

from ..conftest import metric as sample
from ..conftest import samples_of as parse
from ..conftest import serving

pytestmark = pytest.mark.both_loops

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


async def test_metrics_text_openmetrics_and_gzip(
    registry: CollectorRegistry, exporter: Exporter, sqlite_engine: Engine
) -> None:
    exporter.instrument(sqlite_engine, name="web")
    held = [sqlite_engine.connect(), sqlite_engine.connect()]
    try:
        async with (
            serving(make_app(exporter)) as server,
            aiohttp.ClientSession(auto_decompress=False, headers={"Accept-Encoding": "identity"}) as c,
        ):
            async with c.get(f"{server.url}/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                assert "Content-Encoding" not in r.headers
                text = (await r.read()).decode()
            samples = parse(text)
            assert sample(samples, "sqlalchemy_pool_connections", pool="web", state="used") == 2.0
            assert sample(samples, "sqlalchemy_pool_connections", pool="web", state="idle") == 0.0
            assert sample(samples, "sqlalchemy_pool_checkouts_total", pool="web") == 2.0
            assert sample(samples, "sqlalchemy_pool_max_connections", pool="web") == 3.0

            async with c.get(f"{server.url}/metrics", headers={"Accept": "application/openmetrics-text"}) as r:
                assert r.headers["Content-Type"] == OPENMETRICS
                body = (await r.read()).decode()
            assert body.endswith("# EOF\n")
            assert 'sqlalchemy_pool_checkouts_total{pool="web"} 2.0' in body

            async with c.get(f"{server.url}/metrics", headers={"Accept-Encoding": "gzip"}) as r:
                assert r.headers["Content-Encoding"] == "gzip"
                unzipped = gzip.decompress(await r.read()).decode()
            assert sample(parse(unzipped), "sqlalchemy_pool_connections", pool="web", state="used") == 2.0

            async with c.get(f"{server.url}/metrics", params={"name[]": "sqlalchemy_pool_size"}) as r:
                only = parse((await r.read()).decode())
            assert list(only) == [("sqlalchemy_pool_size", (("pool", "web"),))]
            assert only[("sqlalchemy_pool_size", (("pool", "web"),))] == 2.0
    finally:
        for conn in held:
            conn.close()


async def test_custom_metrics_path(registry: CollectorRegistry) -> None:
    app = make_app(registry=registry, metrics_path="/x/metrics")
    async with serving(app) as server, aiohttp.ClientSession() as c:
        async with c.get(f"{server.url}/x/metrics") as r:
            assert r.status == 200
        async with c.get(f"{server.url}/metrics") as r:
            assert r.status == 404


async def test_healthz_readyz_pools_and_index(
    registry: CollectorRegistry, exporter: Exporter, sqlite_engine: Engine
) -> None:
    handle = exporter.instrument(sqlite_engine, name="web-pools")
    conn = sqlite_engine.connect()
    try:
        async with serving(make_app(exporter)) as server, aiohttp.ClientSession() as c:
            async with c.get(f"{server.url}/healthz") as r:
                assert (r.status, await r.text()) == (200, "ok\n")
            async with c.get(f"{server.url}/readyz") as r:
                assert r.status == 200
                ready = await r.json()
            assert ready["ready"] is True
            assert ready["checks"]["pool web-pools"] == "ok"
            async with c.get(f"{server.url}/pools") as r:
                pools = {p["name"]: p for p in (await r.json())["pools"]}
            mine = pools["web-pools"]
            # The readiness check opened a connection of its own, outside the pool: not counted.
            assert {k: mine[k] for k in ("pool_class", "used", "idle", "size", "max", "overflow", "checkouts")} == {
                "pool_class": "QueuePool",
                "used": 1,
                "idle": 0,
                "size": 2,
                "max": 3,
                "overflow": 0,
                "checkouts": 1,
            }
            # Ages move between the two reads: take them from the page, compare everything else.
            snapshot = handle.snapshot()
            ages = {
                "oldest_checkout": mine["oldest_checkout"],
                "checkouts_now": [
                    c | {"age": seen["age"]}
                    for c, seen in zip(snapshot["checkouts_now"], mine["checkouts_now"], strict=True)
                ],
            }
            assert mine == json.loads(json.dumps(snapshot | ages))
            async with c.get(f"{server.url}/") as r:
                assert r.headers["Content-Type"].startswith("text/html")
                page = await r.text()
            assert "<td>web-pools</td><td>QueuePool</td><td>1</td><td>0</td><td>3</td><td>2</td>" in page
            assert 'href="/metrics"' in page
    finally:
        conn.close()


async def test_readyz_fails_for_an_unreachable_database_and_shares_one_check(
    registry: CollectorRegistry, exporter: Exporter
) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine("postgresql+asyncpg://nobody:pw@127.0.0.1:1/none")
    exporter.instrument(engine, name="unreachable")
    runs = 0
    original = Readiness._run

    async def counting(self: Readiness) -> tuple[bool, dict[str, str]]:
        nonlocal runs
        runs += 1
        return await original(self)

    readiness = Readiness(lambda: {"pool unreachable": lambda: check_pool(pool_exporter.handle_for(engine))})  # type: ignore[arg-type]
    readiness._run = counting.__get__(readiness)  # type: ignore[method-assign]
    try:
        async with serving(make_app(exporter, readiness=readiness)) as server, aiohttp.ClientSession() as c:
            import asyncio

            async def get() -> tuple[int, dict[str, object]]:
                async with c.get(f"{server.url}/readyz") as r:
                    return r.status, await r.json()

            results = await asyncio.gather(*(get() for _ in range(5)))
        assert {status for status, _ in results} == {503}
        assert results[0][1] == {"ready": False, "checks": {"pool unreachable": "failing: ConnectionRefusedError"}}
        assert runs == 1
    finally:
        pool_exporter.uninstrument(engine)
        await engine.dispose()


async def test_add_routes_to_an_existing_app(
    registry: CollectorRegistry, exporter: Exporter, sqlite_engine: Engine
) -> None:
    exporter.instrument(sqlite_engine, name="mounted")

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/hello", hello)
    add_routes(app, exporter, index=False)
    async with serving(app) as server, aiohttp.ClientSession() as c:
        async with c.get(f"{server.url}/hello") as r:
            assert await r.text() == "hello"
        async with c.get(f"{server.url}/metrics") as r:
            samples = parse(await r.text())
        assert sample(samples, "sqlalchemy_pool_size", pool="mounted") == 2.0
        async with c.get(f"{server.url}/") as r:
            assert r.status == 404


async def test_password_never_in_pools_or_index(
    registry: CollectorRegistry, exporter: Exporter, tmp_path: object
) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine("postgresql+asyncpg://postgres:Sup3rS3cret@127.0.0.1:5432/test")
    exporter.instrument(engine)
    try:
        async with serving(make_app(exporter)) as server, aiohttp.ClientSession() as c:
            for path in ("/pools", "/", "/metrics"):
                async with c.get(f"{server.url}{path}") as r:
                    body = await r.text()
                assert "Sup3rS3cret" not in body
                assert "127.0.0.1:5432/test" in body
    finally:
        pool_exporter.uninstrument(engine)
        await engine.dispose()


async def test_a_port_already_in_use_is_one_clear_error(registry: CollectorRegistry, exporter: Exporter) -> None:
    """A second start_http_server() on a port the first holds (what a second worker does): one message
    naming the cause and the sidecar, no chained traceback; the first keeps serving."""
    first = await start_http_server("127.0.0.1", 0, exporter)
    try:
        with pytest.raises(PortInUse) as caught:
            await start_http_server("127.0.0.1", first.port, exporter)
        assert caught.value.errno == errno.EADDRINUSE
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
        assert str(caught.value) == (
            f"[Errno {errno.EADDRINUSE}] cannot serve /metrics on 127.0.0.1:{first.port}: the address is already "
            "in use. With several workers (uvicorn --workers N, gunicorn -w N) each worker opening this port fails "
            "after the first: set PROMETHEUS_MULTIPROC_DIR and run `pool-exporter serve` beside them (the sidecar), "
            "or mount metrics_app() in the app (each worker then answers for itself only); see the README, "
            "Several workers"
        )
        async with aiohttp.ClientSession() as c, c.get(f"{first.url}/healthz") as r:
            assert r.status == 200
    finally:
        await first.stop()
