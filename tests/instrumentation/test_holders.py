"""Who holds the pool: holder(), its inheritance by tasks (not by threads or greenlets), the per-holder series,
their bound, the views."""

from __future__ import annotations

import asyncio
import contextvars
import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

from sqlalchemy_pool_exporter import Exporter, holder, session_scope
from sqlalchemy_pool_exporter.instrumentation import holders

from ..conftest import PG_URL, PYTHON, clean_env, poll_sync, sample, series


def held(registry: CollectorRegistry, pool: str) -> dict[str, float]:
    return {
        s["holder"]: sample(registry, "sqlalchemy_pool_holder_connections", **s) or 0.0
        for s in series(registry, "sqlalchemy_pool_holder_connections")
        if s["pool"] == pool
    }


def counter(registry: CollectorRegistry, name: str, pool: str, who: str) -> float | None:
    return sample(registry, f"sqlalchemy_pool_holder_{name}_total", pool=pool, holder=who)


def qp(tmp_path: Path, engines: list[Engine], **kwargs: object) -> Engine:
    engine = create_engine(f"sqlite:///{tmp_path}/db.sqlite", poolclass=QueuePool, **kwargs)  # type: ignore[arg-type]
    engines.append(engine)
    return engine


def test_no_holder_ever_set_exports_no_holder_series(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    engine = qp(tmp_path, sync_engines)
    exporter.instrument(engine, name="p")
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert holders.ATTRIBUTING[0] is False
    assert [m.name for m in registry.collect() if m.name.startswith("sqlalchemy_pool_holder") and m.samples] == []
    assert exporter.handles()[0].stats.checked_out == {}


def test_holders_count_checkouts_hold_and_what_they_hold_now(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    engine = qp(tmp_path, sync_engines, pool_size=3, max_overflow=0)
    exporter.instrument(engine, name="p")

    @holder("report")
    def report() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    with holder("checkout-flow"):
        for _ in range(3):
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        kept = engine.connect()
        with holder("inner"):  # the innermost name wins
            inner = engine.connect()
        report()
        report()
    anonymous = engine.connect()  # after attribution switched on, with no holder: "none"
    assert held(registry, "p") == {"none": 1.0, "checkout-flow": 1.0, "inner": 1.0, "report": 0.0}
    assert sum(held(registry, "p").values()) == sample(registry, "sqlalchemy_pool_connections", pool="p", state="used")
    assert counter(registry, "checkouts", "p", "checkout-flow") == 4
    assert counter(registry, "checkouts", "p", "inner") == 1
    assert counter(registry, "checkouts", "p", "report") == 2
    assert counter(registry, "checkouts", "p", "none") == 1
    hold = counter(registry, "hold_seconds", "p", "checkout-flow")
    assert hold is not None and hold > 0
    before = hold
    time.sleep(0.05)
    kept.close()
    assert counter(registry, "hold_seconds", "p", "checkout-flow") >= before + 0.05  # type: ignore[operator]
    for conn in (inner, anonymous):
        conn.close()
    assert held(registry, "p") == {"none": 0.0, "checkout-flow": 0.0, "inner": 0.0, "report": 0.0}
    assert sample(registry, "sqlalchemy_pool_holder_folded_checkouts_total", pool="p") == 0


def test_timeouts_and_waits_by_holder(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    engine = qp(tmp_path, sync_engines, pool_size=1, max_overflow=0, pool_timeout=0.05)
    exporter.instrument(engine, name="p")
    with holder("hog"):
        hogged = engine.connect()
    for _ in range(3):
        with holder("starved"), pytest.raises(PoolTimeout):
            engine.connect()
    with pytest.raises(PoolTimeout):
        engine.connect()
    hogged.close()
    assert counter(registry, "timeouts", "p", "starved") == 3
    assert counter(registry, "timeouts", "p", "none") == 1
    assert counter(registry, "timeouts", "p", "hog") == 0
    assert sample(registry, "sqlalchemy_pool_timeouts_total", pool="p") == 4
    # A caller that timed out never got a connection: no checkout, no wait counted for it.
    assert counter(registry, "checkouts", "p", "starved") == 0
    assert counter(registry, "wait_seconds", "p", "starved") == 0


async def test_tasks_created_inside_inherit_the_holder() -> None:
    engine = create_async_engine("sqlite+aiosqlite://", poolclass=AsyncAdaptedQueuePool)
    registry = CollectorRegistry()
    with Exporter(registry) as exporter:
        exporter.instrument(engine, name="a")

        async def query() -> None:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))

        with holder("fan-out"):
            await asyncio.gather(*(asyncio.create_task(query()) for _ in range(4)))
        await query()
        assert counter(registry, "checkouts", "a", "fan-out") == 4
        assert counter(registry, "checkouts", "a", "none") == 1
        maker = async_sessionmaker(engine)
        async with session_scope(maker, holder="scoped") as session:
            await session.execute(text("SELECT 1"))
        assert counter(registry, "checkouts", "a", "scoped") == 1
    await engine.dispose()


def test_ten_thousand_names_never_exceed_max_holders(sync_engines: list[Engine], tmp_path: Path) -> None:
    registry = CollectorRegistry()
    with Exporter(registry, max_holders=5) as exporter:
        engine = qp(tmp_path, sync_engines)
        exporter.instrument(engine, name="p")
        for i in range(10_000):
            with holder(f"tenant-{i}"), engine.connect():
                pass
        for name in (
            "pool_holder_connections",
            "pool_holder_checkouts_total",
            "pool_holder_hold_seconds_total",
            "pool_holder_wait_seconds_total",
            "pool_holder_timeouts_total",
            "pool_holder_held_too_long_total",
        ):
            labels = {s["holder"] for s in series(registry, f"sqlalchemy_{name}")}
            assert len(labels) == 5 + 2, name
        assert labels == {"none", "other", *(f"tenant-{i}" for i in range(5))}
        assert counter(registry, "checkouts", "p", "other") == 9_995
        assert sample(registry, "sqlalchemy_pool_holder_folded_checkouts_total", pool="p") == 9_995
        assert sum(counter(registry, "checkouts", "p", who) or 0 for who in labels) == sample(
            registry, "sqlalchemy_pool_checkouts_total", pool="p"
        )


def test_held_too_long_counts_each_checkout_once_with_the_holder(
    registry: CollectorRegistry, sync_engines: list[Engine], tmp_path: Path
) -> None:
    with Exporter(registry) as exporter:
        engine = qp(tmp_path, sync_engines, pool_size=3)
        handle = exporter.instrument(engine, name="p", leak_threshold=0.1)
        with holder("slow-export"):
            a, b = engine.connect(), engine.connect()
        # The watchdog (every 50 ms here) counts each checkout once, however long it is held.
        poll_sync(lambda: counter(registry, "held_too_long", "p", "slow-export") == 2)
        time.sleep(0.2)
        assert handle.check_leaks() == 0
        a.close()
        b.close()
        with holder("slow-export"), engine.connect():
            poll_sync(lambda: counter(registry, "held_too_long", "p", "slow-export") == 3)
        time.sleep(0.2)
        assert counter(registry, "held_too_long", "p", "slow-export") == 3
        assert counter(registry, "held_too_long", "p", "none") == 0


def test_pools_view_lists_current_checkouts_oldest_first(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    engine = qp(tmp_path, sync_engines, pool_size=3)
    handle = exporter.instrument(engine, name="p", leak_threshold=60)
    with holder("first"):
        first = engine.connect()
        first.begin()
        first.execute(text("SELECT 1"))
    time.sleep(0.01)
    with holder("second"):
        second = engine.connect()
    rows = handle.snapshot()["checkouts_now"]
    assert [(r["holder"], r["in_transaction"]) for r in rows] == [("first", True), ("second", False)]
    assert rows[0]["age"] > rows[1]["age"] >= 0
    assert rows[0]["transaction_age"] is not None and rows[1]["transaction_age"] is None
    assert "test_holders.py" in rows[0]["stack"]  # captured: leak_threshold is set
    assert handle.snapshot()["holder_connections"] == {"none": 0, "first": 1, "second": 1}
    first.rollback()
    first.close()
    second.close()
    assert handle.snapshot()["checkouts_now"] == []


# -- threads and greenlets: a holder is a ContextVar, and neither a thread nor a greenlet inherits one ------


def test_threads_do_not_inherit_a_holder_unless_given_the_context(
    registry: CollectorRegistry, exporter: Exporter, sync_engines: list[Engine], tmp_path: Path
) -> None:
    engine = qp(tmp_path, sync_engines, pool_size=2, max_overflow=0)
    exporter.instrument(engine, name="p")

    def query() -> str | None:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return holders.current_name()

    with ThreadPoolExecutor(max_workers=1) as pool, holder("report"):
        plain = threading.Thread(target=query)
        plain.start()
        plain.join()
        # ThreadPoolExecutor does not copy the submitter's context: the thread starts with none of it...
        assert pool.submit(query).result() is None
        # ...unless the call runs in a copy of it.
        assert pool.submit(contextvars.copy_context().run, query).result() == "report"
        # The pool's thread does not keep the name for the next job.
        assert pool.submit(query).result() is None
    assert counter(registry, "checkouts", "p", "none") == 3
    assert counter(registry, "checkouts", "p", "report") == 1


GREENLETS = """
from gevent import monkey

monkey.patch_all()

import contextvars
import json
import sys

import gevent
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text

from sqlalchemy_pool_exporter import Exporter, holder
from sqlalchemy_pool_exporter.instrumentation.holders import current_name

registry = CollectorRegistry()
exporter = Exporter(registry)
# gevent's own pool of greenlets on one real PostgreSQL pool of 2: at most 2 hold a connection, the rest wait.
engine = create_engine(sys.argv[1], pool_size=2, max_overflow=0, pool_timeout=30)
exporter.instrument(engine, name="p")
names = []


def request(i):
    with holder(f"route-{i % 3}"):
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(0.02)"))
        names.append(current_name())
        child = gevent.spawn(current_name)  # a greenlet spawned inside starts with an empty context
        copied = gevent.spawn(contextvars.copy_context().run, current_name)
        return child.get(), copied.get()


jobs = [gevent.spawn(request, i) for i in range(12)]
answers = [job.get() for job in jobs]


def value(name, **labels):
    return registry.get_sample_value(name, labels)


print(json.dumps({
    "answers": answers,
    "names": sorted(names),
    "checkouts": {h: value("sqlalchemy_pool_holder_checkouts_total", pool="p", holder=h)
                  for h in ("none", "route-0", "route-1", "route-2")},
    "used": value("sqlalchemy_pool_connections", pool="p", state="used"),
    "after": current_name(),
}))
engine.dispose()
"""


def test_each_gevent_greenlet_holds_under_its_own_name(tmp_path: Path) -> None:
    """gevent (monkeypatched, as `gunicorn -k gevent` runs): one pool used from many greenlets at once."""
    pytest.importorskip("gevent")  # the dev extra has it; the matrix's version cells do not
    (tmp_path / "greenlets.py").write_text(GREENLETS)
    done = subprocess.run(
        [PYTHON, str(tmp_path / "greenlets.py"), PG_URL.replace("+asyncpg", "+psycopg")],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["answers"] == [[None, f"route-{i % 3}"] for i in range(12)]
    assert got["names"] == sorted(f"route-{i % 3}" for i in range(12))
    assert got["checkouts"] == {"none": 0, "route-0": 4, "route-1": 4, "route-2": 4}
    assert (got["used"], got["after"]) == (0, None)
