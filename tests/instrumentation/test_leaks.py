"""Leak detection: a connection held past the threshold is reported once, with where it was taken."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter import Exporter

from ..conftest import PgEngineFactory, poll, poll_sync


def exporter_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sqlalchemy_pool_exporter" and r.levelno == level]


async def test_async_connection_held_past_threshold_warns_once_with_the_checkout_stack(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sqlalchemy_pool_exporter")
    engine, _ = pg_engine(pool_size=2, max_overflow=0)
    handle = exporter.instrument(engine, leak_threshold=0.2)

    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        await asyncio.sleep(0.5)
        await poll(lambda: len(exporter_records(caplog, logging.WARNING)) >= 1)
        assert not exporter_records(caplog, logging.INFO)

    (warning,) = exporter_records(caplog, logging.WARNING)
    message = warning.getMessage()
    assert "leak threshold" in message
    # The stack reaches the application code across SQLAlchemy's greenlet.
    assert "test_async_connection_held_past_threshold_warns_once_with_the_checkout_stack" in message
    assert Path(__file__).name in message
    assert warning.__dict__["pool"] == handle.name
    assert warning.__dict__["held_seconds"] >= 0.2
    (info,) = exporter_records(caplog, logging.INFO)
    assert "came back" in info.getMessage()
    assert len(exporter_records(caplog, logging.WARNING)) == 1
    assert handle.check_leaks() == 0


def test_sync_leak_warning_and_info_on_return(
    registry: CollectorRegistry,
    exporter: Exporter,
    sync_engines: list[Engine],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.INFO, logger="sqlalchemy_pool_exporter")
    engine = create_engine(f"sqlite:///{tmp_path}/leak.db")
    sync_engines.append(engine)
    handle = exporter.instrument(engine, leak_threshold=0.2)

    def hold_a_connection_too_long() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            poll_sync(lambda: bool(exporter_records(caplog, logging.WARNING)))
            # Later watchdog rounds must not repeat the warning for the same checkout.
            assert handle.check_leaks() == 0

    hold_a_connection_too_long()

    (warning,) = exporter_records(caplog, logging.WARNING)
    assert "hold_a_connection_too_long" in warning.getMessage()
    assert Path(__file__).name in warning.getMessage()
    (info,) = exporter_records(caplog, logging.INFO)
    assert "came back" in info.getMessage()


async def test_without_threshold_no_stack_is_captured_and_nothing_is_logged(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sqlalchemy_pool_exporter")
    engine, _ = pg_engine()
    handle = exporter.instrument(engine)

    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        (checkout,) = handle.stats.checkouts.values()
        assert checkout.stack is None
        assert handle.check_leaks() == 0

    assert handle.leak_threshold is None
    assert not exporter_records(caplog, logging.WARNING)
    assert not exporter_records(caplog, logging.INFO)


async def test_with_threshold_the_stack_is_captured_at_checkout(
    pg_engine: PgEngineFactory, registry: CollectorRegistry, exporter: Exporter
) -> None:
    engine, _ = pg_engine()
    handle = exporter.instrument(engine, leak_threshold=60)

    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
        (checkout,) = handle.stats.checkouts.values()
        assert checkout.stack is not None
        names = [frame.name for frame in checkout.stack]
        assert "test_with_threshold_the_stack_is_captured_at_checkout" in names


def test_leak_threshold_must_be_positive(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine]
) -> None:
    engine = create_engine("sqlite://")
    sync_engines.append(engine)
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="leak_threshold"):
            exporter.instrument(engine, leak_threshold=bad)
    assert pool_exporter.handle_for(engine) is None
