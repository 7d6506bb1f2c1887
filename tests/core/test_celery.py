"""sqlalchemy_pool_exporter.celery: each task's connections held by `celery: <task name>`, through Celery's signals.

Tasks run through Celery's own tracer (`apply()`: task_prerun, the task, task_postrun), no broker;
tests/reliability/test_holders_celery.py runs a real prefork worker on the local Redis.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from sqlalchemy_pool_exporter import Exporter, holder, session_scope
from sqlalchemy_pool_exporter.celery import instrument_celery, uninstrument_celery
from sqlalchemy_pool_exporter.instrumentation.holders import current_name

from ..conftest import PG_NAME, PG_URL, sample

PG_SYNC_URL = PG_URL.replace("+asyncpg", "+psycopg")


def checkouts(registry: CollectorRegistry) -> dict[str, float]:
    return {
        s.labels["holder"]: s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "sqlalchemy_pool_holder_checkouts_total" and s.labels["pool"] == PG_NAME
    }


@pytest.fixture
def engine(exporter: Exporter, sync_engines: list[Engine]) -> Engine:
    made = create_engine(PG_SYNC_URL, pool_size=2, max_overflow=0)
    sync_engines.append(made)
    exporter.instrument(made)
    return made


@pytest.fixture
def app() -> Iterator[Celery]:
    made = Celery("tasks", broker="memory://", set_as_current=False)
    instrument_celery(made)
    yield made
    uninstrument_celery(made)


def test_a_task_holds_its_connections_under_its_name_and_only_while_it_runs(
    app: Celery, engine: Engine, registry: CollectorRegistry
) -> None:
    sessions = sessionmaker(engine)
    seen: list[str | None] = []

    @app.task(name="tasks.send_invoice")
    def send_invoice(n: int) -> int:
        seen.append(current_name())
        with session_scope(sessions) as session:
            got: int = session.execute(text("SELECT :n"), {"n": n}).scalar_one()
        return got

    @app.task(name="tasks.charge")
    def charge() -> None:
        with session_scope(sessions) as session:
            session.execute(text("SELECT 1"))
            raise ValueError("card declined")

    assert [send_invoice.apply((n,)).get() for n in (1, 2, 3)] == [1, 2, 3]
    failed = charge.apply()
    assert failed.failed() and isinstance(failed.result, ValueError)
    assert seen == ["celery: tasks.send_invoice"] * 3
    assert current_name() is None  # nothing left behind after the tasks
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert checkouts(registry) == {"none": 1, "celery: tasks.send_invoice": 3, "celery: tasks.charge": 1}
    assert sample(registry, "sqlalchemy_session_scopes_total", pool=PG_NAME, outcome="commit") == 3
    assert sample(registry, "sqlalchemy_session_scopes_total", pool=PG_NAME, outcome="rollback") == 1


def test_the_innermost_name_wins_and_the_outer_one_comes_back(app: Celery, engine: Engine) -> None:
    @app.task(name="tasks.inner")
    def inner() -> str | None:
        return current_name()

    @app.task(name="tasks.outer")
    def outer() -> list[str | None]:
        with holder("step-1"):
            first = current_name()
        return [current_name(), first, inner.apply().get(), current_name()]

    with holder("the-caller"):
        got = outer.apply().get()
        assert current_name() == "the-caller"
    assert got == ["celery: tasks.outer", "step-1", "celery: tasks.inner", "celery: tasks.outer"]


def test_tasks_of_another_app_and_after_uninstrument_are_not_named(engine: Engine) -> None:
    ours, theirs = (Celery(n, broker="memory://", set_as_current=False) for n in ("ours", "theirs"))
    instrument_celery(ours)
    instrument_celery(ours)  # idempotent

    @theirs.task(name="theirs.t")
    def their_task() -> str | None:
        return current_name()

    @ours.task(name="ours.t")
    def our_task() -> str | None:
        return current_name()

    try:
        assert (their_task.apply().get(), our_task.apply().get()) == (None, "celery: ours.t")
    finally:
        uninstrument_celery(ours)
        uninstrument_celery(ours)
    assert our_task.apply().get() is None
