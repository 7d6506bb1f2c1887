"""The server view in-process, on the local MariaDB through PyMySQL: an idle transaction, a row lock and a
waiter behind it, each holder's numbers equal to what PROCESSLIST, INNODB_TRX and INNODB_LOCK_WAITS say at
the same poll."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from sqlalchemy_pool_exporter import Exporter, holder
from sqlalchemy_pool_exporter.instrumentation.handle import PoolHandle
from sqlalchemy_pool_exporter.instrumentation.serverview import ServerJoin

from ..conftest import poll_sync, sample

MY_HOST = os.environ.get("MYSQL_HOST", "127.0.0.1")
MY_PORT = int(os.environ.get("MYSQL_PORT", "3306"))
DATABASE = "pool_exporter_test"
INTERVAL = 0.2


def direct(sql: str, *args: Any, database: str | None = DATABASE) -> list[tuple[Any, ...]]:
    """A query on a connection of the test's own, in autocommit: the server's answer now."""
    conn = pymysql.connect(host=MY_HOST, port=MY_PORT, user="root", database=database, autocommit=True)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql, args or None)
            return list(cursor.fetchall())
    finally:
        conn.close()


def next_poll(handle: PoolHandle) -> ServerJoin:
    """The reading of a poll that started after this call."""
    assert handle.server_view is not None
    n = handle.server_view.polls
    poll_sync(lambda: handle.server_view is not None and handle.server_view.polls >= n + 2)
    server = handle.stats.server
    assert server is not None
    return server


@pytest.fixture(scope="module")
def table() -> str:
    direct(f"CREATE DATABASE IF NOT EXISTS {DATABASE}", database=None)
    direct("CREATE TABLE IF NOT EXISTS serverview_rows (id int PRIMARY KEY, n int) ENGINE=InnoDB")
    direct("INSERT IGNORE INTO serverview_rows VALUES (1, 0)")
    return "serverview_rows"


@pytest.fixture
def engine(table: str) -> Iterator[Engine]:
    made = create_engine(f"mysql+pymysql://root@{MY_HOST}:{MY_PORT}/{DATABASE}", pool_size=4, max_overflow=0)
    yield made
    made.dispose()


def test_backend_ids_are_the_servers_connection_ids(exporter: Exporter, engine: Engine) -> None:
    handle = exporter.instrument(engine)
    with engine.connect() as a, engine.connect() as b:
        server = {c.exec_driver_sql("SELECT CONNECTION_ID()").scalar() for c in (a, b)}
        assert {handle.stats.backend_pids[r] for r in handle.stats.checked_out} == server
        assert len(server) == 2


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
        name: c.exec_driver_sql("SELECT CONNECTION_ID()").scalar()
        for name, c in (("await-http", idle_tx), ("locker", locker), ("waiter", waiter))
    }
    idle_tx.execute(text(f"SELECT n FROM {table} WHERE id = 1"))  # InnoDB opens the transaction on first read
    locker.execute(text(f"SELECT n FROM {table} WHERE id = 1 FOR UPDATE"))
    done = threading.Event()

    def wait_for_row() -> None:
        waiter.execute(text(f"SELECT n FROM {table} WHERE id = 1 FOR UPDATE"))
        done.set()

    thread = threading.Thread(target=wait_for_row)
    thread.start()
    try:
        waiting_sql = "SELECT count(*) FROM information_schema.INNODB_TRX WHERE trx_mysql_thread_id = %s"
        poll_sync(lambda: direct(waiting_sql + " AND trx_state = 'LOCK WAIT'", pids["waiter"]) == [(1,)])
        server = next_poll(handle)
        # The server's own answer, read now: nothing changes between the poll and this query but time.
        rows = {r[0]: r[1:] for r in direct(
            "SELECT p.ID, p.COMMAND, t.trx_state, UNIX_TIMESTAMP(t.trx_started) FROM information_schema.PROCESSLIST p"
            " LEFT JOIN information_schema.INNODB_TRX t ON t.trx_mysql_thread_id = p.ID WHERE p.ID IN %s",
            tuple(pids.values()))}  # fmt: skip
        edges = set(direct(
            "SELECT r.trx_mysql_thread_id, b.trx_mysql_thread_id FROM information_schema.INNODB_LOCK_WAITS w"
            " JOIN information_schema.INNODB_TRX r ON r.trx_id = w.requesting_trx_id"
            " JOIN information_schema.INNODB_TRX b ON b.trx_id = w.blocking_trx_id"))  # fmt: skip
        assert edges == {(pids["waiter"], pids["locker"])}
        assert {name: rows[pid][:2] for name, pid in pids.items()} == {
            "await-http": ("Sleep", "RUNNING"), "locker": ("Sleep", "RUNNING"), "waiter": ("Query", "LOCK WAIT"),
        }  # fmt: skip
        expected_state = {"await-http": "idle in transaction", "locker": "idle in transaction", "waiter": "active"}
        for name, pid in pids.items():
            labels = {"pool": "app", "holder": name}
            state = expected_state[name]
            assert sample(registry, "sqlalchemy_pool_holder_server_connections", state=state, **labels) == 1
            waiting = 1 if rows[pid][1] == "LOCK WAIT" else 0
            assert sample(registry, "sqlalchemy_pool_holder_lock_waiting_connections", **labels) == waiting
            blocking = sum(1 for _, blocker in edges if blocker == pid)
            assert sample(registry, "sqlalchemy_pool_holder_blocking_connections", **labels) == blocking
            # The age at the poll, from the server's trx_started (whole seconds, so it reads up to 1 s old).
            age = sample(registry, "sqlalchemy_pool_holder_oldest_transaction_seconds", **labels)
            assert age == pytest.approx(server.at - float(rows[pid][2]), abs=0.05)
        now = {c["holder"]: c for c in handle.snapshot()["checkouts_now"]}
        assert now["waiter"]["backend_pid"] == pids["waiter"]
        assert now["waiter"]["server_state"] == "active"
        assert now["waiter"]["blocked_by"] == [{"pid": pids["locker"], "holder": "locker"}]
        assert now["locker"]["blocked_by"] == []
    finally:
        locker.rollback()
        thread.join(5)
        waiter.rollback()
        idle_tx.rollback()
        for c in (idle_tx, locker, waiter):
            c.close()
    assert done.is_set()


def test_the_polls_connection_is_not_the_pools_and_stops_with_close(
    registry: CollectorRegistry, engine: Engine
) -> None:
    exporter = Exporter(registry, server_view=True, server_view_interval=INTERVAL)
    try:
        handle = exporter.instrument(engine, name="app")
        assert handle.server_view is not None
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            next_poll(handle)
            ours = handle.server_view.backend_pid
            assert ours is not None and ours not in handle.stats.backend_pids.values()
            assert direct("SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID = %s", ours) == [(1,)]
            assert sample(registry, "sqlalchemy_pool_connections_created_total", pool="app") == 1
            assert sample(registry, "sqlalchemy_pool_connections", pool="app", state="used") == 1
        exporter.close()
        assert not handle.server_view.running
        poll_sync(lambda: direct("SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID = %s", ours) == [(0,)])
        assert handle.stats.server is None
    finally:
        exporter.close()
