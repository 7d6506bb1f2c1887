"""Multi-worker mode with real worker processes writing PROMETHEUS_MULTIPROC_DIR, one killed with SIGKILL."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from sqlalchemy_pool_exporter.instrumentation import views

# Runs in a fresh interpreter: PROMETHEUS_MULTIPROC_DIR is in its environment before anything
# imports prometheus_client.
WORKER = """
import os, sys
from sqlalchemy import create_engine, text
import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter import default_exporter

checkouts, hold, db = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
names = os.environ.get("WORKER_NAMES", "default")
engine = create_engine(f"sqlite:///{db}", pool_size=5, max_overflow=0, pool_timeout=30)
handle = pool_exporter.instrument(engine, name="shared", names=names)
for _ in range(checkouts):
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
held = [engine.connect() for _ in range(hold)]
default_exporter(names=names).flush()
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
for conn in held:
    conn.close()
"""

# (checkouts in a loop, connections then held open) per worker.
PLAN = [(3, 1), (5, 2), (7, 0)]


def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError(f"worker {proc.pid} said nothing within {timeout}s")
    return proc.stdout.readline()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[Path, list[subprocess.Popen[str]]]]:
    yield from _workers(tmp_path, "default")


@pytest.fixture
def semconv_workers(tmp_path: Path) -> Iterator[tuple[Path, list[subprocess.Popen[str]]]]:
    yield from _workers(tmp_path, "semconv")


def _workers(tmp_path: Path, names: str) -> Iterator[tuple[Path, list[subprocess.Popen[str]]]]:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "WORKER_NAMES": names}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(n), str(hold), str(tmp_path / f"w{i}.db")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for i, (n, hold) in enumerate(PLAN)
    ]
    yield directory, procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def read_dir(directory: Path) -> CollectorRegistry:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"pool": "shared", **labels})


def test_counters_sum_live_gauges_follow_live_workers(
    workers: tuple[Path, list[subprocess.Popen[str]]],
) -> None:
    directory, procs = workers
    for proc in procs:
        assert read_line(proc).split() == ["ready", str(proc.pid)]

    registry = read_dir(directory)
    total_checkouts = sum(n + hold for n, hold in PLAN)
    assert value(registry, "sqlalchemy_pool_checkouts_total") == total_checkouts
    assert value(registry, "sqlalchemy_pool_wait_seconds_count") == total_checkouts
    assert value(registry, "sqlalchemy_pool_wait_seconds_bucket", le="+Inf") == total_checkouts
    assert value(registry, "sqlalchemy_pool_use_seconds_count") == sum(n for n, _ in PLAN)
    assert value(registry, "sqlalchemy_pool_connections_created_total") == 1 + 2 + 1
    assert value(registry, "sqlalchemy_pool_connections", state="used") == 1 + 2 + 0
    assert value(registry, "sqlalchemy_pool_connections", state="idle") == 0 + 0 + 1
    assert value(registry, "sqlalchemy_pool_size") == 3 * 5
    assert value(registry, "sqlalchemy_pool_max_connections") == 3 * 5
    assert value(registry, "sqlalchemy_pool_timeout_seconds") == 30
    assert value(registry, "sqlalchemy_pool_pending_requests") == 0
    assert value(registry, "sqlalchemy_transactions_total", outcome="close") == sum(n for n, _ in PLAN)
    assert value(registry, "sqlalchemy_transactions_total", outcome="rollback") == 0
    assert value(registry, "sqlalchemy_statement_seconds_count", operation="select") == sum(n for n, _ in PLAN)
    assert registry.get_sample_value("sqlalchemy_exporter_build_info", {"version": _version()}) == 1
    rows = views.pools_from_metrics(registry.collect(), "sqlalchemy")
    assert [(row["name"], row["used"], row["idle"], row["checkouts"]) for row in rows] == [
        ("shared", 3, 1, total_checkouts)
    ]

    # The worker holding two connections dies without any chance to clean up.
    killed = procs[1]
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(10) == -signal.SIGKILL
    # What the sidecar does for a dead pid: its live gauges go, its counters stay.
    mark_process_dead(killed.pid, str(directory))

    registry = read_dir(directory)
    assert value(registry, "sqlalchemy_pool_connections", state="used") == 1 + 0
    assert value(registry, "sqlalchemy_pool_connections", state="idle") == 0 + 1
    assert value(registry, "sqlalchemy_pool_size") == 2 * 5
    assert value(registry, "sqlalchemy_pool_checkouts_total") == total_checkouts
    assert value(registry, "sqlalchemy_pool_connections_created_total") == 4

    # The others return their connections and exit normally: their last numbers are flushed at exit.
    for proc in (procs[0], procs[2]):
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
    for proc in (procs[0], procs[2]):
        assert proc.wait(30) == 0
    registry = read_dir(directory)
    assert value(registry, "sqlalchemy_pool_use_seconds_count") == sum(n for n, _ in PLAN) + 1
    assert value(registry, "sqlalchemy_pool_connections", state="used") == 0
    assert value(registry, "sqlalchemy_pool_connections", state="idle") == 1 + 1
    for proc in (procs[0], procs[2]):
        mark_process_dead(proc.pid, str(directory))
    registry = read_dir(directory)
    assert value(registry, "sqlalchemy_pool_connections", state="used") is None
    assert value(registry, "sqlalchemy_pool_checkouts_total") == total_checkouts


def test_semconv_names_in_the_files_and_in_the_sidecar_pool_view(
    semconv_workers: tuple[Path, list[subprocess.Popen[str]]],
) -> None:
    """Workers with names="semconv" write the conventions' names; the sidecar's pool view reads them too."""
    directory, procs = semconv_workers
    for proc in procs:
        assert read_line(proc).split() == ["ready", str(proc.pid)]
    registry = read_dir(directory)
    pool = {"db_client_connection_pool_name": "shared"}
    total_checkouts = sum(n + hold for n, hold in PLAN)
    selects = sum(n for n, _ in PLAN)

    def semconv(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {**pool, **labels})

    assert semconv("db_client_connection_count", db_client_connection_state="used") == 1 + 2 + 0
    assert semconv("db_client_connection_count", db_client_connection_state="idle") == 0 + 0 + 1
    assert semconv("db_client_connection_max") == 3 * 5
    assert semconv("db_client_connection_idle_max") == 3 * 5
    assert semconv("db_client_connection_pending_requests") == 0
    assert semconv("db_client_connection_timeouts_total") == 0
    assert semconv("db_client_connection_wait_time_seconds_count") == total_checkouts
    assert semconv("db_client_connection_use_time_seconds_count") == selects
    assert semconv("db_client_connection_create_time_seconds_count") == 1 + 2 + 1
    op = {"db_system_name": "sqlite", "db_operation_name": "SELECT"}
    assert semconv("db_client_operation_duration_seconds_count", **op) == selects
    # The conventions' bounds for db.client.operation.duration, not ours.
    assert semconv("db_client_operation_duration_seconds_bucket", le="0.001", **op) is not None
    assert semconv("db_client_operation_duration_seconds_bucket", le="0.0001", **op) is None
    # Metrics the conventions do not define keep our names, with the conventions' pool label.
    assert semconv("sqlalchemy_pool_checkouts_total") == total_checkouts
    assert semconv("sqlalchemy_transactions_total", outcome="close") == selects
    assert semconv("sqlalchemy_transactions_total", outcome="rollback") == 0
    assert registry.get_sample_value("sqlalchemy_pool_checkouts_total", {"pool": "shared"}) is None
    assert registry.get_sample_value("sqlalchemy_exporter_build_info", {"version": _version()}) == 1

    rows = views.pools_from_metrics(registry.collect(), "sqlalchemy")
    assert [{k: row[k] for k in ("name", "used", "idle", "size", "max", "checkouts", "timeouts")} for row in rows] == [
        {"name": "shared", "used": 3, "idle": 1, "size": 15, "max": 15, "checkouts": total_checkouts, "timeouts": 0}
    ]
    assert rows[0]["transactions"] == {"close": selects, "rollback": 0, "commit": 0}


def test_a_running_worker_flushes_on_its_own(tmp_path: Path) -> None:
    """Without default_exporter().flush(), the writer thread publishes within its 1 s interval."""
    directory = tmp_path / "multiproc"
    directory.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.replace("default_exporter().flush()\n", ""))
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    with subprocess.Popen(
        [sys.executable, str(script), "4", "1", str(tmp_path / "w.db")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            assert read_line(proc).split()[0] == "ready"
            deadline = time.monotonic() + 10
            while value(read_dir(directory), "sqlalchemy_pool_connections", state="used") != 1:
                assert time.monotonic() < deadline, "the writer thread never flushed"
                time.sleep(0.05)
            assert value(read_dir(directory), "sqlalchemy_pool_checkouts_total") == 5
        finally:
            proc.kill()
            proc.wait(10)


def _version() -> str:
    from sqlalchemy_pool_exporter import __version__

    return __version__
