"""HolderMiddleware names a request after the whole template its URL matched, across routers and mounts.

A real FastAPI app under a real uvicorn: routers included under prefixes, a router including routers,
a router with a prefix of its own, a mounted FastAPI app with an included router of its own, and
plain Starlette routes under nested Mounts. Each route is asked a different number of times, so
that a name given to the wrong route, or two routes merged under one name, shows in the counts.
The matrix runs this file on the FastAPI and Starlette floors and the latest releases
(docs/compatibility.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import fastapi
import pytest
import starlette
import uvicorn
from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from sqlalchemy_pool_exporter import Exporter, HolderMiddleware

from ..conftest import series


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


# Starlette records the route it matched in scope["route"] from 1.7.0 on; FastAPI's own routes always did.
STARLETTE_ROUTES = version(starlette.__version__) >= (1, 7, 0)


def app_of(engine: AsyncEngine) -> FastAPI:
    async def lookup() -> dict[str, int]:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return {"ok": 1}

    async def plain(request: Request) -> PlainTextResponse:
        await lookup()
        return PlainTextResponse("ok")

    v1, v2 = APIRouter(), APIRouter()
    v1.add_api_route("/x", lookup)
    v1.add_api_route("/notes/{note_id}", lookup)
    v2.add_api_route("/x", lookup)
    api = APIRouter(prefix="/api")  # a router including routers, each under its own prefix
    api.include_router(v1, prefix="/v1")
    api.include_router(v2, prefix="/v2")
    users = APIRouter(prefix="/users")  # a prefix of its own, and one more where it is included
    users.add_api_route("/{user_id}", lookup, methods=["GET", "DELETE"])

    sub = FastAPI()  # a FastAPI app mounted in another, with an included router of its own
    sub.add_api_route("/s/{sid}", lookup)
    deep = APIRouter()
    deep.add_api_route("/deep/{d}", lookup)
    sub.include_router(deep, prefix="/r")

    legacy = Starlette(routes=[Route("/a/{a}", plain), Mount("/mm", routes=[Route("/r/{b}", plain)])])

    app = FastAPI()
    app.include_router(api)
    app.include_router(users, prefix="/admin")
    app.add_api_route("/plain/{p}", lookup)
    app.mount("/sub", sub)
    app.mount("/legacy", legacy)
    app.add_middleware(HolderMiddleware)
    return app


# (method, path) -> (requests sent, the holder they are named after)
PLAN = {
    ("GET", "/api/v1/x"): (1, "GET /api/v1/x"),
    ("GET", "/api/v2/x"): (2, "GET /api/v2/x"),
    ("GET", "/api/v1/notes/{}"): (3, "GET /api/v1/notes/{note_id}"),
    ("GET", "/admin/users/{}"): (4, "GET /admin/users/{user_id}"),
    ("DELETE", "/admin/users/{}"): (5, "DELETE /admin/users/{user_id}"),
    ("GET", "/plain/{}"): (6, "GET /plain/{p}"),
    ("GET", "/sub/s/{}"): (7, "GET /sub/s/{sid}"),
    ("GET", "/sub/r/deep/{}"): (8, "GET /sub/r/deep/{d}"),
    ("GET", "/legacy/a/{}"): (9, "GET /legacy/a/{a}" if STARLETTE_ROUTES else "(unmatched)"),
    ("GET", "/legacy/mm/r/{}"): (10, "GET /legacy/mm/r/{b}" if STARLETTE_ROUTES else "(unmatched)"),
}


@contextlib.asynccontextmanager
async def uvicorn_serving(app: FastAPI) -> AsyncIterator[str]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    try:
        deadline = time.monotonic() + 60  # guards a hung start only
        while not server.started:
            assert not serving.done(), serving
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


def by_holder(registry: CollectorRegistry, name: str) -> dict[str, float]:
    return {
        s.labels["holder"]: s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == f"sqlalchemy_pool_holder_{name}" and s.labels.get("pool") == "app"
    }


async def test_holders_are_the_whole_template_across_prefixes_nested_routers_and_mounts(
    tmp_path: Path, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.sqlite'}", pool_size=2, max_overflow=0)
    exporter.instrument(engine, name="app")
    try:
        async with uvicorn_serving(app_of(engine)) as base, aiohttp.ClientSession() as client:
            for (method, path), (count, _) in PLAN.items():
                for i in range(count):
                    async with client.request(method, base + path.format(i)) as response:
                        assert response.status == 200, (method, path, await response.text())
    finally:
        await engine.dispose()

    expected: dict[str, float] = {"none": 0.0}
    for count, holder in PLAN.values():
        expected[holder] = expected.get(holder, 0.0) + count
    assert by_holder(registry, "checkouts_total") == expected, (fastapi.__version__, starlette.__version__)
    assert by_holder(registry, "connections") == dict.fromkeys(expected, 0.0)
    assert registry.get_sample_value("sqlalchemy_pool_checkouts_total", {"pool": "app"}) == sum(
        count for count, _ in PLAN.values()
    )
    assert {s["holder"] for s in series(registry, "sqlalchemy_pool_holder_timeouts_total")} == set(expected)


@pytest.mark.parametrize("root_path", ["", "/proxy"])
async def test_a_root_path_the_server_was_given_is_not_part_of_the_name(
    tmp_path: Path, registry: CollectorRegistry, exporter: Exporter, root_path: str
) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'app.sqlite'}", pool_size=1, max_overflow=0)
    exporter.instrument(engine, name="app")
    app = app_of(engine)
    received: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        received.append(message)

    # uvicorn --root-path: the scope's root_path, and the path with it (the ASGI spec since 2024).
    path = f"{root_path}/api/v2/x"
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": [(b"host", b"x")],
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 1),
    }
    try:
        await app(scope, receive, send)  # type: ignore[arg-type]
    finally:
        await engine.dispose()
    assert received[0]["status"] == 200
    assert by_holder(registry, "checkouts_total") == {"none": 0.0, "GET /api/v2/x": 1.0}
