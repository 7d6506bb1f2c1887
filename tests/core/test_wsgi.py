"""wsgi_metrics_app: the same answer as the aiohttp route and the ASGI app, byte for byte, under a real
WSGI server (the standard library's wsgiref, in a thread); wsgi_pools_app: the aiohttp server's /pools."""

from __future__ import annotations

import json
import threading
import wsgiref.simple_server
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine

from sqlalchemy_pool_exporter import Exporter, metrics_app, wsgi_metrics_app
from sqlalchemy_pool_exporter.web.app import make_app
from sqlalchemy_pool_exporter.wsgi import wsgi_pools_app

from ..conftest import metric, orders_sqlite, samples_of, serving
from .test_asgi import REQUESTS, raw, uvicorn_serving


class _Quiet(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def wsgiref_serving(app: object) -> Iterator[int]:
    """`app` under wsgiref on a free port of 127.0.0.1, served from a thread; shut down after the block."""
    server = wsgiref.simple_server.make_server("127.0.0.1", 0, app, handler_class=_Quiet)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_the_wsgi_app_answers_as_the_aiohttp_route_and_the_asgi_app_do(
    exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    orders_sqlite(exporter, sync_engines, tmp_path / "db.sqlite")
    async with serving(make_app(exporter)) as aio, uvicorn_serving(metrics_app(exporter)) as asgi:
        with wsgiref_serving(wsgi_metrics_app(exporter)) as wsgi:
            for name, request in REQUESTS.items():
                ours = await raw(aio.port, request.format(path="/metrics"))
                assert await raw(asgi, request.format(path="/")) == ours, name
                assert await raw(wsgi, request.format(path="/")) == ours, name
                if name == "text":
                    samples = samples_of(ours[2].decode())
                    assert metric(samples, "sqlalchemy_transactions_total", pool="orders", outcome="commit") == 8.0
                if name == "gzip":
                    assert ours[1]["content-encoding"] == "gzip"
                if name == "post":
                    assert ours[0] == 405


async def test_the_bounds_are_the_responses_own(exporter: Exporter) -> None:
    """A query or an Accept header past aiohttp's 8190 bytes: aiohttp refuses it itself (400), the WSGI
    app with the response's own 414 and 431, never reading further."""
    with wsgiref_serving(wsgi_metrics_app(exporter)) as wsgi:
        status, _, body = await raw(wsgi, f"GET /?{'a' * 8191} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (status, body) == (414, b"414: query string too long")
        long_accept = "text/plain," * 745
        status, _, body = await raw(
            wsgi, f"GET / HTTP/1.1\r\nHost: x\r\nAccept: {long_accept}\r\nConnection: close\r\n\r\n"
        )
        assert (status, body) == (431, b"431: Accept or Accept-Encoding header too long")


async def test_the_pools_app_gives_the_aiohttp_servers_json(
    exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    orders_sqlite(exporter, sync_engines, tmp_path / "db.sqlite")
    async with serving(make_app(exporter)) as aio:
        with wsgiref_serving(wsgi_pools_app(exporter)) as wsgi:
            request = "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            status, headers, body = await raw(wsgi, request.format(path="/"))
            theirs = await raw(aio.port, request.format(path="/pools"))
    json_type = "application/json; charset=utf-8"
    assert (status, headers["content-type"]) == (theirs[0], theirs[1]["content-type"]) == (200, json_type)
    (pool,) = json.loads(body)["pools"]
    (their_pool,) = json.loads(theirs[2])["pools"]
    assert (pool["name"], pool["size"], pool["idle"], pool["checkouts"]) == ("orders", 2, 1, 8)
    assert pool.keys() == their_pool.keys()
