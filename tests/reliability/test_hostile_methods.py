"""Clients choose the HTTP method: forged methods and unmatched paths must not use up the holder names.

A real aiohttp server (holder_middleware) and a real uvicorn serving a FastAPI app (HolderMiddleware),
each with an app middleware that takes a connection on every request (a session lookup), so every
request, matched or not, checks out under some holder name. A flood of WebDAV methods (aiohttp's
parser knows them) or of made-up method tokens (uvicorn's h11 takes any token), on unmatched paths,
on declared paths with the wrong method and on a route that takes every method, comes first; then
the routes the app declares still get their own series, and nothing was folded into `other`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvicorn
from aiohttp import web
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from sqlalchemy_pool_exporter import Exporter, HolderMiddleware, holder_middleware

from ..conftest import serving
from .conftest import free_port

pytestmark = pytest.mark.reliability

# Methods aiohttp's (llhttp's) request parser accepts besides the standard ones: WebDAV and friends.
WEBDAV = [
    "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "SEARCH", "REPORT", "MKACTIVITY",
    "CHECKOUT", "MERGE", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE", "PURGE", "MKCALENDAR", "LINK", "UNLINK",
    "BIND", "REBIND", "UNBIND", "ACL", "SOURCE", "QUERY", "M-SEARCH",
]  # fmt: skip
STANDARD = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
# 120 tokens a client makes up (h11 accepts any RFC 9110 token, in any case).
TOKENS = (
    [f"X-{i:03d}" for i in range(100)]
    + ["get", "Get", "post", "FOO!", "a.b", "~x"]
    + [f"M{'A' * i}" for i in range(14)]
)
ORDER = "GET /orders/{order_id}"


async def send(port: int, method: str, path: str) -> int:
    """One raw HTTP/1.1 request with `method` exactly as given; the response's status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        await reader.read()  # to the end: the server closes
        return status
    finally:
        writer.close()


def by_holder(registry: CollectorRegistry, name: str, pool: str) -> dict[str, float]:
    return {
        s.labels["holder"]: s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == f"sqlalchemy_pool_holder_{name}" and s.labels.get("pool") == pool
    }


async def lookup(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


def aiohttp_app(engine: AsyncEngine) -> web.Application:
    @web.middleware
    async def session_lookup(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        await lookup(engine)  # every request, found or not: a connection
        return await handler(request)

    async def handle(request: web.Request) -> web.Response:
        await lookup(engine)
        return web.Response(text="ok")

    app = web.Application(middlewares=[holder_middleware, session_lookup])
    app.router.add_get("/orders/{order_id}", handle)
    app.router.add_route("PROPFIND", "/props", handle)  # a method the app declares: its own name
    app.router.add_route("*", "/dav/{path}", handle)  # any method the client sends
    return app


async def test_aiohttp_forged_methods_and_unmatched_paths_leave_declared_routes_their_names(
    make_engine: Any, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = make_engine(pool_size=2, max_overflow=0)
    exporter.instrument(engine, name="app")
    assert exporter.max_holders == 50
    async with serving(aiohttp_app(engine)) as server:
        port = server.port
        statuses = []
        for i, method in enumerate(WEBDAV + STANDARD):
            statuses.append(await send(port, method, f"/nothing/{i}"))
            statuses.append(await send(port, method, f"/dav/{i}"))
            if method not in ("GET", "HEAD"):
                statuses.append(await send(port, method, "/orders/1"))  # the wrong method: 405
        n = len(WEBDAV + STANDARD)
        assert sorted(set(statuses)) == [200, 404, 405], statuses
        assert await send(port, "GET", "/orders/7") == 200
        assert await send(port, "PROPFIND", "/props") == 200

    checkouts = by_holder(registry, "checkouts_total", "app")
    assert checkouts.get(ORDER) == 2.0, checkouts  # its own series: not folded into `other`
    dav = {f"{m} /dav/{{path}}": 2.0 for m in STANDARD}  # the session lookup and the handler
    assert checkouts == {
        "none": 0.0,
        "(unmatched)": float(n + n - 2),  # every unmatched request's session lookup, whatever its method
        **dav,
        "OTHER /dav/{path}": 2.0 * len(WEBDAV),
        ORDER: 2.0,
        "PROPFIND /props": 2.0,
    }
    assert registry.get_sample_value("sqlalchemy_pool_holder_folded_checkouts_total", {"pool": "app"}) == 0


def fastapi_app(engine: AsyncEngine) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def session_lookup(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        await lookup(engine)  # before routing: the route is not known yet
        return await call_next(request)

    @app.get("/orders/{order_id}")
    async def order(order_id: int) -> dict[str, int]:
        await lookup(engine)
        return {"order_id": order_id}

    @app.api_route("/dav/{path}", methods=["PROPFIND", "GET"])
    async def dav(path: str) -> dict[str, str]:
        await lookup(engine)
        return {"path": path}

    app.add_middleware(HolderMiddleware)  # added last: the outermost
    return app


async def test_uvicorn_forged_methods_and_unmatched_paths_leave_declared_routes_their_names(
    make_engine: Any, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = make_engine(pool_size=2, max_overflow=0)
    exporter.instrument(engine, name="app")
    port = free_port()
    # h11, named: it takes any method token (httptools, like aiohttp's parser, only the known ones).
    config = uvicorn.Config(
        fastapi_app(engine), host="127.0.0.1", port=port, http="h11", lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        deadline = time.monotonic() + 60  # guards a hung start only
        while not server.started:
            assert not serving.done(), serving
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        statuses = []
        for i, method in enumerate(TOKENS):
            statuses.append(await send(port, method, f"/nothing/{i}"))
            statuses.append(await send(port, method, f"/dav/{i}"))  # 405: not a method it takes
            statuses.append(await send(port, method, "/orders/1"))  # 405
        assert sorted(set(statuses)) == [404, 405], statuses
        assert await send(port, "GET", "/orders/7") == 200
        assert await send(port, "PROPFIND", "/dav/x") == 200
    finally:
        server.should_exit = True
        await serving

    checkouts = by_holder(registry, "checkouts_total", "app")
    assert checkouts.get(ORDER) == 1.0, checkouts  # its own series: not folded into `other`
    assert checkouts == {
        "none": 0.0,
        # Every request's session lookup (made before routing), whatever its method and path.
        "(unmatched)": float(3 * len(TOKENS) + 2),
        ORDER: 1.0,
        "PROPFIND /dav/{path}": 1.0,
    }
    assert registry.get_sample_value("sqlalchemy_pool_holder_folded_checkouts_total", {"pool": "app"}) == 0
