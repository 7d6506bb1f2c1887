"""sqlalchemy_pool_exporter.flask: holders named after URL rules; every Flask-SQLAlchemy engine instrumented."""

from __future__ import annotations

import gzip
from collections.abc import Iterator

import pytest
from flask import Blueprint, Flask, Response, request
from flask_sqlalchemy import SQLAlchemy
from prometheus_client import CollectorRegistry
from sqlalchemy import text

from sqlalchemy_pool_exporter import Exporter, session_scope, wsgi_metrics_app
from sqlalchemy_pool_exporter.flask import PoolExporter
from sqlalchemy_pool_exporter.instrumentation.holders import current_name

from ..conftest import PG_NAME, PG_URL, metric, sample, samples_of

PG_SYNC_URL = PG_URL.replace("+asyncpg", "+psycopg")
REPORTS_URL = f"{PG_SYNC_URL}?application_name=flask_reports"
RULE = "POST /orders/<int:n>"


def checkouts(registry: CollectorRegistry, pool: str) -> dict[str, float]:
    return {
        s.labels["holder"]: s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == "sqlalchemy_pool_holder_checkouts_total" and s.labels["pool"] == pool
    }


@pytest.fixture
def db_app(exporter: Exporter) -> Iterator[tuple[Flask, SQLAlchemy]]:
    """A Flask app with Flask-SQLAlchemy (a default engine and a `reports` bind), instrumented the README's way."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = PG_SYNC_URL
    app.config["SQLALCHEMY_BINDS"] = {"reports": REPORTS_URL}
    db = SQLAlchemy()
    db.init_app(app)
    PoolExporter(app, db=db, exporter=exporter)

    @app.get("/orders/<int:order_id>")
    def order(order_id: int) -> dict[str, int]:
        return {"n": db.session.execute(text("SELECT :n"), {"n": order_id}).scalar_one()}

    @app.route("/dav/<path:path>", methods=["PROPFIND"])
    def dav(path: str) -> str:
        db.session.execute(text("SELECT 1"))
        return "ok"

    @app.post("/fail")
    def fail() -> str:
        with session_scope(db.session) as session:
            session.execute(text("SELECT 1"))
            raise ValueError("the app's own failure")

    @app.errorhandler(ValueError)
    def failed(exc: ValueError) -> tuple[str, int]:
        return "failed", 500

    reports = Blueprint("reports", __name__, url_prefix="/reports")

    @reports.get("/<name>")
    def report(name: str) -> str:
        with db.engines["reports"].connect() as conn:
            conn.execute(text("SELECT 1"))
        return name

    app.register_blueprint(reports)

    @app.errorhandler(404)
    def not_found(exc: Exception) -> tuple[str, int]:
        db.session.execute(text("SELECT 1"))  # an error page that reads the database is held too
        return "not found", 404

    @app.errorhandler(405)
    def not_allowed(exc: Exception) -> tuple[str, int]:
        db.session.execute(text("SELECT 1"))
        return "not allowed", 405

    yield app, db
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()


def test_every_engine_of_flask_sqlalchemy_is_instrumented_by_bind_key(
    db_app: tuple[Flask, SQLAlchemy], exporter: Exporter
) -> None:
    app, db = db_app
    assert sorted(h.name for h in exporter.handles()) == [PG_NAME, "reports"]
    with app.app_context():
        assert exporter.handle_for(db.engine) is not None
        assert exporter.handle_for(db.engines["reports"]).name == "reports"  # type: ignore[union-attr]
    assert app.extensions["sqlalchemy_pool_exporter"].db is db


def test_holders_are_url_rules_and_methods_never_raw_paths(
    db_app: tuple[Flask, SQLAlchemy], registry: CollectorRegistry
) -> None:
    app, _ = db_app
    client = app.test_client()
    for n in (1, 2, 3):
        assert client.get(f"/orders/{n}").json == {"n": n}
    assert client.get("/reports/daily").status_code == 200
    assert client.open("/dav/a/b", method="PROPFIND").status_code == 200
    # No rule: a random path, a wrong method on a real rule, a forged method: one bounded name.
    assert client.get("/no/such/page").status_code == 404
    assert client.delete("/orders/1").status_code == 405
    assert client.open("/orders/1", method="BREW").status_code == 405
    assert client.post("/fail").status_code == 500

    # Every checkout was a request's: `none` is exported (at 0) once a holder was ever set.
    assert checkouts(registry, PG_NAME) == {
        "none": 0,
        "GET /orders/<int:order_id>": 3,
        "PROPFIND /dav/<path:path>": 1,
        "(unmatched)": 3,
        "POST /fail": 1,
    }
    assert checkouts(registry, "reports") == {"none": 0, "GET /reports/<name>": 1}
    assert sample(registry, "sqlalchemy_session_scopes_total", pool=PG_NAME, outcome="rollback") == 1
    assert sample(registry, "sqlalchemy_pool_connections", pool=PG_NAME, state="used") == 0


def test_no_holder_outlives_its_request(db_app: tuple[Flask, SQLAlchemy], registry: CollectorRegistry) -> None:
    app, db = db_app
    client = app.test_client()
    assert client.get("/orders/7").status_code == 200
    with app.app_context():  # after the request, in the same thread: no holder
        db.session.execute(text("SELECT 1"))
        db.session.remove()
    assert checkouts(registry, PG_NAME) == {"none": 1, "GET /orders/<int:order_id>": 1}


def test_init_app_twice_names_each_request_once(db_app: tuple[Flask, SQLAlchemy], exporter: Exporter) -> None:
    app, db = db_app
    PoolExporter(exporter=exporter).init_app(app, db)  # the same engines: the same handles
    assert app.before_request_funcs[None].count(app.before_request_funcs[None][0]) == 1
    assert len(app.teardown_request_funcs[None]) == 1
    assert sorted(h.name for h in exporter.handles()) == [PG_NAME, "reports"]


def test_init_app_before_flask_sqlalchemy_says_what_to_do(exporter: Exporter) -> None:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = PG_SYNC_URL
    db = SQLAlchemy()
    with pytest.raises(RuntimeError, match=r"call db.init_app\(app\)"):
        PoolExporter(app, db=db, exporter=exporter)
    assert exporter.handles() == []


def test_metrics_and_pools_served_from_the_app_as_every_server_serves_them(exporter: Exporter) -> None:
    """`metrics_path=`, `pools_path=`: the WSGI apps as views, the same bytes as wsgi_metrics_app's,
    no holder named for them (the app's own before_request hooks, its auth, do run)."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = PG_SYNC_URL
    db = SQLAlchemy(app)
    PoolExporter(app, db=db, exporter=exporter, metrics_path="/metrics", pools_path="/pools")
    held: dict[str, str | None] = {}
    asked: list[str] = []

    @app.before_request
    def app_auth() -> None:
        asked.append(request.path)

    @app.after_request
    def who(response: Response) -> Response:
        held[f"{request.method} {request.path}"] = current_name()
        return response

    @app.post("/orders/<int:n>")
    def add(n: int) -> str:
        db.session.execute(text("SELECT :n"), {"n": n})
        db.session.commit()
        return "ok"

    try:
        client = app.test_client()
        for n in range(6):
            assert client.post(f"/orders/{n}").status_code == 200
        page = client.get("/metrics")
        assert (page.status_code, page.headers["Content-Type"]) == (200, "text/plain; version=0.0.4; charset=utf-8")
        samples = samples_of(page.get_data(as_text=True))
        assert metric(samples, "sqlalchemy_transactions_total", pool=PG_NAME, outcome="commit") == 6.0
        assert metric(samples, "sqlalchemy_pool_holder_checkouts_total", pool=PG_NAME, holder=RULE) == 6
        assert [k for k in samples if k[0] == "sqlalchemy_pool_holder_checkouts_total"] == [
            ("sqlalchemy_pool_holder_checkouts_total", (("holder", "none"), ("pool", PG_NAME))),
            ("sqlalchemy_pool_holder_checkouts_total", (("holder", RULE), ("pool", PG_NAME))),
        ]

        query = "name[]=sqlalchemy_pool_size"
        environ = {"REQUEST_METHOD": "GET", "HTTP_ACCEPT_ENCODING": "gzip", "QUERY_STRING": query}
        packed = client.get(f"/metrics?{query}", headers={"Accept-Encoding": "gzip"})
        alone = Response.from_app(wsgi_metrics_app(exporter), environ, buffered=True)
        assert (packed.status_code, packed.headers["Content-Encoding"]) == (200, "gzip")
        assert (dict(packed.headers), packed.get_data()) == (dict(alone.headers), alone.get_data())
        assert samples_of(gzip.decompress(packed.get_data()).decode()) == {
            ("sqlalchemy_pool_size", (("pool", PG_NAME),)): 5.0
        }
        head = client.head("/metrics")
        assert (head.status_code, head.get_data()) == (200, b"")
        assert int(head.headers["Content-Length"]) == len(page.get_data())

        (row,) = client.get("/pools").json["pools"]
        assert (row["name"], row["transactions"]["commit"]) == (PG_NAME, 6)
        assert client.post("/metrics").status_code == 405
        # Our views: no holder; a POST to /metrics matched no rule (Flask's 405): unmatched, as any other.
        ours = {"GET /metrics": None, "HEAD /metrics": None, "GET /pools": None, "POST /metrics": "(unmatched)"}
        assert held == {f"POST /orders/{n}": RULE for n in range(6)} | ours
        assert asked.count("/metrics") == 4 and asked.count("/pools") == 1
    finally:
        with app.app_context():
            db.engine.dispose()


def test_nothing_is_served_unless_asked(exporter: Exporter) -> None:
    app = Flask(__name__)
    PoolExporter(app, exporter=exporter)
    assert sorted(r.rule for r in app.url_map.iter_rules()) == ["/static/<path:filename>"]
    with pytest.raises(ValueError, match="metrics_path"):
        PoolExporter(app, exporter=exporter, metrics_path="metrics")
