"""`pool-exporter demo`: a small instrumented aiohttp app, its load, and the exporter, on one port.

The app is the pattern the library is for: an AsyncEngine with a deliberately small pool, an
`async_sessionmaker`, every request inside `session_scope()`, and every request's connections named
after its route by `holder_middleware` (who holds the pool).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy import String, event, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ..errors import require
from ..middleware import holder_middleware
from ..session import session_scope

log = logging.getLogger("sqlalchemy_pool_exporter.demo")

# Small on purpose: the load generator's bursts exhaust it and wait past the timeout.
POOL_SIZE = 3
MAX_OVERFLOW = 1
POOL_TIMEOUT = 0.5
POOL_NAME = "demo"
# The demo's leak threshold when the user set none: the report route holds its connection longer.
LEAK_THRESHOLD = 2.0
# The report's slow "external call", made while its transaction is open.
REPORT_HOLD = 3.0

SESSIONS_KEY = web.AppKey("demo_sessions", async_sessionmaker[AsyncSession])
ENGINE_KEY = web.AppKey("demo_engine", AsyncEngine)


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "pool_exporter_demo_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    qty: Mapped[int]


class DemoFailure(Exception):
    """Raised on purpose inside a session scope: the transaction rolls back."""


def async_url(url: URL | str | None, workdir: Path) -> URL:
    """The demo's database: the given URL with an async driver, or a SQLite file in `workdir`."""
    if url is None:
        return make_url(f"sqlite+aiosqlite:///{workdir / 'demo.db'}")
    u = make_url(url) if isinstance(url, str) else url
    if u.drivername in ("postgresql", "postgres"):
        return u.set(drivername="postgresql+asyncpg")
    if u.drivername == "sqlite":
        return u.set(drivername="sqlite+aiosqlite")
    return u


def require_driver(url: URL) -> None:
    """errors.MissingExtra naming the extra when the driver of `url` (from async_url) is not installed."""
    driver = url.get_driver_name()
    if driver == "aiosqlite":
        require("aiosqlite", "demo", "pool-exporter demo on SQLite (its default database)")
    elif driver == "asyncpg":
        require("asyncpg", "asyncpg", "pool-exporter demo on PostgreSQL")


def create_engine(url: URL) -> AsyncEngine:
    """An AsyncEngine with the demo's small pool."""
    engine = create_async_engine(
        url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_timeout=POOL_TIMEOUT, pool_pre_ping=False
    )
    if url.get_backend_name() == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _wal(dbapi_connection: Any, record: Any) -> None:
            # Readers never wait for the writer; writers wait for each other up to 5 s.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=5000")
            cursor.close()

    return engine


async def create_schema(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)


# -- the app's routes ---------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_to_status(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map the failures the demo provokes to the statuses a real app would return."""
    try:
        return await handler(request)
    except sa_exc.TimeoutError:
        return web.json_response({"error": "pool exhausted: timed out waiting for a connection"}, status=503)
    except DemoFailure as exc:
        return web.json_response({"error": str(exc), "rolled_back": True}, status=409)


async def list_items(request: web.Request) -> web.Response:
    async with session_scope(request.app[SESSIONS_KEY]) as session:
        count = await session.scalar(select(func.count()).select_from(Item))
    return web.json_response({"items": count})


async def add_item(request: web.Request) -> web.Response:
    async with session_scope(request.app[SESSIONS_KEY]) as session:
        session.add(Item(name="widget", qty=1))
    return web.json_response({"added": 1}, status=201)


async def failing_write(request: web.Request) -> web.Response:
    async with session_scope(request.app[SESSIONS_KEY]) as session:
        session.add(Item(name="doomed", qty=-1))
        await session.flush()
        raise DemoFailure("validation failed after the insert")


async def slow(request: web.Request) -> web.Response:
    seconds = min(float(request.query.get("seconds", "0.5")), 30.0)
    async with session_scope(request.app[SESSIONS_KEY]) as session:
        await session.execute(select(func.count()).select_from(Item))
        # Holding the connection while doing something else: the classic pool hog.
        await asyncio.sleep(seconds)
    return web.json_response({"held": seconds})


async def report(request: web.Request) -> web.Response:
    """Read, then wait on a slow external call with the transaction still open: the pool's top holder."""
    seconds = min(float(request.query.get("seconds", str(REPORT_HOLD))), 30.0)
    async with session_scope(request.app[SESSIONS_KEY]) as session:
        total = await session.scalar(select(func.coalesce(func.sum(Item.qty), 0)))
        # The external call (a payment provider, a PDF renderer) belongs after the commit; here it
        # keeps the connection, and the leak threshold reports it by route.
        await asyncio.sleep(seconds)
    return web.json_response({"total": total, "held": seconds})


async def leak(request: web.Request) -> web.Response:
    """Check a connection out and drop it without returning it: the garbage collector reclaims it."""
    conn = await request.app[ENGINE_KEY].connect()
    await conn.exec_driver_sql("SELECT 1")
    del conn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gc.collect()
    return web.json_response({"leaked": 1})


def add_demo_routes(app: web.Application, engine: AsyncEngine) -> None:
    """Mount the demo app's routes under /demo on `app`."""
    app[ENGINE_KEY] = engine
    app[SESSIONS_KEY] = async_sessionmaker(engine, expire_on_commit=False)
    # Outermost first: the holder is named before any handler (or error mapping) runs.
    app.middlewares.append(holder_middleware)
    app.middlewares.append(errors_to_status)
    app.router.add_get("/demo/items", list_items)
    app.router.add_post("/demo/items", add_item)
    app.router.add_post("/demo/fail", failing_write)
    app.router.add_get("/demo/slow", slow)
    app.router.add_get("/demo/report", report)
    app.router.add_post("/demo/leak", leak)
