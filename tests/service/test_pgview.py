"""The server's view, against the local PostgreSQL, with a session held idle in transaction."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url

from sqlalchemy_pool_exporter import validation
from sqlalchemy_pool_exporter.service.pgview import ServerView
from sqlalchemy_pool_exporter.web.app import make_app

from ..conftest import PG_HOST, PG_PORT, PG_URL, scrape, serving
from ..conftest import metric as sample

pytestmark = pytest.mark.postgres


@pytest.fixture
async def idle_in_transaction() -> AsyncIterator[str]:
    """Two sessions under a unique application_name: one idle in transaction, one idle."""
    name = f"pgview-test-{uuid.uuid4().hex[:8]}"
    stuck = await asyncpg.connect(
        "postgresql://postgres@127.0.0.1:5432/test", server_settings={"application_name": name}
    )
    idle = await asyncpg.connect(
        "postgresql://postgres@127.0.0.1:5432/test", server_settings={"application_name": name}
    )
    tx = stuck.transaction()
    await tx.start()
    await stuck.execute("SELECT 1")
    try:
        yield name
    finally:
        await tx.rollback()
        await stuck.close()
        await idle.close()


async def test_idle_in_transaction_shows_up(idle_in_transaction: str) -> None:
    name = idle_in_transaction
    view = ServerView(make_url(PG_URL), interval=60)
    registry = CollectorRegistry()
    registry.register(view)
    try:
        assert await view.poll() is True
        reading = view.reading
        assert reading is not None
        assert reading.connections[("test", name, "idle in transaction")] == 1
        assert reading.connections[("test", name, "idle")] == 1
        assert reading.oldest_transaction["test"] > 0
        assert reading.max_connections > 0
        async with serving(make_app(registry=registry)) as server:
            samples = await scrape(f"{server.url}/metrics")
        assert sample(samples, "sqlalchemy_server_up") == 1.0
        labels = {"datname": "test", "application_name": name}
        assert sample(samples, "sqlalchemy_server_connections", **labels, state="idle in transaction") == 1.0
        assert sample(samples, "sqlalchemy_server_connections", **labels, state="idle") == 1.0
        assert sample(samples, "sqlalchemy_server_max_connections") == float(reading.max_connections)
        # The probe's own connection is not counted.
        assert not any(
            k[0] == "sqlalchemy_server_connections" and ("application_name", "pool-exporter") in k[1] for k in samples
        )
    finally:
        await view.stop()


async def test_unreachable_server_reports_up_zero() -> None:
    view = ServerView(make_url("postgresql://postgres:Hidden@127.0.0.1:1/test"), interval=60, timeout=5)
    registry = CollectorRegistry()
    registry.register(view)
    try:
        assert await view.poll() is False
        async with serving(make_app(registry=registry)) as server:
            samples = await scrape(f"{server.url}/metrics")
        assert sample(samples, "sqlalchemy_server_up") == 0.0
        assert not any(name.startswith("sqlalchemy_server_connections") for name, _ in samples)
    finally:
        await view.stop()


OTHER_DB = "pool_exporter_pgview_other"


@pytest.fixture
async def two_databases() -> AsyncIterator[str]:
    """A session in `test` and one in another database of the same server, under one unique application_name."""
    admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", OTHER_DB):
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # another run made it meanwhile
                await admin.execute(f'CREATE DATABASE "{OTHER_DB}"')
    finally:
        await admin.close()
    name = f"pgview-dbs-{uuid.uuid4().hex[:8]}"
    sessions = [
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{db}", server_settings={"application_name": name})
        for db in ("test", OTHER_DB)
    ]
    try:
        yield name
    finally:
        for session in sessions:
            await session.close()


async def _mine(view: ServerView, name: str) -> tuple[dict[str, int], set[str]]:
    """The view's connections of application `name` by database; the databases it gives an oldest transaction for."""
    try:
        assert await view.poll() is True
        reading = view.reading
        assert reading is not None
        mine = {db: n for (db, app, _), n in reading.connections.items() if app == name}
        return mine, set(reading.oldest_transaction)
    finally:
        await view.stop()


