"""start_wsgi_server: /metrics from a daemon thread, no asyncio; real sockets, a real PostgreSQL engine on psycopg.

The same bytes as the aiohttp route; the aiohttp server's auth; request heads bounded in size and in
time (a stalled or dribbling client is closed, an oversized head refused); a cap on connections; TLS.
"""

from __future__ import annotations

import gzip
import select
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError

import pytest
import trustme
from sqlalchemy import Engine, create_engine, text

from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.web import PortInUse, start_wsgi_server
from sqlalchemy_pool_exporter.web.app import make_app
from sqlalchemy_pool_exporter.web.auth import Auth
from sqlalchemy_pool_exporter.web.connections import BUSY
from sqlalchemy_pool_exporter.web.threaded import ThreadServer

from ..conftest import PG_NAME, PG_URL, metric, orders_sqlite, poll_sync, samples_of, serving
from ..core.test_asgi import REQUESTS, raw

PG_SYNC_URL = PG_URL.replace("+asyncpg", "+psycopg")
CHALLENGE = 'Bearer realm="pool-exporter", Basic realm="pool-exporter", charset="UTF-8"'
GUARD = 30.0  # a client-side timeout: it only stops a hung test


@pytest.fixture
def pg_psycopg(exporter: Exporter) -> Iterator[Engine]:
    engine = create_engine(PG_SYNC_URL, pool_size=2, max_overflow=0)
    exporter.instrument(engine)
    yield engine
    exporter.uninstrument(engine)
    engine.dispose()


def get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=GUARD) as response:
            return response.status, dict(response.headers), response.read()
    except HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a connection of its own and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:  # after the answer: the request was not all read (a refused one)
            assert chunks
    return b"".join(chunks)


def test_n_commits_on_postgresql_read_n(exporter: Exporter, pg_psycopg: Engine) -> None:
    with start_wsgi_server(exporter=exporter) as server:
        for i in range(13):
            with pg_psycopg.begin() as conn:
                conn.execute(text("SELECT :i"), {"i": i})
        status, headers, body = get(f"{server.url}/metrics")
        assert (status, headers["Content-Type"]) == (200, "text/plain; version=0.0.4; charset=utf-8")
        samples = samples_of(body.decode())
        assert metric(samples, "sqlalchemy_transactions_total", pool=PG_NAME, outcome="commit") == 13.0
        assert metric(samples, "sqlalchemy_pool_connections", pool=PG_NAME, state="idle") == 1.0

        status, headers, body = get(f"{server.url}/metrics", **{"Accept-Encoding": "gzip"})
        assert (status, headers["Content-Encoding"]) == (200, "gzip")
        unpacked = samples_of(gzip.decompress(body).decode())
        assert metric(unpacked, "sqlalchemy_transactions_total", pool=PG_NAME, outcome="commit") == 13.0
        assert get(f"{server.url}/healthz")[::2] == (200, b"ok\n")
        status, _, body = get(f"{server.url}/pools")
        assert status == 200 and b'"transactions"' in body


