"""The server view in-process, on real PostgreSQL: an idle transaction, a row lock and a waiter behind it,
each holder's numbers equal to what pg_stat_activity and pg_locks say at the same poll."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import create_async_engine

from sqlalchemy_pool_exporter import Exporter, holder
from sqlalchemy_pool_exporter.instrumentation.backends import Backend
from sqlalchemy_pool_exporter.instrumentation.handle import PoolHandle
from sqlalchemy_pool_exporter.instrumentation.serverview import ServerJoin, join

from ..conftest import PG_DB, PG_HOST, PG_PORT, PG_USER, poll, poll_sync, sample

SERVER = f"{PG_USER}@{PG_HOST}:{PG_PORT}/{PG_DB}"
INTERVAL = 0.2


def direct(sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """A query on a connection of the test's own, in autocommit: the server's answer now."""
    with psycopg.connect(f"postgresql://{SERVER}", autocommit=True) as conn:
        cursor = conn.execute(sql, args)
        return cursor.fetchall() if cursor.description is not None else []


def next_poll(handle: PoolHandle) -> ServerJoin:
    """The reading of a poll that started after this call: what the server says of the state set up before."""
    assert handle.server_view is not None
    n = handle.server_view.polls
    poll_sync(lambda: handle.server_view is not None and handle.server_view.polls >= n + 2)
    server = handle.stats.server
    assert server is not None
    return server


@pytest.fixture
def table() -> Iterator[str]:
    name = "serverview_rows"
    direct(f"CREATE TABLE IF NOT EXISTS {name} (id int PRIMARY KEY, n int)")
    direct(f"INSERT INTO {name} VALUES (1, 0) ON CONFLICT DO NOTHING")
    yield name


@pytest.fixture
def engine() -> Iterator[Engine]:
    made = create_engine(f"postgresql+psycopg://{SERVER}", pool_size=4, max_overflow=0)
    yield made
    made.dispose()


def test_idle_transaction_row_lock_and_waiter_by_holder(
    exporter: Exporter, registry: CollectorRegistry, engine: Engine, table: str
) -> None:
    handle = exporter.instrument(engine, name="app", server_view=True, server_view_interval=INTERVAL)
    with holder("await-http"):
        idle_tx = engine.connect()
    with holder("locker"):
        locker = engine.connect()
    with holder("waiter"):
        waiter = engine.connect()
    pids = {
        name: c.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        for name, c in (("await-http", idle_tx), ("locker", locker), ("waiter", waiter))
    }
    locker.execute(text(f"SELECT n FROM {table} WHERE id = 1 FOR UPDATE"))
    done = threading.Event()

    def wait_for_row() -> None:
        waiter.execute(text(f"SELECT n FROM {table} WHERE id = 1 FOR UPDATE"))
        done.set()

    thread = threading.Thread(target=wait_for_row)
    thread.start()
    try:
        poll_sync(
            lambda: direct("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted", pids["waiter"])[0][0] == 1
        )
        server = next_poll(handle)
        # The server's own answer, read now: nothing changes between the poll and this query but time.
        rows = {r[0]: r[1:] for r in direct(
            "SELECT pid, state, wait_event_type, pg_blocking_pids(pid), extract(epoch FROM xact_start)::float8 "
            "FROM pg_stat_activity WHERE pid = ANY(%s)", list(pids.values()))}  # fmt: skip
        not_granted = {r[0] for r in direct("SELECT DISTINCT pid FROM pg_locks WHERE NOT granted")}
        for name, pid in pids.items():
            state, _, _, xact_start = rows[pid]
            assert (
                sample(registry, "sqlalchemy_pool_holder_server_connections", pool="app", holder=name, state=state) == 1
            )
            waiting = 1 if pid in not_granted else 0
            assert (
                sample(registry, "sqlalchemy_pool_holder_lock_waiting_connections", pool="app", holder=name) == waiting
            )
            blocked = sum(1 for other in rows.values() if pid in other[2])
            assert sample(registry, "sqlalchemy_pool_holder_blocking_connections", pool="app", holder=name) == blocked
            # The age at the poll, from the server's xact_start: the same instant, the same clock.
            age = sample(registry, "sqlalchemy_pool_holder_oldest_transaction_seconds", pool="app", holder=name)
            assert age == pytest.approx(server.at - xact_start, abs=0.05)
        assert {name: rows[pid][0] for name, pid in pids.items()} == {
            "await-http": "idle in transaction", "locker": "idle in transaction", "waiter": "active",
        }  # fmt: skip
        assert rows[pids["waiter"]][1] == "Lock" and rows[pids["waiter"]][2] == [pids["locker"]]
        # /pools: the waiter's checkout names its blocker's pid and holder.
        now = {c["holder"]: c for c in handle.snapshot()["checkouts_now"]}
        assert now["waiter"]["backend_pid"] == pids["waiter"]
        assert now["waiter"]["server_state"] == "active"
        assert now["waiter"]["wait_event"] == "Lock:transactionid" or now["waiter"]["wait_event"].startswith("Lock:")
        assert now["waiter"]["blocked_by"] == [{"pid": pids["locker"], "holder": "locker"}]
        assert now["locker"]["blocked_by"] == []
        assert "query" not in now["waiter"]  # statement text only when asked for
    finally:
        locker.rollback()
        thread.join(5)
        waiter.rollback()
        for c in (idle_tx, locker, waiter):
            c.close()
    assert done.is_set()


def test_an_idle_pool_connection_left_in_a_transaction_is_holder_pool(
    exporter: Exporter, registry: CollectorRegistry
) -> None:
    # reset_on_return=None: nothing ends the transaction the app left open, as with a raw connection misused.
    engine = create_engine(f"postgresql+psycopg2://{SERVER}", pool_size=2, pool_reset_on_return=None)
    try:
        exporter.instrument(engine, name="app", server_view=True, server_view_interval=INTERVAL)
        handle = exporter.handle_for(engine)
        assert handle is not None
        raw = engine.raw_connection()
        cursor = raw.cursor()
        cursor.execute("SELECT 1")
        pid = raw.driver_connection.get_backend_pid()
        raw.close()  # back in the pool, its transaction still open
        server = next_poll(handle)
        ((state, xact_start),) = direct(
            "SELECT state, extract(epoch FROM xact_start)::float8 FROM pg_stat_activity WHERE pid = %s", pid
        )
        assert state == "idle in transaction"
        labels = {"pool": "app", "holder": "(pool)"}
        assert sample(registry, "sqlalchemy_pool_holder_server_connections", state=state, **labels) == 1
        assert sample(registry, "sqlalchemy_pool_holder_oldest_transaction_seconds", **labels) == pytest.approx(
            server.at - xact_start, abs=0.05
        )
        assert server.holder_of == {pid: "(pool)"}
    finally:
        engine.dispose()


def test_the_polls_connection_is_not_the_pools_and_stops_with_close(registry: CollectorRegistry) -> None:
    exporter = Exporter(registry, server_view=True, server_view_interval=INTERVAL)  # the Exporter's default
    engine = create_engine(f"postgresql+psycopg://{SERVER}", pool_size=2)
    try:
        handle = exporter.instrument(engine, name="app")
        assert handle.server_view is not None
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            next_poll(handle)
            ours = handle.server_view.backend_pid
            assert ours is not None
            assert direct("SELECT application_name FROM pg_stat_activity WHERE pid = %s", ours) == [("pool-exporter",)]
            assert sample(registry, "sqlalchemy_pool_connections_created_total", pool="app") == 1
            assert sample(registry, "sqlalchemy_pool_create_seconds_count", pool="app") == 1
            assert sample(registry, "sqlalchemy_pool_connections", pool="app", state="used") == 1
            assert sample(registry, "sqlalchemy_pool_connections", pool="app", state="idle") == 0
            assert ours not in handle.stats.backend_pids.values()
        exporter.close()
        assert not handle.server_view.running
        poll_sync(lambda: direct("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", ours)[0][0] == 0)
        assert handle.stats.server is None
    finally:
        exporter.close()
        engine.dispose()


def test_a_failing_poll_is_counted_logged_once_and_leaves_no_reading(
    exporter: Exporter, registry: CollectorRegistry, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    handle = exporter.instrument(engine, name="app", server_view=True, server_view_interval=INTERVAL)
    assert handle.server_view is not None
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        next_poll(handle)
        caplog.set_level(logging.WARNING, "sqlalchemy_pool_exporter")
        errors = sample(registry, "sqlalchemy_exporter_errors_total", pool="app")
        for _ in range(2):  # twice: the second failure is counted, not logged
            ours = handle.server_view.backend_pid
            failures = handle.server_view.failures
            direct("SELECT pg_terminate_backend(%s)", ours)
            poll_sync(lambda f=failures: handle.server_view is not None and handle.server_view.failures == f + 1)
            next_poll(handle)  # and it reconnects
            assert handle.server_view.backend_pid not in (None, ours)
    assert handle.server_view.failures == 2
    assert sample(registry, "sqlalchemy_exporter_errors_total", pool="app") == (errors or 0) + 2
    lines = [r for r in caplog.records if "server view poll failed" in r.getMessage()]
    assert len(lines) == 1


def test_the_join_counts_a_waiter_once_per_holder() -> None:
    rows = {
        1: Backend(1, "idle in transaction", "Client", "ClientRead", 5.0, 4.0, 4.0, ()),
        2: Backend(2, "idle in transaction", "Client", "ClientRead", 3.0, 2.0, 2.0, ()),
        3: Backend(3, "active", "Lock", "tuple", 1.0, 1.0, 1.0, (1, 2)),
    }
    joined = join([(1, "a"), (2, "a"), (3, "b"), (99, "gone")], rows, [(3, 1), (3, 2), (42, 2)], ["idle"])
    assert joined.holders["a"].blocking == 2  # 3 and 42, each once
    assert joined.holders["a"].states == {"idle in transaction": 2}
    assert joined.holders["a"].oldest_transaction == 5.0 and joined.holders["a"].idle_in_transaction == 4.0
    assert joined.holders["b"].lock_waiting == 1 and joined.holders["b"].blocking == 0
    assert joined.holders["gone"].states == {} and joined.holders["idle"].states == {}


async def test_asyncpg_idle_in_transaction(exporter: Exporter, registry: CollectorRegistry) -> None:
    engine = create_async_engine(f"postgresql+asyncpg://{SERVER}", pool_size=2)
    try:
        handle = exporter.instrument(engine, name="app", server_view=True, server_view_interval=INTERVAL)
        assert handle.server_view is not None
        with holder("await-http"):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
                n = handle.server_view.polls
                await poll(lambda: handle.server_view is not None and handle.server_view.polls >= n + 2)
                assert sample(
                    registry, "sqlalchemy_pool_holder_server_connections",
                    pool="app", holder="await-http", state="idle in transaction",
                ) == 1  # fmt: skip
                await conn.rollback()
    finally:
        await engine.dispose()
