"""The server view through the multiprocess files and the sidecar's reader, with two real workers on
PostgreSQL: one holds a row lock, the other waits for that row. Series a worker no longer has read 0."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from ..conftest import PG_DB, PG_HOST, PG_PORT, PG_USER, poll_sync

SERVER = f"{PG_USER}@{PG_HOST}:{PG_PORT}/{PG_DB}"
TABLE = "writer_serverview_rows"

WORKER = """
import os, sys
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, text
from sqlalchemy_pool_exporter import Exporter, holder

role, url = sys.argv[1], sys.argv[2]
exporter = Exporter(REGISTRY, multiprocess_dir=os.environ["PROMETHEUS_MULTIPROC_DIR"], multiprocess_interval=0.1,
                    server_view=True, server_view_interval=0.1)
engine = create_engine(url, pool_size=2)
exporter.instrument(engine, name="shared")
with holder(role):
    conn = engine.connect()
pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
print(pid, flush=True)
if role == "locker":
    conn.execute(text("SELECT n FROM TABLE WHERE id = 1 FOR UPDATE"))
    print("locked", flush=True)
    sys.stdin.readline()
    conn.commit()
else:
    conn.execute(text("SELECT n FROM TABLE WHERE id = 1 FOR UPDATE"))
    conn.commit()
print("done", flush=True)
sys.stdin.readline()
conn.close()
exporter.close()
""".replace("TABLE", TABLE)


def direct(sql: str, *args: object) -> list[tuple[object, ...]]:
    with psycopg.connect(f"postgresql://{SERVER}", autocommit=True) as conn:
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
def spawn(tmp_path: Path, directory: Path) -> Iterator[list[subprocess.Popen[str]]]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs: list[subprocess.Popen[str]] = []
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}

    def start(role: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, str(script), role, f"postgresql+psycopg://{SERVER}"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        procs.append(proc)
        return proc

    yield start  # type: ignore[misc]
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def merged(directory: Path, name: str, **labels: str) -> float | None:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return registry.get_sample_value(name, {"pool": "shared", **labels})


def test_two_workers_lock_and_wait_through_the_files(directory: Path, spawn: object) -> None:
    start = spawn  # type: ignore[assignment]
    locker = start("locker")  # type: ignore[operator]
    assert locker.stdout is not None and locker.stdin is not None
    locker_pid = int(locker.stdout.readline())
    assert locker.stdout.readline().strip() == "locked"
    waiter = start("waiter")  # type: ignore[operator]
    assert waiter.stdout is not None and waiter.stdin is not None
    waiter_pid = int(waiter.stdout.readline())
    poll_sync(lambda: direct("SELECT count(*) FROM pg_locks WHERE pid = %s AND NOT granted", waiter_pid)[0][0] == 1)

    name = "sqlalchemy_pool_holder_"
    expected = {
        ("server_connections", "locker", "idle in transaction"): 1,
        ("server_connections", "waiter", "active"): 1,
        ("blocking_connections", "locker", None): 1,
        ("blocking_connections", "waiter", None): 0,
        ("lock_waiting_connections", "locker", None): 0,
        ("lock_waiting_connections", "waiter", None): 1,
    }

    def read() -> dict[tuple[str, str, str | None], float | None]:
        return {
            (metric, holder, state): merged(
                directory, name + metric, holder=holder, **({"state": state} if state else {})
            )
            for metric, holder, state in expected
        }

    poll_sync(lambda: read() == expected, timeout=15)
    # What the server says, now: the same states, the waiter blocked by the locker alone.
    rows = dict(direct("SELECT pid, state FROM pg_stat_activity WHERE pid = ANY(%s)", [locker_pid, waiter_pid]))
    assert rows == {locker_pid: "idle in transaction", waiter_pid: "active"}
    assert direct("SELECT pg_blocking_pids(%s)", waiter_pid) == [([locker_pid],)]

    # The locker commits, the waiter gets its row: the series they left read 0, not their last value.
    locker.stdin.write("\n")
    locker.stdin.flush()
    assert locker.stdout.readline().strip() == "done"
    assert waiter.stdout.readline().strip() == "done"
    after = {
        ("server_connections", "locker", "idle in transaction"): 0,
        ("server_connections", "waiter", "active"): 0,
        ("blocking_connections", "locker", None): 0,
        ("lock_waiting_connections", "waiter", None): 0,
    }
    poll_sync(lambda: {k: v for k, v in read().items() if k in after} == after, timeout=15)
    for proc in (locker, waiter):
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(30) == 0
