"""A Flask + Flask-SQLAlchemy app on psycopg 3 under `gunicorn -w 2` (sync, gthread, gevent), through the sidecar.

The app is written as Flask-SQLAlchemy's docs teach (`db.session.add()`, `commit()`, `rollback()` on an
IntegrityError) and instrumented as the README says (`PoolExporter(app, db=db)`; PROMETHEUS_MULTIPROC_DIR
set, `pool-exporter serve` merges it). The client counts what it saw: 201s are commits, 409s (an order
id sent twice) are rollbacks, 500s are pool timeouts (a route that opens a second `audit` connection
while it holds the only one, the classic way a sync app exhausts its pool). The sidecar must report
exactly those numbers, per route rule, and at rest hold what PostgreSQL says the workers hold.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError

import psycopg
import pytest

from ..conftest import Samples, samples_of
from ..conftest import metric as value
from .cli_process import Serving, cli_env, serving
from .conftest import DB, Cluster, Emitted, free_port

pytestmark = pytest.mark.reliability

ORDERS = "POST /orders/<int:order_id>"
AUDIT = "POST /audit/<int:n>"
PREFIX = "flask-"  # application_name prefix: the server tells our workers' backends apart

APP = textwrap.dedent(
    """
    import os

    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    from sqlalchemy_pool_exporter.flask import PoolExporter

    NAME = {"application_name": f"flask-{os.getpid()}"}


    class Base(DeclarativeBase):
        pass


    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["FLASK_DATABASE_URL"]
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = {"pool_size": 10, "max_overflow": 0, "connect_args": NAME}
    app.config["SQLALCHEMY_BINDS"] = {
        "audit": {"url": os.environ["FLASK_DATABASE_URL"], "pool_size": 1, "max_overflow": 0,
                  "pool_timeout": 0.05, "connect_args": NAME},
    }
    db = SQLAlchemy(app, model_class=Base)
    PoolExporter(app, db=db)


    class Order(db.Model):
        __tablename__ = "flask_orders"
        id: Mapped[int] = mapped_column(primary_key=True)


    @app.get("/ping")
    def ping():
        return {"pid": os.getpid()}


    @app.post("/orders/<int:order_id>")
    def create_order(order_id):
        db.session.add(Order(id=order_id))
        try:
            db.session.commit()
        except IntegrityError:
            db.session.rollback()
            return {"error": "exists"}, 409
        return {"id": order_id}, 201


    @app.post("/audit/<int:n>")
    def audit(n):
        audit = db.engines["audit"]
        with audit.connect(), audit.connect():  # the second waits for the first: QueuePool limit reached
            pass
        return {"n": n}
    """
)


@dataclass
class Gunicorn:
    port: int
    workers: list[int]
    log: Path


@contextlib.contextmanager
def gunicorn(tmp_path: Path, multiproc_dir: Path, database_url: str, *worker_args: str) -> Iterator[Gunicorn]:
    """The app under `gunicorn -w 2 <worker_args>` on 127.0.0.1; SIGTERM (then SIGKILL) by pid afterwards."""
    (tmp_path / "flask_app.py").write_text(APP)
    port = free_port()
    log = tmp_path / "gunicorn.log"
    env = cli_env(PROMETHEUS_MULTIPROC_DIR=str(multiproc_dir), FLASK_DATABASE_URL=database_url)
    argv = ["-w", "2", *worker_args, "-b", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "flask_app:app"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60  # guards a hung start only
        pids: list[int] = []
        while len(pids) < 2 or ping(port) not in pids:
            assert proc.poll() is None, f"gunicorn exited {proc.returncode}: {log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            pids = [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", log.read_text(errors="replace"))]
            time.sleep(0.05)
        yield Gunicorn(port, pids, log)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def ping(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
            pid: int = json.loads(response.read())["pid"]
            return pid
    except OSError:
        return None


def post(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="POST")) as r:
            status: int = r.status
    except HTTPError as exc:
        status = exc.code
    return status


def scrape(sidecar: Serving, emitted: Emitted) -> Samples:
    with urllib.request.urlopen(f"{sidecar.base}/metrics", timeout=30) as response:
        text = response.read().decode()
    emitted.add(text)
    return samples_of(text)


def until(sidecar: Serving, emitted: Emitted, ready: Callable[[Samples], bool]) -> Samples:
    """Scrape until `ready(samples)` (workers write once a second); the deadline guards a hang only."""
    deadline = time.monotonic() + 20
    while True:
        samples = scrape(sidecar, emitted)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def by_holder(samples: Samples, name: str, pool: str) -> dict[str, float]:
    return {
        dict(labels)["holder"]: v
        for (metric, labels), v in samples.items()
        if metric == f"sqlalchemy_pool_holder_{name}" and dict(labels).get("pool") == pool
    }


def backends(admin_dsn: str, prefix: str = PREFIX) -> tuple[int, int]:
    """Our workers' backends (application_name starting with `prefix`) as PostgreSQL counts them: (not idle, all)."""
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE state <> 'idle'), count(*) FROM pg_stat_activity"
            " WHERE application_name LIKE %s",
            (prefix + "%",),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def reset_table(admin_dsn: str) -> None:
    with psycopg.connect(admin_dsn.rsplit("/", 1)[0] + f"/{DB}", autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS flask_orders")
        conn.execute("CREATE TABLE flask_orders (id integer PRIMARY KEY)")
        conn.execute("ALTER TABLE flask_orders OWNER TO app")


ORDER_IDS = [*range(60), *range(0, 60, 4)]  # 60 new orders, 15 sent again: 60 x 201, 15 x 409
AUDITS = 12  # sent one at a time, while the orders run: each is one checkout, one timeout, one 500


@pytest.mark.parametrize(
    "worker_args",
    [["-k", "sync"], ["-k", "gthread", "--threads", "4"], ["-k", "gevent"]],
    ids=["sync", "gthread", "gevent"],
)
def test_gunicorn_workers_count_exactly_what_the_flask_app_did(
    live_cluster: Cluster, tmp_path: Path, emitted: Emitted, worker_args: list[str]
) -> None:
    reset_table(live_cluster.admin_dsn)
    url = live_cluster.url(driver="postgresql+psycopg")
    pool, audit_pool = live_cluster.pool_name, "audit"
    with serving(tmp_path) as sidecar, gunicorn(tmp_path, tmp_path / "mp", url, *worker_args) as app:
        with ThreadPoolExecutor(max_workers=8) as clients:
            orders = [(n, clients.submit(post, app.port, f"/orders/{n}")) for n in ORDER_IDS]
            audits = [post(app.port, f"/audit/{n}") for n in range(AUDITS)]
            seen = Counter(future.result() for _, future in orders)
        assert seen == {201: 60, 409: 15}
        assert Counter(audits) == {500: AUDITS}

        done = until(
            sidecar,
            emitted,
            lambda s: (
                value(s, "sqlalchemy_exporter_sidecar_workers") == 2
                and sum(by_holder(s, "checkouts_total", pool).values()) == len(ORDER_IDS)
                and value(s, "sqlalchemy_pool_timeouts_total", pool=audit_pool) == AUDITS
                and sum(by_holder(s, "timeouts_total", audit_pool).values()) == AUDITS
                and value(s, "sqlalchemy_pool_connections", pool=pool, state="used") == 0
            ),
        )
        assert value(done, "sqlalchemy_exporter_sidecar_workers") == 2
        assert value(done, "sqlalchemy_transactions_total", pool=pool, outcome="commit") == seen[201]
        assert value(done, "sqlalchemy_transactions_total", pool=pool, outcome="rollback") == seen[409]
        assert value(done, "sqlalchemy_pool_timeouts_total", pool=audit_pool) == AUDITS
        assert value(done, "sqlalchemy_pool_timeouts_total", pool=pool) == 0
        assert by_holder(done, "checkouts_total", pool) == {"none": 0, ORDERS: len(ORDER_IDS)}
        assert by_holder(done, "checkouts_total", audit_pool) == {"none": 0, AUDIT: AUDITS}
        assert by_holder(done, "timeouts_total", audit_pool) == {"none": 0, AUDIT: AUDITS}
        assert by_holder(done, "connections", pool) == {"none": 0, ORDERS: 0}

        # At rest: nothing used, and every connection the pools keep open is a backend PostgreSQL sees idle.
        # Workers write once a second: both sides are read again until they agree (the deadline guards a hang).
        deadline = time.monotonic() + 20
        while True:
            busy, total = backends(live_cluster.admin_dsn)
            pools = (pool, audit_pool)
            idle = sum(value(done, "sqlalchemy_pool_connections", pool=p, state="idle") or 0 for p in pools)
            used = sum(value(done, "sqlalchemy_pool_connections", pool=p, state="used") or 0 for p in pools)
            if (used, idle) == (busy, total) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
            done = until(sidecar, emitted, lambda s: True)
        assert (used, idle) == (busy, total) == (0, total)
    emitted.add(app.log.read_bytes())
    emitted.add(sidecar.log.read_bytes())
