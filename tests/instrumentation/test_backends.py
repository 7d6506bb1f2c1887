"""Backend ids read when the pool opens a connection, checked against the server's own pg_backend_pid()."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

from sqlalchemy_pool_exporter import Exporter
from sqlalchemy_pool_exporter.instrumentation import backends

from ..conftest import PG_DB, PG_HOST, PG_PORT, PG_USER

SERVER = f"{PG_USER}@{PG_HOST}:{PG_PORT}/{PG_DB}"


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_sync_drivers_know_their_backend(exporter: Exporter, driver: str) -> None:
    engine = create_engine(f"postgresql+{driver}://{SERVER}", pool_size=2)
    try:
        handle = exporter.instrument(engine)
        with engine.connect() as a, engine.connect() as b:
            server = {
                a.exec_driver_sql("SELECT pg_backend_pid()").scalar(),
                b.exec_driver_sql("SELECT pg_backend_pid()").scalar(),
            }
            ours = {handle.stats.backend_pids[record] for record in handle.stats.checked_out}
        assert ours == server
        assert len(ours) == 2
        # Closed connections take their id with them: the pool's two idle ones are what is left.
        engine.dispose()
        assert dict(handle.stats.backend_pids) == {}
    finally:
        engine.dispose()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_async_drivers_know_their_backend(exporter: Exporter, driver: str) -> None:
    engine = create_async_engine(f"postgresql+{driver}://{SERVER}", pool_size=2)
    try:
        handle = exporter.instrument(engine)
        async with engine.connect() as conn:
            server = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar()
            assert [handle.stats.backend_pids[r] for r in handle.stats.checked_out] == [server]
    finally:
        await engine.dispose()


def test_other_databases_have_none(exporter: Exporter) -> None:
    engine = create_engine("sqlite://")
    handle = exporter.instrument(engine)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        assert dict(handle.stats.backend_pids) == {}
    assert backends.supported("sqlite", "pysqlite") is False
