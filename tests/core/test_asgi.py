"""metrics_app: the same answer as the aiohttp route, byte for byte, from a real uvicorn (under asyncio's
loop and uvloop's); mounted in a FastAPI app whose routers sit under prefixes."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import uvicorn
from fastapi import APIRouter, FastAPI
from sqlalchemy import Engine, text

from sqlalchemy_pool_exporter import Exporter, metrics_app
from sqlalchemy_pool_exporter.web.app import make_app

from ..conftest import metric, orders_sqlite, samples_of, serving

pytestmark = pytest.mark.both_loops

BOUND = 30.0
OURS = ("content-type", "content-encoding", "content-length", "allow")


@asynccontextmanager
async def uvicorn_serving(app: object) -> AsyncIterator[int]:
    """`app` under a real uvicorn on a free port of 127.0.0.1, in this test's event loop."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), task.result()
            await asyncio.sleep(0.01)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


async def raw(port: int, request: str) -> tuple[int, dict[str, str], bytes]:
    """One request, as written, on its own connection: status, our headers (lowercased), body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request.encode("latin-1"))
        async with asyncio.timeout(BOUND):
            data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), {k: v for k, v in fields.items() if k in OURS}, body


REQUESTS = {
    "text": "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "openmetrics": "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n"
    "Connection: close\r\n\r\n",
    "gzip": "GET {path} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: br, gzip\r\nConnection: close\r\n\r\n",
    "filtered": "GET {path}?name[]=sqlalchemy_pool_size&name%5B%5D=sqlalchemy_transactions_total HTTP/1.1\r\n"
    "Host: x\r\nConnection: close\r\n\r\n",
    "bad accept": "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=abc\r\n"
    "Accept: text/plain;version=zz\r\nConnection: close\r\n\r\n",
    "head": "HEAD {path} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
    "post": "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    "delete": "DELETE {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
}


async def test_the_asgi_app_answers_as_the_aiohttp_route_does(
    exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    orders_sqlite(exporter, sync_engines, tmp_path / "db.sqlite")
    async with serving(make_app(exporter)) as aio, uvicorn_serving(metrics_app(exporter)) as port:
        for name, request in REQUESTS.items():
            ours = await raw(aio.port, request.format(path="/metrics"))
            theirs = await raw(port, request.format(path="/"))
            assert theirs == ours, name
            if name == "text":
                samples = samples_of(ours[2].decode())
                assert metric(samples, "sqlalchemy_transactions_total", pool="orders", outcome="commit") == 8.0
            if name == "gzip":
                assert ours[1]["content-encoding"] == "gzip"
                assert b'sqlalchemy_pool_size{pool="orders"} 2.0' in gzip.decompress(ours[2])
            if name == "filtered":
                assert sorted({k[0] for k in samples_of(ours[2].decode())}) == [
                    "sqlalchemy_pool_size",
                    "sqlalchemy_transactions_total",
                ]
            if name == "head":
                assert ours[2] == b"" and int(ours[1]["content-length"]) > 1000
            if name in ("post", "delete"):
                assert ours == (
                    405,
                    {"content-type": "text/plain; charset=utf-8", "allow": "GET, HEAD", "content-length": "23"},
                    b"405: Method Not Allowed",
                )


async def test_mounted_in_a_fastapi_app_with_prefixed_routers(
    exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    """Routers included under /api and /api/v2, metrics_app mounted at /metrics and routed at /m:
    after 5 requests that each commit, the commit counter reads exactly 5 more."""
    engine = orders_sqlite(exporter, sync_engines, tmp_path / "db.sqlite")  # 8 commits so far
    orders = APIRouter()

    @orders.post("/orders/{n}")
    def add(n: int) -> dict[str, int]:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": n})
        return {"added": n}

    app = FastAPI()
    app.include_router(orders, prefix="/api")
    app.include_router(orders, prefix="/api/v2")
    app.mount("/metrics", metrics_app(exporter))
    app.add_route("/m", metrics_app(exporter))
    async with uvicorn_serving(app) as port:
        for i in range(5):
            path = "/api/orders" if i % 2 else "/api/v2/orders"
            status, _, _ = await raw(
                port, f"POST {path}/{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            assert status == 200
        for path in ("/metrics/", "/m"):
            status, headers, body = await raw(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (status, headers["content-type"]) == (200, "text/plain; version=0.0.4; charset=utf-8"), path
            samples = samples_of(body.decode())
            assert metric(samples, "sqlalchemy_transactions_total", pool="orders", outcome="commit") == 13.0
        # Starlette sends /metrics on to /metrics/ (Prometheus follows it): the README says so.
        status, _, _ = await raw(port, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 307
