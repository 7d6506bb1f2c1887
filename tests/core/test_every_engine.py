"""instrument_all(): every Engine and AsyncEngine created afterwards, whatever way create_engine was imported."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text  # imported before instrument_all(): the "early import" way
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import QueuePool

from sqlalchemy_pool_exporter import Exporter, handle_for, instrument_all

from ..conftest import sample


@pytest.fixture(autouse=True)
def _hook_removed() -> Iterator[None]:
    yield
    assert "engine_created" not in vars(DefaultDialect)  # every test's Exporters closed: nothing left behind


def sqlite(path: Path) -> sqlalchemy.Engine:
    return create_engine(f"sqlite:///{path}", poolclass=QueuePool, pool_size=2, max_overflow=0)


async def test_sync_and_async_engines_created_afterwards_are_instrumented_and_count_exactly(
    tmp_path: Path, registry: CollectorRegistry, exporter: Exporter
) -> None:
    assert instrument_all(exporter) is exporter
    sync = sqlite(tmp_path / "sync.sqlite")
    aio = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'async.sqlite'}", pool_size=2, max_overflow=0)
    try:
        with sync.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
        for i in range(3):
            with sync.begin() as conn:
                conn.execute(text("INSERT INTO t VALUES (:x)"), {"x": i})
        async with aio.begin() as aconn:
            await aconn.execute(text("CREATE TABLE t (x INTEGER)"))
        for i in range(5):
            async with aio.begin() as aconn:
                await aconn.execute(text("INSERT INTO t VALUES (:x)"), {"x": i})
        sync_handle, async_handle = handle_for(sync), handle_for(aio)
        assert sync_handle is not None and async_handle is not None
        assert sync_handle.owner is exporter and async_handle.owner is exporter
        assert sync_handle.name == f"sqlite:{tmp_path / 'sync.sqlite'}"
        assert sample(registry, "sqlalchemy_transactions_total", pool=sync_handle.name, outcome="commit") == 4
        assert sample(registry, "sqlalchemy_transactions_total", pool=async_handle.name, outcome="commit") == 6
        assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=async_handle.name) == 6
    finally:
        sync.dispose()
        await aio.dispose()


def test_engines_instrumented_before_or_elsewhere_are_left_as_they_are(tmp_path: Path, exporter: Exporter) -> None:
    before = sqlite(tmp_path / "before.sqlite")
    with Exporter(CollectorRegistry()) as other:
        other.instrument_all(statements=False)
        exporter.instrument_all()  # stacked on `other`'s hook: `other` is asked first and takes the engine
        taken = sqlite(tmp_path / "taken.sqlite")
        handle = handle_for(taken)
        assert handle is not None and handle.owner is other and handle.options["statements"] is False
    # `other` closed: its hook passes through, ours is still on.
    after = sqlite(tmp_path / "after.sqlite")
    handle = handle_for(after)
    assert handle is not None and handle.owner is exporter
    assert handle_for(before) is None
    assert handle_for(taken) is None  # close() uninstrumented what `other` took
    for engine in (before, taken, after):
        engine.dispose()


def test_close_stops_it_and_an_explicit_instrument_wins(tmp_path: Path, registry: CollectorRegistry) -> None:
    exporter = Exporter(registry)
    exporter.instrument_all(leak_threshold=30)
    auto = sqlite(tmp_path / "auto.sqlite")
    handle = handle_for(auto)
    assert handle is not None and handle.options["leak_threshold"] == 30
    # The application names it itself afterwards: no AlreadyInstrumented, its name and options win.
    named = exporter.instrument(auto, name="orders")
    assert named is not handle and named.name == "orders" and named.options["leak_threshold"] is None
    assert handle_for(auto) is named
    assert exporter.instrument(auto, name="orders") is named  # an explicit handle is not replaced again
    exporter.close()
    later = sqlite(tmp_path / "later.sqlite")
    assert handle_for(later) is None and handle_for(auto) is None
    exporter.close()  # idempotent
    for engine in (auto, later):
        engine.dispose()


def test_the_url_plugins_options_win_over_instrument_all(tmp_path: Path, exporter: Exporter) -> None:
    exporter.instrument_all()
    url = f"sqlite:///{tmp_path / 'p.sqlite'}?plugin=pool_exporter&pool_exporter_name=by-url"
    engine = create_engine(url, poolclass=QueuePool)
    handle = handle_for(engine)
    try:
        assert handle is not None and handle.name == "by-url"
    finally:
        if handle is not None:
            handle.uninstrument()
        engine.dispose()