async def test_the_same_bytes_as_the_aiohttp_route(
    exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    orders_sqlite(exporter, sync_engines, tmp_path / "db.sqlite")
    async with serving(make_app(exporter)) as aio:
        with start_wsgi_server(exporter=exporter) as server:
            for name, request in REQUESTS.items():
                request = request.format(path="/metrics")
                assert await raw(server.port, request) == await raw(aio.port, request), name


def test_credentials_as_the_aiohttp_server_asks_them(exporter: Exporter) -> None:
    auth = Auth(token="s3cret", user="prom", password="pa:ss")
    with start_wsgi_server(exporter=exporter, auth=auth) as server:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic cHJvbTpwYQ=="}):
            status, got, body = get(f"{server.url}/metrics", **headers)
            assert (status, body) == (401, b"401: credentials required\n"), headers
            assert (
                got["WWW-Authenticate"] == 'Bearer realm="pool-exporter", Basic realm="pool-exporter", charset="UTF-8"'
            )
        assert get(f"{server.url}/pools")[0] == 401
        assert get(f"{server.url}/metrics", Authorization="Bearer s3cret")[0] == 200
        assert get(f"{server.url}/metrics", Authorization="Basic cHJvbTpwYTpzcw==")[0] == 200  # prom:pa:ss
        assert get(f"{server.url}/healthz")[::2] == (200, b"ok\n")  # liveness needs none
        assert get(f"{server.url}/nothing", Authorization="Bearer s3cret")[0] == 404


def test_oversized_heads_are_refused(exporter: Exporter) -> None:
    with start_wsgi_server(exporter=exporter) as server:
        line = exchange(server.port, b"GET /metrics?" + b"a" * 8200 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert line.startswith(b"HTTP/1.1 414 ") and line.endswith(b"\r\n\r\n414: request line too long")
        field = exchange(server.port, b"GET /metrics HTTP/1.1\r\nX-Big: " + b"b" * 8200 + b"\r\n\r\n")
        assert field.startswith(b"HTTP/1.1 431 ")
        many = exchange(server.port, b"GET /metrics HTTP/1.1\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n")
        assert many.startswith(b"HTTP/1.1 431 ")
        folded = exchange(server.port, b"GET /metrics HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n")
        assert folded.startswith(b"HTTP/1.1 400 ")
        # A body is never read, and does not spoil the answer.
        posted = exchange(server.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 70000\r\n\r\n" + b"z" * 70000)
        assert posted.startswith(b"HTTP/1.1 405 ") and posted.endswith(b"405: Method Not Allowed")
        assert get(f"{server.url}/metrics")[0] == 200


def test_a_stalled_client_is_closed_while_scrapes_answer(exporter: Exporter) -> None:
    with (
        start_wsgi_server(exporter=exporter, request_head_timeout=0.5) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=GUARD) as stalled,
    ):
        stalled.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        assert get(f"{server.url}/metrics")[0] == 200
        assert stalled.recv(1024) == b""  # closed, no answer


def test_a_dribbling_client_meets_a_deadline_not_a_read_timeout(exporter: Exporter) -> None:
    """One byte every 50 ms never lets a read wait long; the head's deadline closes it all the same."""
    head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200 + b"\r\n\r\n"
    with start_wsgi_server(exporter=exporter, request_head_timeout=0.5) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=GUARD) as slow:
            sent = 0
            for byte in head:
                readable, _, _ = select.select([slow], [], [], 0.05)
                if readable:
                    break
                slow.sendall(bytes([byte]))
                sent += 1
            assert slow.recv(1024) == b""
        assert sent < len(head)


def test_beyond_the_cap_a_connection_is_answered_503(exporter: Exporter) -> None:
    with start_wsgi_server(exporter=exporter, max_connections=2, request_head_timeout=None) as server:
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=GUARD) for _ in range(2)]
        assert exchange(server.port, b"GET /metrics HTTP/1.1\r\n\r\n") == BUSY
        for sock in held:
            sock.close()

        def answers() -> bool:
            return exchange(server.port, b"GET /healthz HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 200 ")

        poll_sync(answers)


def test_a_taken_port_is_port_in_use(exporter: Exporter) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse) as caught:
            start_wsgi_server("127.0.0.1", port, exporter)
        assert caught.value.__cause__ is None and f"127.0.0.1:{port}" in str(caught.value)


def test_tls_with_a_fixed_context(exporter: Exporter, tmp_path: Path) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    with start_wsgi_server(exporter=exporter, ssl_context=context, request_head_timeout=0.5) as server:
        assert server.url.startswith("https://")
        with socket.create_connection(("127.0.0.1", server.port), timeout=GUARD) as stalled:  # no handshake
            with urllib.request.urlopen(f"{server.url}/healthz", context=client, timeout=GUARD) as response:
                assert response.read() == b"ok\n"
            assert stalled.recv(1024) == b""


def test_stop_closes_the_port(exporter: Exporter) -> None:
    server = ThreadServer(lambda environ, start_response: [], "127.0.0.1", 0)
    server.start()
    port = server.port
    server.stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=GUARD).close()
