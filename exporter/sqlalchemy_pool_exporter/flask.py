"""Flask: `PoolExporter(app, db=db)`, in Flask's extension style (or `init_app(app)` in an app factory).

Each request's connections are held by its matched URL rule and method, `GET /orders/<int:order_id>`,
never the raw path: Flask routes when it pushes the request context, before any `before_request`
function runs, so the rule is known at once (as with aiohttp). Our `before_request` function goes
first, so the other extensions' own hooks are named too; `teardown_request` puts back what was there.
A request no rule matched (404, and 405: Werkzeug matches the method too) is `(unmatched)`; a method
is named as sent only when it is standard or the rule declares it, else `OTHER` (as in middleware.py).

Given Flask-SQLAlchemy's extension (`db=`), every engine it made for the app is instrumented: the
default one under its default pool name (`host:port/database`), each bind under its bind key.
Imports flask only here: `import sqlalchemy_pool_exporter` works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Flask, g, request

from .core import Exporter, default_exporter
from .instrumentation.handle import PoolHandle
from .instrumentation.holders import holder
from .middleware import METHODS, OTHER_METHOD, UNMATCHED

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

EXTENSION = "sqlalchemy_pool_exporter"
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
    `buckets`) apply to every engine of `db`.
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        db: Any = None,
        exporter: Exporter | None = None,
        holders: bool = True,
        **instrument_options: Any,
    ) -> None:
        self.db = db
        self.exporter = exporter
        self.holders = holders
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


def _hold() -> None:
    held = holder(rule_holder())
    held.__enter__()
    setattr(g, _HELD, held)


def _release(exc: BaseException | None) -> None:
    held: holder | None = g.pop(_HELD, None)
    if held is not None:
        held.__exit__(None, None, None)
