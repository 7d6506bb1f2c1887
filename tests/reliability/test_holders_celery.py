"""A Celery worker (`--concurrency 2`, prefork) on the local Redis broker, through the sidecar.

The tasks use `session_scope()` as the README shows, and the worker is instrumented as its Celery recipe
says: `instrument_celery(app)` for the holders, `instrument(engine)` in `worker_process_init`, so each
prefork child writes PROMETHEUS_MULTIPROC_DIR under its own pid. The test sends tasks through the real
broker and reads their states from the real result backend: successes are commits, tasks that fail on
a duplicate key are rollbacks, tasks that exhaust the pool (a second connection while holding the only
one) are timeouts; the sidecar must report exactly those, per task name.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from celery import Celery

from .cli_process import cli_env, serving
from .conftest import DB, Cluster, Emitted
from .test_holders_flask import backends, by_holder, until
from .test_holders_flask import value as metric

pytestmark = pytest.mark.reliability

BROKER = "redis://127.0.0.1:6379/0"
PREFIX = "celery-"

TASKS = textwrap.dedent(
    """
    import os

    from celery import Celery
    from celery.signals import worker_process_init
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import sessionmaker

    from sqlalchemy_pool_exporter import instrument, session_scope
    from sqlalchemy_pool_exporter.celery import instrument_celery

    app = Celery("tasks", broker=os.environ["CELERY_BROKER"], backend=os.environ["CELERY_BROKER"])
    app.conf.task_default_queue = os.environ["CELERY_QUEUE"]
    instrument_celery(app)

    engine = create_engine(os.environ["CELERY_DATABASE_URL"], pool_size=1, max_overflow=0, pool_timeout=0.1,
                           connect_args={"application_name": f"celery-{os.getpid()}"})
    Session = sessionmaker(engine)


    @worker_process_init.connect
    def instrument_child(**_):
        engine.dispose(close=False)  # SQLAlchemy's advice for a forked process: the parent's connections stay its own
        instrument(engine, name="tasks")


    @app.task(name="tasks.send_invoice")
    def send_invoice(n):
        with session_scope(Session) as session:
            session.execute(text("INSERT INTO celery_invoices VALUES (:n)"), {"n": n})
        return n


    @app.task(name="tasks.audit")
    def audit(n):
        with engine.connect(), engine.connect():  # the second waits for the first: QueuePool limit reached
            pass
    """
)


@contextlib.contextmanager
def celery_worker(tmp_path: Path, multiproc_dir: Path, database_url: str, queue: str) -> Iterator[Path]:
    """`celery worker --concurrency 2` (prefork) on `queue`; warm shutdown by pid afterwards, SIGKILL if stuck."""
    (tmp_path / "celery_tasks.py").write_text(TASKS)
    log = tmp_path / "celery.log"
    env = cli_env(
        PROMETHEUS_MULTIPROC_DIR=str(multiproc_dir),
        CELERY_DATABASE_URL=database_url,
        CELERY_BROKER=BROKER,
        CELERY_QUEUE=queue,
        PYTHONPATH=str(tmp_path),
    )
    argv = ["-A", "celery_tasks", "worker", "--concurrency", "2", "--pool", "prefork", "-Q", queue, "-n",
            f"{queue}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "INFO"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", *argv],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60  # guards a hung start only
        while " ready." not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"celery exited {proc.returncode}: {log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        yield log
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


INVOICES = [*range(40), *range(0, 40, 5)]  # 40 new invoices, 8 sent again: 40 succeed, 8 fail on the key
AUDITS = 6


def test_a_prefork_celery_worker_counts_exactly_what_its_tasks_did(
    live_cluster: Cluster, tmp_path: Path, emitted: Emitted
) -> None:
    with psycopg.connect(live_cluster.admin_dsn.rsplit("/", 1)[0] + f"/{DB}", autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS celery_invoices")
        conn.execute("CREATE TABLE celery_invoices (n integer PRIMARY KEY)")
        conn.execute("ALTER TABLE celery_invoices OWNER TO app")
    queue = f"sync-proof-{uuid.uuid4().hex[:12]}"  # this test's own queue on the shared Redis
    url = live_cluster.url(driver="postgresql+psycopg")
    client = Celery("client", broker=BROKER, backend=BROKER, set_as_current=False)
    try:
        with (
            serving(tmp_path) as sidecar,
            celery_worker(tmp_path, tmp_path / "mp", url, queue) as log,
        ):
            sent = [("tasks.send_invoice", client.send_task("tasks.send_invoice", (n,), queue=queue)) for n in INVOICES]
            sent += [("tasks.audit", client.send_task("tasks.audit", (n,), queue=queue)) for n in range(AUDITS)]
            outcomes: Counter[tuple[str, str]] = Counter()
            for name, result in sent:
                result.get(timeout=60, propagate=False)
                # The client has no class for the worker's exception: its traceback names it.
                raised = re.findall(r"^sqlalchemy\.exc\.(\w+):", result.traceback or "", re.MULTILINE)
                outcomes[(name, "ok" if result.successful() else raised[-1])] += 1
                result.forget()
            assert outcomes == {
                ("tasks.send_invoice", "ok"): 40,
                ("tasks.send_invoice", "IntegrityError"): 8,
                ("tasks.audit", "TimeoutError"): AUDITS,
            }, log.read_text(errors="replace")

            pool = "tasks"
            done = until(
                sidecar,
                emitted,
                lambda s: (
                    metric(s, "sqlalchemy_exporter_sidecar_workers") == 2
                    and sum(by_holder(s, "checkouts_total", pool).values()) == len(INVOICES) + AUDITS
                    and metric(s, "sqlalchemy_pool_timeouts_total", pool=pool) == AUDITS
                ),
            )
            # Two prefork children wrote the directory; the worker's main process never instrumented.
            assert metric(done, "sqlalchemy_exporter_sidecar_workers") == 2
            assert metric(done, "sqlalchemy_transactions_total", pool=pool, outcome="commit") == 40
            assert metric(done, "sqlalchemy_transactions_total", pool=pool, outcome="rollback") == 8
            assert metric(done, "sqlalchemy_session_scopes_total", pool=pool, outcome="rollback") == 8
            assert metric(done, "sqlalchemy_pool_timeouts_total", pool=pool) == AUDITS
            assert by_holder(done, "checkouts_total", pool) == {
                "none": 0,
                "celery: tasks.send_invoice": len(INVOICES),
                "celery: tasks.audit": AUDITS,
            }
            assert by_holder(done, "timeouts_total", pool) == {
                "none": 0,
                "celery: tasks.send_invoice": 0,
                "celery: tasks.audit": AUDITS,
            }
            # At rest: nothing used; every open connection is a backend PostgreSQL sees idle. The children
            # write once a second: the last task's connection may reach the files after the scrape above, so
            # the two sides are read again until they agree (the deadline guards a hang only).
            deadline = time.monotonic() + 20
            while True:
                row = backends(live_cluster.admin_dsn, PREFIX)
                used = metric(done, "sqlalchemy_pool_connections", pool=pool, state="used")
                idle = metric(done, "sqlalchemy_pool_connections", pool=pool, state="idle")
                if (used, idle) == row or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
                done = until(sidecar, emitted, lambda s: True)
            assert (used, idle) == (row[0], row[1]) == (0, row[1])
            assert row[1] >= 1
        emitted.add(log.read_bytes())
        emitted.add(sidecar.log.read_bytes())
    finally:
        client.close()
