"""Flask: `PoolExporter(app, db=db)`, in Flask's extension style (or `init_app(app)` in an app factory).

Each request's connections are held by its matched URL rule and method, `GET /orders/<int:order_id>`,
never the raw path: Flask routes when it pushes the request context, before any `before_request`
function runs, so the rule is known at once (as with aiohttp). Our `before_request` function goes
first, so the other extensions' own hooks are named too; `teardown_request` puts back what was there.
A request no rule matched (404, and 405: Werkzeug matches the method too) is `(unmatched)`; a method
is named as sent only when it is standard or the rule declares it, else `OTHER` (as in middleware.py).

Given Flask-SQLAlchemy's extension (`db=`), every engine it made for the app is instrumented: the
default one under its default pool name (`host:port/database`), each bind under its bind key.

`metrics_path="/metrics"` (and `pools_path="/pools"`) serve wsgi.py's apps as views of the app, the
same bytes as every other server of ours, named by no holder. Off by default: served from the app,
the page answers whoever reaches the app, behind the app's own auth only (its before_request hooks
do run for it), and under `gunicorn -w N` each worker answers for itself only, so counters would
jump between scrapes; with several workers, use the sidecar (README, Several workers).
Imports flask only here: `import sqlalchemy_pool_exporter` works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Flask, Response, g, request
from flask.typing import ResponseReturnValue

from . import validation
from .core import Exporter, default_exporter
from .instrumentation.handle import PoolHandle
from .instrumentation.holders import holder
from .middleware import METHODS, OTHER_METHOD, UNMATCHED
from .wsgi import WSGIMetrics, WSGIPools, wsgi_metrics_app, wsgi_pools_app

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

EXTENSION = "sqlalchemy_pool_exporter"
# Our views' endpoints start with this: no holder is named for them.
OURS = f"{EXTENSION}."
_HELD = "_sqlalchemy_pool_exporter_holder"


def rule_holder() -> str:
    """The current request's holder name: `METHOD /rule/<converter:arg>`, `(unmatched)` or `OTHER /rule`."""
    rule = request.url_rule
    if rule is None:
        return UNMATCHED
    method = request.method
    declared = rule.methods or ()
    return f"{method if method in METHODS or method in declared else OTHER_METHOD} {rule.rule}"


class PoolExporter:
    """Name each request's holder after its URL rule; instrument Flask-SQLAlchemy's engines (`db=`).

    `exporter` defaults to the default Exporter (prometheus_client.REGISTRY; it writes
    PROMETHEUS_MULTIPROC_DIR for the sidecar when that is set). `holders=False` leaves requests unnamed.
    Keyword arguments of `Exporter.instrument()` (`leak_threshold`, `statements`, `transactions`,
    `buckets`) apply to every engine of `db`. `metrics_path` and `pools_path` (None: not served)
    serve /metrics and /pools as views of the app.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        db: Any = None,
        exporter: Exporter | None = None,
        holders: bool = True,
        metrics_path: str | None = None,
        pools_path: str | None = None,
        **instrument_options: Any,
    ) -> None:
        self.db = db
        self.exporter = exporter
        self.holders = holders
        self.metrics_path = None if metrics_path is None else validation.metrics_path(metrics_path)
        self.pools_path = pools_path
        self.instrument_options = instrument_options
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, db: Any = None) -> None:
        """Register on `app`: the holder hooks, and the engines of `db` (or the one given to the constructor)."""
        db = db if db is not None else self.db
        app.extensions[EXTENSION] = self
        before = app.before_request_funcs.setdefault(None, [])
        if self.holders and _hold not in before:  # once per app: a second init_app() must not nest a holder
            # First of all before_request functions: an extension's hook that uses the pool is named too.
            before.insert(0, _hold)
            app.teardown_request(_release)
        if db is not None:
            self.instrument_db(app, db)
        exporter = self.exporter if self.exporter is not None else default_exporter()
        if self.metrics_path is not None:
            app.add_url_rule(
                self.metrics_path, f"{OURS}metrics", _view(wsgi_metrics_app(exporter)), methods=["GET", "HEAD"]
            )
        if self.pools_path is not None:
            app.add_url_rule(self.pools_path, f"{OURS}pools", _view(wsgi_pools_app(exporter)), methods=["GET", "HEAD"])

    def instrument_db(self, app: Flask, db: Any) -> dict[str | None, PoolHandle]:
        """Instrument every engine Flask-SQLAlchemy made for `app` (`db.engines`, binds included), by bind key."""
        exporter = self.exporter if self.exporter is not None else default_exporter()
        with app.app_context():
            try:
                engines: dict[str | None, Engine] = dict(db.engines)
            except (KeyError, RuntimeError) as exc:
                raise RuntimeError(
                    "Flask-SQLAlchemy is not set up on this app yet: call db.init_app(app) (or SQLAlchemy(app)) "
                    "before PoolExporter(app, db=db)"
                ) from exc
        return {
            key: exporter.instrument(engine, name=key, **self.instrument_options)
            for key, engine in sorted(engines.items(), key=lambda kv: kv[0] or "")
        }


def _view(served: WSGIMetrics | WSGIPools) -> Any:
    """A Flask view answering with the WSGI app `served` (its status, headers and bytes as they are)."""

    def view() -> ResponseReturnValue:
        return Response.from_app(served, request.environ, buffered=True)

    return view


def _hold() -> None:
    endpoint = request.endpoint
    if endpoint is not None and endpoint.startswith(OURS):
        return
    held = holder(rule_holder())
    held.__enter__()
    setattr(g, _HELD, held)


def _release(exc: BaseException | None) -> None:
    held: holder | None = g.pop(_HELD, None)
    if held is not None:
        held.__exit__(None, None, None)
