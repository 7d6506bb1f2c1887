"""Our HTTP connections (web/connections.py) under asyncio's loop and uvloop's: head deadlines, the
connection cap and TLS, on a real Server over real sockets on 127.0.0.1.

uvloop's transports are not asyncio.Transport subclasses, and uvloop starts reading a connection at
once, before start_tls() takes it over: every behaviour here must be the same under both.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator

import aiohttp
import pytest
import trustme
from aiohttp import web
from prometheus_client import CollectorRegistry

from sqlalchemy_pool_exporter.web.app import make_app

from ..conftest import serving

pytestmark = pytest.mark.both_loops

# Only a server that never closes misses it: no test asserts how fast anything is.
BOUND = 30.0
BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\nRetry-After: 1\r\n\r\n"


@pytest.fixture
def tls() -> Iterator[tuple[ssl.SSLContext, ssl.SSLContext]]:
    """A server context for 127.0.0.1 and a client context that trusts it."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    yield server, client


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(BOUND):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def _get(url: str, client: ssl.SSLContext | None = None) -> int:
    async with aiohttp.ClientSession() as http, http.get(url, ssl=client or False) as r:
        await r.read()
        return r.status


async def test_the_running_loop_is_the_one_asked_for(request: pytest.FixtureRequest) -> None:
    wanted = request.node.callspec.id
    assert type(asyncio.get_running_loop()).__module__.split(".")[0] == wanted


async def test_a_stalled_request_head_is_closed_while_scrapes_answer(registry: CollectorRegistry) -> None:
    async with serving(make_app(registry=registry), request_head_timeout=0.5) as server:
        half_r, half_w = await asyncio.open_connection("127.0.0.1", server.port)
        half_w.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        silent_r, silent_w = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            assert await _get(f"{server.url}/metrics") == 200
            assert [await _closed_by_server(half_r), await _closed_by_server(silent_r)] == [True, True]
        finally:
            half_w.close()
            silent_w.close()
        assert await _get(f"{server.url}/healthz") == 200


async def test_tls_scrapes_answer_and_a_stalled_handshake_is_closed(
    registry: CollectorRegistry, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """A client's ClientHello can arrive before start_tls() runs (uvloop reads at once): none is lost.
    A connection that never starts its handshake is closed by the head deadline."""
    server_ctx, client_ctx = tls
    async with serving(make_app(registry=registry), ssl_context=server_ctx, request_head_timeout=0.5) as server:
        assert server.url.startswith("https://")
        statuses = await asyncio.gather(*(_get(f"{server.url}/metrics", client_ctx) for _ in range(20)))
        assert statuses == [200] * 20
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            assert await _closed_by_server(reader)
        finally:
            writer.close()


async def test_idle_connections_beyond_the_cap_make_room_oldest_first(registry: CollectorRegistry) -> None:
    async with serving(make_app(registry=registry), max_connections=4, request_head_timeout=None) as server:
        conns = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(10)]
        try:
            assert await _get(f"{server.url}/metrics") == 200
            closed = [await _closed_by_server(r) for r, _ in conns[:6]]
            assert closed == [True] * 6
        finally:
            for _, w in conns:
                w.close()


async def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(registry: CollectorRegistry) -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response(text="done")

    app = make_app(registry=registry)
    app.router.add_get("/slow", slow)
    async with serving(app, max_connections=1) as server:
        busy = asyncio.create_task(_get(f"{server.url}/slow"))
        await entered.wait()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(BOUND):
                answer = await reader.read()
        finally:
            writer.close()
        assert answer == BUSY
        release.set()
        assert await busy == 200


async def test_a_tls_connection_refused_at_the_cap_is_just_closed(
    registry: CollectorRegistry, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, client_ctx = tls
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.Response(text="done")

    app = make_app(registry=registry)
    app.router.add_get("/slow", slow)
    async with serving(app, ssl_context=server_ctx, max_connections=1) as server:
        busy = asyncio.create_task(_get(f"{server.url}/slow", client_ctx))
        await entered.wait()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            async with asyncio.timeout(BOUND):
                with contextlib.suppress(ConnectionError):
                    assert await reader.read() == b""
        finally:
            writer.close()
        release.set()
        assert await busy == 200