async def test_the_view_watches_the_urls_database_by_default(two_databases: str) -> None:
    mine, oldest = await _mine(ServerView(make_url(PG_URL), interval=60), two_databases)
    assert mine == {"test": 1}
    assert oldest == {"test"}


async def test_the_view_watches_the_databases_it_is_given(two_databases: str) -> None:
    everything = ServerView(make_url(PG_URL), interval=60, databases=("*",))
    assert (await _mine(everything, two_databases))[0] == {"test": 1, OTHER_DB: 1}
    named = ServerView(make_url(PG_URL), interval=60, databases=(OTHER_DB, "no_such_db"))
    mine, oldest = await _mine(named, two_databases)
    assert mine == {OTHER_DB: 1}
    assert oldest <= {OTHER_DB}


@pytest.mark.parametrize(
    ("given", "databases"),
    [
        (None, None),
        ("", None),
        (" ", None),
        ("*", ("*",)),
        (" * ", ("*",)),
        ("app", ("app",)),
        ("app, orders ,app", ("app", "orders")),
        ("x" * 63, ("x" * 63,)),
    ],
)
def test_server_view_databases_setting(given: str | None, databases: tuple[str, ...] | None) -> None:
    assert validation.server_view_databases(given) == databases


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        ("app,*", "* (every database) stands alone"),
        ("app,,orders", "an empty database name (two commas, or one at an end)"),
        ("app,", "an empty database name (two commas, or one at an end)"),
        ("x" * 64, "not a PostgreSQL database name (printable, at most 63 bytes): " + repr("x" * 64)),
        ("é" * 32, "not a PostgreSQL database name (printable, at most 63 bytes): " + repr("é" * 32)),
        ("a\nb", "not a PostgreSQL database name (printable, at most 63 bytes): 'a\\nb'"),
        (",".join(f"d{i}" for i in range(101)), "at most 100 databases"),
        # Found by fuzz_settings: a URL given here was accepted as a name and repeated in the settings.
        ("postgresql://u:Hunter2-XyZZy@h/db:/", "a URL, not a database name (the server view's URL is database_url)"),
        (
            "u:Hunter2@" + "x" * 60,
            "not a PostgreSQL database name (printable, at most 63 bytes): (not repeated: it holds an '@')",
        ),
    ],
)
def test_bad_server_view_databases(given: str, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        validation.server_view_databases(given)
    assert str(caught.value) == problem


async def test_reserved_connections_and_the_server_the_pools_name() -> None:
    conn = await asyncpg.connect(PG_URL.replace("postgresql+asyncpg", "postgresql"))
    try:
        superuser = int(await conn.fetchval("SHOW superuser_reserved_connections"))
        reserved = await conn.fetchval("SELECT current_setting('reserved_connections', true)")  # PostgreSQL 16+
        max_connections = int(await conn.fetchval("SHOW max_connections"))
    finally:
        await conn.close()
    view = ServerView(make_url(PG_URL), interval=60)
    registry = CollectorRegistry()
    registry.register(view)
    try:
        assert await view.poll() is True
        assert view.reading is not None
        assert view.reading.reserved_connections == superuser + int(reserved or 0)
        assert view.limit() == max_connections - superuser - int(reserved or 0)
        async with serving(make_app(registry=registry)) as server:
            samples = await scrape(f"{server.url}/metrics")
        assert sample(samples, "sqlalchemy_server_reserved_connections") == float(superuser + int(reserved or 0))
        # As pool_info names the server of an engine on the same URL: host:port, never the user.
        assert sample(samples, "sqlalchemy_server_info", server=f"{PG_HOST}:{PG_PORT}") == 1.0
    finally:
        await view.stop()
