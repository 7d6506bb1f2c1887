"""The `?plugin=pool_exporter` URL plugin: instruments the engine, strips its options from the URL."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, event, text

import sqlalchemy_pool_exporter as pool_exporter

from ..conftest import PG_URL, PgEngineFactory


async def test_plugin_instruments_with_url_options_the_driver_never_sees(pg_engine: PgEngineFactory) -> None:
    engine, _ = pg_engine(
        f"{PG_URL}?plugin=pool_exporter&pool_exporter_name=core_plugin_x&pool_exporter_leak_threshold=30"
    )
    handle = pool_exporter.handle_for(engine)
    assert handle is not None
    try:
        assert handle.name == "core_plugin_x"
        assert handle.leak_threshold == 30.0
        assert handle.owner is pool_exporter.default_exporter()
        assert pool_exporter.default_exporter().registry is REGISTRY
        assert not any(k.startswith("pool_exporter_") or k == "plugin" for k in engine.url.query)
        sent: list[dict[str, Any]] = []

        @event.listens_for(engine.sync_engine, "do_connect")
        def remember(dialect: object, record: object, cargs: object, cparams: dict[str, Any]) -> None:
            sent.append(dict(cparams))

        # asyncpg.connect() would raise TypeError on an unknown keyword: connecting proves the strip.
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        (cparams,) = sent
        assert not any("pool_exporter" in k or k == "plugin" for k in cparams)
        assert REGISTRY.get_sample_value("sqlalchemy_pool_checkouts_total", {"pool": "core_plugin_x"}) == 1
        assert REGISTRY.get_sample_value("sqlalchemy_pool_connections", {"pool": "core_plugin_x", "state": "idle"}) == 1
    finally:
        handle.uninstrument()
    assert REGISTRY.get_sample_value("sqlalchemy_pool_checkouts_total", {"pool": "core_plugin_x"}) is None


def test_plugin_default_name_and_bad_option(caplog: pytest.LogCaptureFixture) -> None:
    engine = create_engine("sqlite://?plugin=pool_exporter&pool_exporter_namespace=core_plugin_ns")
    handle = pool_exporter.handle_for(engine)
    assert handle is not None
    try:
        assert handle.name == "sqlite:memory"
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        assert REGISTRY.get_sample_value("core_plugin_ns_pool_checkouts_total", {"pool": "sqlite:memory"}) == 1
    finally:
        handle.uninstrument()
        engine.dispose()
    # A bad option never makes create_engine() raise: it is left out, with one ERROR line.
    caplog.set_level(logging.ERROR, logger="sqlalchemy_pool_exporter")
    engine = create_engine("sqlite://?plugin=pool_exporter&pool_exporter_leak_threshold=soon")
    handle = pool_exporter.handle_for(engine)
    try:
        assert handle is not None and handle.leak_threshold is None
        (error,) = [r.getMessage() for r in caplog.records]
        assert "pool_exporter_leak_threshold ignored" in error and "'soon'" in error
    finally:
        pool_exporter.uninstrument(engine)
        engine.dispose()


def test_two_engines_from_one_url_never_raise(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """The app and Alembic (or an engine factory) create engines from one URL with one explicit name."""
    url = f"sqlite:///{tmp_path}/app.db?plugin=pool_exporter&pool_exporter_name=core_plugin_twice"
    caplog.set_level(logging.WARNING, logger="sqlalchemy_pool_exporter")
    first, second = create_engine(url), create_engine(url)
    try:
        names = [h.name for h in (pool_exporter.handle_for(first), pool_exporter.handle_for(second)) if h]
        assert names == ["core_plugin_twice", "core_plugin_twice#2"]
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        # A disposed engine's name is free again, even before it is garbage-collected.
        second.dispose()
        pool_exporter.uninstrument(second)
        first.dispose()
        third = create_engine(url)
        handle = pool_exporter.handle_for(third)
        assert handle is not None and handle.name == "core_plugin_twice"
        assert pool_exporter.handle_for(first) is None
        pool_exporter.uninstrument(third)
        third.dispose()
    finally:
        for engine in (first, second):
            pool_exporter.uninstrument(engine)
            engine.dispose()


def test_plugin_names_option() -> None:
    url = "sqlite://?plugin=pool_exporter&pool_exporter_namespace=core_plugin_sc&pool_exporter_names=semconv"
    engine = create_engine(url)
    handle = pool_exporter.handle_for(engine)
    assert handle is not None
    try:
        assert handle.owner is pool_exporter.default_exporter("core_plugin_sc", "semconv")
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        pool = {"db_client_connection_pool_name": "sqlite:memory"}
        assert REGISTRY.get_sample_value("core_plugin_sc_pool_checkouts_total", pool) == 1
        used = {**pool, "db_client_connection_state": "used"}  # a SingletonThreadPool: no idle count
        assert REGISTRY.get_sample_value("db_client_connection_count", used) == 0
    finally:
        handle.uninstrument()
        engine.dispose()


def test_server_view_options_from_the_url() -> None:
    engine = create_engine(
        f"{PG_URL.replace('+asyncpg', '+psycopg')}?plugin=pool_exporter&pool_exporter_name=core_plugin_sv"
        "&pool_exporter_server_view=true&pool_exporter_server_view_interval=0.5"
    )
    try:
        handle = pool_exporter.handle_for(engine)
        assert handle is not None and handle.server_view is not None
        assert handle.server_view.interval == 0.5
        assert handle.options["server_view"] is True
    finally:
        pool_exporter.uninstrument(engine)
        engine.dispose()
    assert handle.server_view is not None and not handle.server_view.running
