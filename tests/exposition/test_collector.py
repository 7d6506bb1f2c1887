"""What the scrape-time collector exports for each pool class: QueuePool, NullPool, StaticPool."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool, StaticPool

from sqlalchemy_pool_exporter import Exporter

from ..conftest import sample, series

QUEUE_ONLY = (
    "sqlalchemy_pool_max_connections",
    "sqlalchemy_pool_size",
    "sqlalchemy_pool_overflow_connections",
    "sqlalchemy_pool_timeout_seconds",
)


def names_for(registry: CollectorRegistry, pool: str) -> set[str]:
    return {s.name for m in registry.collect() for s in m.samples if s.labels.get("pool") == pool}


def test_nullpool_exports_what_is_meaningful(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    engine = create_engine(f"sqlite:///{tmp_path}/null.db", poolclass=NullPool)
    sync_engines.append(engine)
    handle = exporter.instrument(engine)
    p = handle.name
    assert p == f"sqlite:{tmp_path}/null.db"

    a, b = engine.connect(), engine.connect()
    a.execute(text("SELECT 1"))
    b.execute(text("SELECT 1"))
    assert sample(registry, "sqlalchemy_pool_connections", pool=p, state="used") == 2
    assert sample(registry, "sqlalchemy_pool_connections", pool=p, state="idle") == 0
    assert (sample(registry, "sqlalchemy_pool_oldest_checkout_seconds", pool=p) or 0) > 0
    a.close()
    b.close()

    assert sample(registry, "sqlalchemy_pool_connections", pool=p, state="used") == 0
    assert sample(registry, "sqlalchemy_pool_connections", pool=p, state="idle") == 0
    assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=p) == 2
    assert sample(registry, "sqlalchemy_pool_connections_created_total", pool=p) == 2
    assert sample(registry, "sqlalchemy_pool_connections_closed_total", pool=p) == 2
    assert sample(registry, "sqlalchemy_pool_use_seconds_count", pool=p) == 2
    assert sample(registry, "sqlalchemy_pool_pending_requests", pool=p) == 0
    assert sample(registry, "sqlalchemy_pool_oldest_checkout_seconds", pool=p) == 0
    assert not names_for(registry, p) & set(QUEUE_ONLY)
    assert sample(registry, "sqlalchemy_exporter_errors_total", pool=p) == 0
    generate_latest(registry)


async def test_async_nullpool_over_aiosqlite(registry: CollectorRegistry, exporter: Exporter, tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/null.db", poolclass=NullPool)
    handle = exporter.instrument(engine)
    p = handle.name
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            assert sample(registry, "sqlalchemy_pool_connections", pool=p, state="used") == 1
        async with engine.begin() as conn:
            await conn.execute(text("SELECT 1"))
        assert sample(registry, "sqlalchemy_pool_connections", pool=p, state="used") == 0
        assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=p) == 2
        assert sample(registry, "sqlalchemy_pool_connections_created_total", pool=p) == 2
        assert sample(registry, "sqlalchemy_pool_connections_closed_total", pool=p) == 2
        assert sample(registry, "sqlalchemy_transactions_total", pool=p, outcome="commit") == 1
        assert sample(registry, "sqlalchemy_transactions_total", pool=p, outcome="rollback") == 0
        assert sample(registry, "sqlalchemy_transactions_total", pool=p, outcome="close") == 1
        assert not names_for(registry, p) & set(QUEUE_ONLY)
    finally:
        handle.uninstrument()
        await engine.dispose()


def test_staticpool_exports_what_is_meaningful(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine]
) -> None:
    engine = create_engine("sqlite://", poolclass=StaticPool)
    sync_engines.append(engine)
    handle = exporter.instrument(engine)
    p = handle.name
    assert p == "sqlite:memory"

    for _ in range(3):
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            assert sample(registry, "sqlalchemy_pool_connections", pool=p, state="used") == 1

    assert sample(registry, "sqlalchemy_pool_connections", pool=p, state="used") == 0
    # A StaticPool has no notion of idle, size or limits: those series are absent, not made up.
    assert sample(registry, "sqlalchemy_pool_connections", pool=p, state="idle") is None
    assert not names_for(registry, p) & set(QUEUE_ONLY)
    assert sample(registry, "sqlalchemy_pool_checkouts_total", pool=p) == 3
    assert sample(registry, "sqlalchemy_pool_connections_created_total", pool=p) == 1
    assert sample(registry, "sqlalchemy_pool_connections_closed_total", pool=p) == 0
    assert sample(registry, "sqlalchemy_exporter_errors_total", pool=p) == 0
    engine.dispose()
    assert sample(registry, "sqlalchemy_pool_connections_closed_total", pool=p) == 1
    generate_latest(registry)


def test_queuepool_series_and_unlimited_overflow_has_no_max(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    limited = create_engine(f"sqlite:///{tmp_path}/q.db", pool_size=3, max_overflow=4, pool_timeout=7)
    unlimited = create_engine(f"sqlite:///{tmp_path}/u.db", pool_size=1, max_overflow=-1)
    sync_engines.extend((limited, unlimited))
    exporter.instrument(limited, name="limited")
    exporter.instrument(unlimited, name="unlimited")

    assert sample(registry, "sqlalchemy_pool_max_connections", pool="limited") == 7
    assert sample(registry, "sqlalchemy_pool_size", pool="limited") == 3
    assert sample(registry, "sqlalchemy_pool_timeout_seconds", pool="limited") == 7
    assert sample(registry, "sqlalchemy_pool_overflow_connections", pool="limited") == 0
    assert sample(registry, "sqlalchemy_pool_max_connections", pool="unlimited") is None
    assert sample(registry, "sqlalchemy_pool_size", pool="unlimited") == 1

    held = [unlimited.connect() for _ in range(3)]
    assert sample(registry, "sqlalchemy_pool_overflow_connections", pool="unlimited") == 2
    assert sample(registry, "sqlalchemy_pool_connections", pool="unlimited", state="used") == 3
    for conn in held:
        conn.close()
    assert sample(registry, "sqlalchemy_pool_overflow_connections", pool="unlimited") == 0
    assert sample(registry, "sqlalchemy_pool_connections", pool="unlimited", state="idle") == 1
    # Every family has HELP/TYPE and one series set per pool.
    text_ = generate_latest(registry).decode()
    assert "# TYPE sqlalchemy_pool_connections gauge" in text_
    assert "# TYPE sqlalchemy_pool_wait_seconds histogram" in text_
    assert {labels["pool"] for labels in series(registry, "sqlalchemy_pool_wait_seconds_count")} == {
        "limited",
        "unlimited",
    }
