"""application_name for connections the app did not name, as PostgreSQL itself shows it; the app's own kept."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.instrumentation import appname

from ..conftest import PG_DB, PG_HOST, PG_PORT, PG_USER

pytestmark = pytest.mark.postgres

WHERE = f"{PG_USER}@{PG_HOST}:{PG_PORT}/{PG_DB}"
MINE = "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
# This test module's top-level package: the caller instrument() finds.
PACKAGE = __name__.partition(".")[0]


def _unique() -> str:
    return f"lean-{uuid.uuid4().hex[:8]}"


def _sync_name(exporter: Exporter, driver: str, name: str | None, **kwargs: Any) -> str:
    engine = create_engine(f"postgresql+{driver}://{WHERE}", **kwargs)
    try:
        exporter.instrument(engine, name=name)
        with engine.connect() as conn:
            found: str = conn.scalar(text(MINE))
        return found
    finally:
        engine.dispose()


async def _async_name(exporter: Exporter, driver: str, name: str | None, **kwargs: Any) -> str:
    engine = create_async_engine(f"postgresql+{driver}://{WHERE}", **kwargs)
    try:
        exporter.instrument(engine, name=name)
        async with engine.connect() as conn:
            found: str = await conn.scalar(text(MINE))
        return found
    finally:
        await engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_libpq_drivers_get_the_package_and_pool_name(exporter: Exporter, driver: str) -> None:
    name = _unique()
    assert _sync_name(exporter, driver, name) == f"{PACKAGE}:{name}"


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg_async"])
async def test_async_drivers_get_the_package_and_pool_name(exporter: Exporter, driver: str) -> None:
    name = _unique()
    assert await _async_name(exporter, driver, name) == f"{PACKAGE}:{name}"


async def test_an_unnamed_pool_gets_the_package_name(exporter: Exporter) -> None:
    assert await _async_name(exporter, "asyncpg", None) == PACKAGE


async def test_the_apps_own_application_name_is_kept(exporter: Exporter) -> None:
    ours = {"server_settings": {"application_name": "billing", "search_path": "public"}}
    assert await _async_name(exporter, "asyncpg", _unique(), connect_args=ours) == "billing"
    # An empty one is the app's choice too.
    assert (
        await _async_name(exporter, "asyncpg", _unique(), connect_args={"server_settings": {"application_name": ""}})
        == ""
    )
    assert _sync_name(exporter, "psycopg2", _unique(), connect_args={"application_name": "billing"}) == "billing"
    engine = create_engine(f"postgresql+psycopg://{WHERE}?application_name=reports")
    try:
        exporter.instrument(engine, name=_unique())
        with engine.connect() as conn:
            assert conn.scalar(text(MINE)) == "reports"
    finally:
        engine.dispose()
    assert _sync_name(exporter, "psycopg2", _unique(), connect_args={"options": "-c application_name=cron"}) == "cron"


async def test_pgappname_wins_and_asyncpg_gets_it_too(exporter: Exporter, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGAPPNAME", "from-env")
    assert await _async_name(exporter, "asyncpg", _unique()) == "from-env"


async def test_a_long_or_non_ascii_name_is_what_postgresql_shows(exporter: Exporter) -> None:
    name = "ü" + "x" * 100
    expected = f"{PACKAGE}:?{'x' * 100}"[:63]
    assert len(expected) == 63
    assert await _async_name(exporter, "asyncpg", name) == expected


async def test_after_uninstrument_new_connections_are_not_named(exporter: Exporter) -> None:
    engine = create_async_engine(f"postgresql+asyncpg://{WHERE}")
    try:
        handle = exporter.instrument(engine, name=_unique())
        assert handle.application_name == f"{PACKAGE}:{handle.name}"
        handle.uninstrument()
        async with engine.connect() as conn:
            assert await conn.scalar(text(MINE)) == ""
    finally:
        await engine.dispose()


def test_other_databases_are_left_alone(exporter: Exporter) -> None:
    engine = create_engine("sqlite://")
    handle = exporter.instrument(engine, name=_unique())
    assert handle.application_name is None
    assert "connect" not in vars(engine.dialect) or vars(engine.dialect)["connect"].__name__ == "timed_connect"


@pytest.mark.parametrize(
    ("given", "shown"),
    [("orders", "orders"), ("naïve", "na?ve"), ("a\nb", "a?b"), ("x" * 70, "x" * 63), ("", "")],
)
def test_clean(given: str, shown: str) -> None:
    assert appname.clean(given) == shown
