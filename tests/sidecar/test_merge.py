"""The sidecar over real worker processes writing a multiprocess directory."""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sqlalchemy_pool_exporter.instrumentation import views
from sqlalchemy_pool_exporter.sidecar.merge import JOURNAL, Sidecar
from sqlalchemy_pool_exporter.web.app import make_app

from ..conftest import MP_WORKER, PYTHON, scrape, serving
from ..conftest import clean_env as cli_env
from ..conftest import metric as sample


class Workers:
    def __init__(self, directory: Path, tmp: Path) -> None:
        self.directory = directory
        self.script = tmp / "worker.py"
        self.script.write_text(MP_WORKER)
        self.db = tmp / "app.sqlite"
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, commits: int, held: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [PYTHON, str(self.script), str(commits), str(held), str(self.db)],
            env=cli_env(PROMETHEUS_MULTIPROC_DIR=str(self.directory)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        return proc

    def stop(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0

    def kill(self, proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    w = Workers(directory, tmp_path)
    yield w
    w.close()


def db_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.db"))


async def test_sigkilled_worker_drops_live_gauges_and_keeps_counters(workers: Workers) -> None:
    a = workers.start(commits=3, held=2)
    b = workers.start(commits=5, held=1)
    sidecar = Sidecar(workers.directory)
    registry = CollectorRegistry()
    registry.register(sidecar)
    app = make_app(registry=registry, pools=sidecar.pools, offload=True, executor=sidecar.executor)
    try:
        async with serving(app) as server:
            url = f"{server.url}/metrics"
            before = await scrape(url)
            assert sample(before, "sqlalchemy_pool_connections", pool="app", state="used") == 3.0
            assert sample(before, "sqlalchemy_pool_checkouts_total", pool="app") == 11.0
            assert sample(before, "sqlalchemy_transactions_total", pool="app", outcome="commit") == 8.0
            assert sample(before, "sqlalchemy_exporter_sidecar_workers") == 2.0

            workers.kill(b)
            after = await scrape(url)
            # b's live gauges are gone with it; what it counted stays.
            assert sample(after, "sqlalchemy_pool_connections", pool="app", state="used") == 2.0
            assert sample(after, "sqlalchemy_pool_checkouts_total", pool="app") == 11.0
            assert sample(after, "sqlalchemy_transactions_total", pool="app", outcome="commit") == 8.0
            assert sample(after, "sqlalchemy_pool_wait_seconds_count", pool="app") == 11.0
            assert sample(after, "sqlalchemy_exporter_sidecar_reaped_workers_total") == 1.0
            assert sample(after, "sqlalchemy_exporter_sidecar_workers") == 1.0
            assert not any(name.endswith(f"_{b.pid}.db") for name in db_files(workers.directory))

            workers.stop(a)  # a clean exit: its alive mark goes, so the sidecar reaps it too
            last = await scrape(url)
            assert sample(last, "sqlalchemy_pool_connections", pool="app", state="used") is None
            assert sample(last, "sqlalchemy_pool_checkouts_total", pool="app") == 11.0
            assert sample(last, "sqlalchemy_exporter_sidecar_reaped_workers_total") == 2.0
            assert db_files(workers.directory) == ["counter_archive.db", "gauge_max_archive.db", "histogram_archive.db"]
            pools = await sidecar.pools()
            assert pools == [
                {
                    "name": "app",
                    "transactions": {"commit": 8, "rollback": 0, "close": 0},
                    "checkouts": 11,
                    "timeouts": 0,
                    "connections_created": 3,
                    "connections_closed": 0,
                    "disconnects": 0,
                    "leaked": 0,
                    "exporter_errors": 0,
                    "timeout": 30,
                    # Every catalog field with a series in the directory, as in-process /pools.
                    "invalidations": {"hard": 0, "soft": 0},
                    "savepoints": {"release": 0, "rollback": 0},
                    # No live worker: no size advice to put in words.
                    "workers": 0,
                    "sizing": None,
                }
            ]
    finally:
        sidecar.close()


async def test_the_busiest_worker_reads_saturated_beside_an_idle_one(workers: Workers) -> None:
    busy = workers.start(commits=2, held=5)  # pool_size=5, max_overflow=0: all five held
    idle = workers.start(commits=2, held=0)
    sidecar = Sidecar(workers.directory)
    try:
        registry = CollectorRegistry()
        registry.register(sidecar)
        async with serving(make_app(registry=registry, pools=sidecar.pools)) as server:
            got = await scrape(f"{server.url}/metrics")
            # Summed over the workers the pool reads half used; its busiest worker is full.
            assert sample(got, "sqlalchemy_pool_connections", pool="app", state="used") == 5.0
            assert sample(got, "sqlalchemy_pool_max_connections", pool="app") == 10.0
            assert sample(got, "sqlalchemy_pool_worker_utilization_max", pool="app") == 1.0
            assert sample(got, "sqlalchemy_pool_worker_pending_requests_max", pool="app") == 0.0
            async with aiohttp.ClientSession() as session, session.get(f"{server.url}/pools") as resp:
                rows = (await resp.json())["pools"]
            assert rows[0]["worker_utilization_max"] == 1
            assert rows[0]["workers"] == 2
            workers.stop(busy)  # the busiest is gone: the idle one is the busiest now
            got = await scrape(f"{server.url}/metrics")
            assert sample(got, "sqlalchemy_pool_worker_utilization_max", pool="app") == 0.0
            assert sample(got, "sqlalchemy_pool_connections", pool="app", state="used") == 0.0
            workers.stop(idle)
    finally:
        sidecar.close()


def test_the_sidecar_samples_the_pods_traffic_from_the_merged_counters(workers: Workers) -> None:
    a = workers.start(commits=3, held=2)
    b = workers.start(commits=4, held=0)
    sidecar = Sidecar(workers.directory, advice_window=30)
    try:
        metrics = sidecar.merge()
        registry = CollectorRegistry()
        registry.register(sidecar.view)
        text = generate_latest(registry).decode()
        got = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        [(pool, (checkouts, held, created))] = views.advice_counters(metrics, "sqlalchemy").items()
        assert pool == "app"
        assert checkouts == 9.0 == got[("sqlalchemy_pool_checkouts_total", (("pool", "app"),))]
        assert held == got[("sqlalchemy_pool_use_seconds_sum", (("pool", "app"),))]
        assert created == got[("sqlalchemy_pool_connections_created_total", (("pool", "app"),))]
        # The first merge is the window's first snapshot: no advice of its own yet.
        assert sidecar._windows["app"].latest is None
        assert len(sidecar._windows["app"].ring) == 1
        workers.stop(a)
        workers.stop(b)
    finally:
        sidecar.close()


BUDGET_WORKER = """
import sys
from sqlalchemy import create_engine
import sqlalchemy_pool_exporter as pool_exporter
from sqlalchemy_pool_exporter import default_exporter

# Never connects: pool_info and the pool's size come from the URL and the pool's configuration.
engine = create_engine("postgresql+asyncpg://app:s3cret@db.example:5432/orders", pool_size=15, max_overflow=30)
pool_exporter.instrument(engine, name="orders")
default_exporter().flush()
print("ready", flush=True)
sys.stdin.read()
"""


async def test_the_pods_share_of_the_servers_limit(workers: Workers, tmp_path: Path) -> None:
    workers.script.write_text(BUDGET_WORKER)
    procs = [workers.start(commits=0, held=0) for _ in range(4)]
    sidecar = Sidecar(workers.directory)
    sidecar.server_limit = lambda: ("db.example:5432", 97)  # what the server view says: 100 - 3 reserved
    try:
        registry = CollectorRegistry()
        registry.register(sidecar)
        async with serving(make_app(registry=registry, pools=sidecar.pools)) as server:
            got = await scrape(f"{server.url}/metrics")
            labels = {"pool": "orders", "server": "db.example:5432", "database": "orders"}
            assert sample(got, "sqlalchemy_pool_info", **labels, driver="postgresql+asyncpg") == 1.0
            assert sample(got, "sqlalchemy_pool_max_connections", pool="orders") == 180.0
            async with aiohttp.ClientSession() as session, session.get(f"{server.url}/pools") as resp:
                body = await resp.text()
            assert "s3cret" not in body and "app:" not in body
            row = json.loads(body)["pools"][0]
            assert row["server"] == "db.example:5432"
            assert row["server_budget"] == {
                "server": "db.example:5432",
                "limit": 97,
                "pools": ["orders"],
                "max_connections": 180,
                "unlimited_pools": 0,
                "share": 180 / 97,
            }
            async with aiohttp.ClientSession() as session, session.get(f"{server.url}/") as resp:
                page = await resp.text()
            assert "<h2>Connection budget</h2>" in page
            assert "<td>db.example:5432</td><td>97</td><td>1</td><td>180</td><td>1.856</td>" in page
        for proc in procs:
            workers.stop(proc)
    finally:
        sidecar.close()


async def test_compaction_keeps_totals_exact_and_files_flat(workers: Workers) -> None:
    sidecar = Sidecar(workers.directory)
    registry = CollectorRegistry()
    registry.register(sidecar)
    app = make_app(registry=registry, offload=True, executor=sidecar.executor)
    expected = 0
    try:
        async with serving(app) as server:
            for i, commits in enumerate((2, 7, 1, 4, 3)):
                proc = workers.start(commits=commits, held=1)
                expected += commits + 1
                live = await scrape(f"{server.url}/metrics")
                assert sample(live, "sqlalchemy_pool_connections", pool="app", state="used") == 1.0
                if i % 2:
                    workers.kill(proc)
                else:
                    workers.stop(proc)
                samples = await scrape(f"{server.url}/metrics")
                assert sample(samples, "sqlalchemy_pool_checkouts_total", pool="app") == float(expected)
                assert sample(samples, "sqlalchemy_pool_connections", pool="app", state="used") is None
                assert (
                    sample(samples, "sqlalchemy_transactions_total", pool="app", outcome="commit") == expected - i - 1
                )
                assert sample(samples, "sqlalchemy_pool_wait_seconds_count", pool="app") == float(expected)
                assert len(db_files(workers.directory)) == 3
    finally:
        sidecar.close()


class CrashingSidecar(Sidecar):
    """Dies right after writing the compaction journal, before swapping any file."""

    crash = False

    def _recover(self) -> None:
        if self.crash and (self.directory / JOURNAL).exists():
            raise KeyboardInterrupt("simulated crash")
        super()._recover()


def test_a_compaction_interrupted_after_its_journal_is_finished_on_restart(workers: Workers) -> None:
    for commits in (3, 4):
        workers.stop(workers.start(commits=commits, held=0))
    first = CrashingSidecar(workers.directory, same_pid_namespace=True)
    first.crash = True
    with pytest.raises(KeyboardInterrupt):
        first.maintain()
    plan = json.loads((workers.directory / JOURNAL).read_text())
    assert len(plan["remove"]) == 6  # counter, histogram, gauge_max of both workers
    assert all((workers.directory / p).exists() for p in plan["remove"])  # plain names in the directory
    first.close()

    second = Sidecar(workers.directory, same_pid_namespace=True)  # recovers in its constructor
    try:
        assert not (workers.directory / JOURNAL).exists()
        assert db_files(workers.directory) == ["counter_archive.db", "gauge_max_archive.db", "histogram_archive.db"]
        totals = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in second.merge() for s in m.samples}
        assert totals[("sqlalchemy_pool_checkouts_total", (("pool", "app"),))] == 7.0
        assert totals[("sqlalchemy_transactions_total", (("outcome", "commit"), ("pool", "app")))] == 7.0
    finally:
        second.close()


def test_a_compaction_interrupted_before_its_journal_leaves_nothing_behind(workers: Workers) -> None:
    workers.stop(workers.start(commits=2, held=0))
    stray = workers.directory / "counter_archive.db.new"
    stray.write_bytes(b"half-written")
    sidecar = Sidecar(workers.directory, same_pid_namespace=True)
    try:
        assert not stray.exists()
        totals = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in sidecar.merge() for s in m.samples}
        assert totals[("sqlalchemy_pool_checkouts_total", (("pool", "app"),))] == 2.0
    finally:
        sidecar.close()
