"""/metrics served by the Flask app itself: a Flask + Flask-SQLAlchemy app on psycopg 3 under `gunicorn -w 1`
(sync, and gthread with 4 threads), instrumented as the README's quickstart says, with the one line that
serves /metrics (`PoolExporter(app, db=db, metrics_path="/metrics")`), no multiprocess directory.

The client counts what it saw (201s are commits, 409s rollbacks); the app's own /metrics must say
exactly that, per route rule, with no holder for the scrapes themselves, and hold no connection at rest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from ..conftest import PG_NAME, PG_URL, Samples, clean_env, samples_of
from ..conftest import metric as value
from .conftest import free_port
from .test_holders_flask import ping, post

pytestmark = pytest.mark.reliability

PG_SYNC_URL = PG_URL.replace("+asyncpg", "+psycopg")
ORDERS = "POST /orders/<int:order_id>"
ORDER_IDS = [*range(40), *range(0, 40, 4)]  # 40 new orders, 10 sent again: 40 x 201, 10 x 409

APP = textwrap.dedent(
    """
    import os

    from flask import Flask
    from flask_sqlalchemy import SQLAlchemy
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

    from sqlalchemy_pool_exporter.flask import PoolExporter


    class Base(DeclarativeBase):
        pass


    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["FLASK_DATABASE_URL"]
    db = SQLAlchemy(app, model_class=Base)
    PoolExporter(app, db=db, metrics_path="/metrics")


    class Order(db.Model):
        __tablename__ = os.environ["FLASK_TABLE"]
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
    """
)


@contextlib.contextmanager
def gunicorn(tmp_path: Path, table: str, *worker_args: str) -> Iterator[int]:
    """The app under `gunicorn -w 1 <worker_args>` on 127.0.0.1; SIGTERM (then SIGKILL) by pid afterwards."""
    (tmp_path / "flask_app.py").write_text(APP)
    port = free_port()
    log = tmp_path / "gunicorn.log"
    env = clean_env(FLASK_DATABASE_URL=PG_SYNC_URL, FLASK_TABLE=table)
    argv = ["-w", "1", *worker_args, "-b", f"127.0.0.1:{port}", "--chdir", str(tmp_path), "flask_app:app"]
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
        while ping(port) is None:
            assert proc.poll() is None, f"gunicorn exited {proc.returncode}: {log.read_text(errors='replace')}"
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.05)
        yield port
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return samples_of(response.read().decode())


def by_holder(samples: Samples, name: str) -> dict[str, float]:
    return {
        dict(labels)["holder"]: v
        for (metric, labels), v in samples.items()
        if metric == f"sqlalchemy_pool_holder_{name}" and dict(labels).get("pool") == PG_NAME
    }


@pytest.fixture
def table() -> Iterator[str]:
    name = f"flask_metrics_{os.getpid()}"
    dsn = PG_SYNC_URL.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")
        conn.execute(f"CREATE TABLE {name} (id integer PRIMARY KEY)")
    yield name
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.mark.parametrize("worker_args", [["-k", "sync"], ["-k", "gthread", "--threads", "4"]], ids=["sync", "gthread"])
def test_the_apps_own_metrics_count_exactly_what_it_did(tmp_path: Path, table: str, worker_args: list[str]) -> None:
    with gunicorn(tmp_path, table, *worker_args) as port:
        assert value(scrape(port), "sqlalchemy_transactions_total", pool=PG_NAME, outcome="commit") == 0
        with ThreadPoolExecutor(max_workers=8) as clients:
            seen = Counter(clients.map(lambda n: post(port, f"/orders/{n}"), ORDER_IDS))
        assert seen == {201: 40, 409: 10}
        samples = scrape(port)
        # Scraped between requests: the scrapes themselves are no one's holder, and hold nothing.
        again = scrape(port)

    assert value(samples, "sqlalchemy_transactions_total", pool=PG_NAME, outcome="commit") == seen[201]
    assert value(samples, "sqlalchemy_transactions_total", pool=PG_NAME, outcome="rollback") == seen[409]
    assert value(samples, "sqlalchemy_pool_connections", pool=PG_NAME, state="used") == 0
    assert by_holder(samples, "checkouts_total") == {"none": 0, ORDERS: len(ORDER_IDS)}
    assert by_holder(again, "checkouts_total") == {"none": 0, ORDERS: len(ORDER_IDS)}
    assert value(again, "sqlalchemy_transactions_total", pool=PG_NAME, outcome="commit") == seen[201]
