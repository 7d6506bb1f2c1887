"""Hostile HTTP: unknown paths, huge headers, wrong methods, missing or wrong credentials."""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine

import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.web.auth import Auth

pytestmark = pytest.mark.reliability

TOKEN = "tok-7c1e5a"
USER, PASSWORD = "prom", "pw-a81f0d"


def _no_trace(body: bytes) -> None:
    for marker in (b"Traceback", b'File "', b"sqlalchemy_pool_exporter/", b"aiohttp/web"):
        assert marker not in body, body[:500]


async def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes, read the answer: for requests no well-behaved client would make."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("auth", [None, "token", "basic"])
async def test_hostile_http(
    registry: CollectorRegistry, exporter: Exporter, serve, emitted, secret: str, auth: str | None
) -> None:
    """Fault: a client that asks for unknown paths, uses wrong methods, sends 64 KiB headers, and (auth on)
    sends no, wrong, malformed or other-scheme credentials.

    Each gets the right status (404, 405, 431/400, 401 with a challenge; /healthz always 200), no
    body carries a stack trace, and the server keeps serving good requests afterwards.
    """
    engine = create_engine(f"postgresql+asyncpg://app:{secret}@127.0.0.1:1/app")
    exporter.instrument(engine, name="web")
    guard = {None: None, "token": Auth(token=TOKEN), "basic": Auth(user=USER, password=PASSWORD)}[auth]
    good = {
        None: {},
        "token": {"Authorization": f"Bearer {TOKEN}"},
        "basic": {"Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()},
    }[auth]
    try:
        async with serve(exporter, auth=guard) as base, aiohttp.ClientSession() as http:

            async def call(method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
                async with http.request(method, base + path, headers=headers) as r:
                    body = await r.read()
                    if r.status == 401:
                        assert "WWW-Authenticate" in r.headers
                emitted.add(body)
                _no_trace(body)
                return r.status, body

            for path in ("/metrics", "/pools", "/", "/readyz"):
                status, _ = await call("GET", path, good)
                assert status in (200, 503), (path, status)  # readyz: the database is fake
            assert (await call("GET", "/healthz"))[0] == 200
            for path in ("/nope", "/metrics/../etc/passwd", "/%00", "/pools/x", "/" + "a" * 4000):
                assert (await call("GET", path, good))[0] == 404, path
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                for path in ("/metrics", "/pools", "/healthz"):
                    assert (await call(method, path, good))[0] == 405, (method, path)
            if auth is not None:
                wrong = [
                    {},
                    {"Authorization": "Bearer wrong"},
                    {"Authorization": "Bearer"},
                    {"Authorization": "Basic !!!not-base64!!!"},
                    {"Authorization": "Basic " + base64.b64encode(b"prom:wrong").decode()},
                    {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode()},
                    {"Authorization": "Digest username=prom"},
                    {"Authorization": f"Bearer {TOKEN}x"},
                    {"Authorization": "Bearer " + "ä" * 100},
                ]
                for headers in wrong:
                    for path in ("/metrics", "/pools", "/", "/readyz", "/nope"):
                        assert (await call("GET", path, headers))[0] == 401, (path, headers)
                    assert (await call("GET", "/healthz", headers))[0] == 200

            port = int(base.rsplit(":", 1)[1])
            status, body = await _raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n")
            assert status in (400, 431)
            _no_trace(body)
            many = b"".join(b"X-H%d: v\r\n" % i for i in range(2000))
            status, body = await _raw(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
            assert status in (400, 431)
            _no_trace(body)
            status, body = await _raw(port, b"BREW /metrics HTCPCP/1.0\r\n\r\n")
            assert status in (400, 405, 501)
            _no_trace(body)
            status, body = await _raw(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64)
            assert status == 400
            _no_trace(body)
            # Still serving.
            assert (await call("GET", "/metrics", good))[0] == 200
    finally:
        pool_exporter.uninstrument(engine)
        engine.dispose()
