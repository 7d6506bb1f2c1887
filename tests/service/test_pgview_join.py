"""The join in the sidecar: two real workers write their checkouts, the sidecar's pg_stat_activity poll
joins them by backend pid; every holder number equals what the server says at the same poll, once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import make_url

from sqlalchemy_pool_exporter.service.pgview import ServerView
from sqlalchemy_pool_exporter.sidecar.merge import Sidecar
from sqlalchemy_pool_exporter.web.app import make_app

from ..conftest import PG_DSN, poll, serving

TABLE = "pgview_join_rows"
WORKER = """
import os, sys
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, text
from sqlalchemy_pool_exporter import Exporter, holder

role, url = sys.argv[1], sys.argv[2]
# server_view=True too: its own series are in the files, and the sidecar must not add them to the join's.
exporter = Exporter(REGISTRY, multiprocess_dir=os.environ["PROMETHEUS_MULTIPROC_DIR"], multiprocess_interval=0.1,
                    server_view=True, server_view_interval=0.1)
engine = create_engine(url, pool_size=2)
exporter.instrument(engine, name="shared")
with holder(role):
    conn = engine.connect()
print(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar(), flush=True)
conn.execute(text("SELECT n FROM TABLE WHERE id = 1 FOR UPDATE"))
conn.commit() if role == "waiter" else None
print("locked", flush=True)
sys.stdin.readline()
conn.rollback()
conn.close()
exporter.close()
""".replace("TABLE", TABLE)


def direct(sql: str, *args: object) -> list[tuple[object, ...]]:
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        cursor = conn.execute(sql, args)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description is not None else []


@pytest.fixture
def directory(tmp_path: Path) -> Path:
    direct(f"CREATE TABLE IF NOT EXISTS {TABLE} (id int PRIMARY KEY, n int)")
    direct(f"INSERT INTO {TABLE} VALUES (1, 0) ON CONFLICT DO NOTHING")
    made = tmp_path / "multiproc"
    made.mkdir()
    return made


@pytest.fixture
def workers(tmp_path: Path, directory: Path) -> Iterator[list[subprocess.Popen[str]]]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    url = PG_DSN.replace("postgresql://", "postgresql+psycopg://")
    procs: list[subprocess.Popen[str]] = []
    for role in ("locker", "waiter"):
        proc = subprocess.Popen(
            [sys.executable, str(script), role, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        procs.append(proc)
        if role == "locker":  # the waiter starts once the row is locked, so the roles are what they say
            assert proc.stdout is not None
            pid_line = proc.stdout.readline()
            assert proc.stdout.readline().strip() == "locked"
            proc.pid_line = pid_line  # type: ignore[attr-defined]
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


async def test_two_workers_row_lock_joined_in_the_sidecar(
    directory: Path, workers: list[subprocess.Popen[str]]
) -> None:
    locker, waiter = workers
    assert locker.stdout is not None and waiter.stdout is not None
    locker_pid = int(locker.pid_line)  # type: ignore[attr-defined]
    waiter_pid = int(waiter.stdout.readline())  # now waiting for the row
    sidecar = Sidecar(directory)
    view = ServerView(make_url(PG_DSN), interval=60, checkouts=lambda: asyncio.to_thread(sidecar.checkouts))
    sidecar.joined = view.joined
    sidecar.checkouts_now = view.checkouts_now
    registry = CollectorRegistry()
    registry.register(sidecar.view)
    registry.register(view)
    try:
        await poll(lambda: direct("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted", waiter_pid) == [(1,)])
        # Both workers' files name their checkout (and their own server-view series are in the files too).
        await poll(lambda: {h.pid for h in sidecar.checkouts()} == {locker_pid, waiter_pid}, timeout=10)
        assert await view.poll()
        reading = view.reading
        assert reading is not None and reading.joins is not None
        at = reading.joins["shared"].at
        rows = {r[0]: r[1:] for r in direct(
            "SELECT pid, state, wait_event_type, pg_blocking_pids(pid), extract(epoch FROM xact_start)::float8,"
            " wait_event, extract(epoch FROM query_start)::float8"
            " FROM pg_stat_activity WHERE pid = ANY(%s)", [locker_pid, waiter_pid])}  # fmt: skip
        assert rows[locker_pid][0] == "idle in transaction" and rows[waiter_pid][:3] == ("active", "Lock", [locker_pid])
        sidecar.merge()
        for holder, pid in (("locker", locker_pid), ("waiter", waiter_pid)):
            labels = {"pool": "shared", "holder": holder}
            state = rows[pid][0]
            assert registry.get_sample_value(
                "sqlalchemy_pool_holder_server_connections", {**labels, "state": state}
            ) == 1  # fmt: skip
            waiting = 1 if rows[pid][1] == "Lock" else 0
            assert registry.get_sample_value("sqlalchemy_pool_holder_lock_waiting_connections", labels) == waiting
            blocking = sum(1 for r in rows.values() if pid in r[2])
            assert registry.get_sample_value("sqlalchemy_pool_holder_blocking_connections", labels) == blocking
            age = registry.get_sample_value("sqlalchemy_pool_holder_oldest_transaction_seconds", labels)
            assert age == pytest.approx(at - rows[pid][3], abs=0.05)
        # Once, not once per worker: each family appears in one collector only.
        text = [m for m in registry.collect() if m.name == "sqlalchemy_pool_holder_blocking_connections"]
        assert len(text) == 1
        assert sum(s.value for s in text[0].samples) == 1
        pools = {row["name"]: row for row in await sidecar.pools()}
        assert pools["shared"]["holder_blocking"] == {"locker": 1, "waiter": 0}
        # /pools and /: each checkout as that poll saw it, the waiter's blocker named by pid and holder.
        join = reading.joins["shared"]
        assert list(join.backends[waiter_pid].blocked_by) == [locker_pid] == rows[waiter_pid][2]
        ages = {h.pid: h.age for h in reading.held}
        app = make_app(registry=registry, pools=sidecar.pools, refresh=sidecar.refresh)
        async with serving(app) as server, aiohttp.ClientSession() as client:
            async with client.get(server.url + "/pools") as response:
                assert response.status == 200
                shown = {row["name"]: row for row in (await response.json())["pools"]}["shared"]["checkouts_now"]
            async with client.get(server.url + "/") as response:
                assert response.status == 200
                page = await response.text()
        assert [c["holder"] for c in shown] == ["locker", "waiter"]  # oldest first
        expected = (("locker", locker_pid, locker), ("waiter", waiter_pid, waiter))
        for c, (holder, pid, worker) in zip(shown, expected, strict=True):
            state, wait_type, blockers, xact_start, wait_event, query_start = rows[pid]
            assert c["server_transaction_age"] == pytest.approx(at - xact_start, abs=0.05)
            assert c["query_age"] == pytest.approx(at - query_start, abs=0.05)
            assert c == {
                "holder": holder,
                "age": round(ages[pid], 3),
                "in_transaction": True,
                "transaction_age": None,
                "stack": None,
                "backend_pid": pid,
                "worker": worker.pid,
                "server_state": state,
                "wait_event": f"{wait_type}:{wait_event}" if wait_type else None,
                "server_transaction_age": c["server_transaction_age"],
                "query_age": c["query_age"],
                "blocked_by": [{"pid": p, "holder": "locker"} for p in blockers],  # pg_blocking_pids(), the same poll's
                "server_polled_at": at,
            }
        assert shown[1]["blocked_by"] == [{"pid": locker_pid, "holder": "locker"}] and shown[0]["blocked_by"] == []
        assert "<th>blocked by</th>" in page
        assert "<td>waiter</td>" in page and f"<td>{waiter_pid}</td><td>active</td>" in page
        assert f"<td>pid {locker_pid} (locker)</td>" in page
    finally:
        await view.stop()
        sidecar.close()
        for proc in workers:
            assert proc.stdin is not None
            proc.stdin.write("\n")
            proc.stdin.flush()
