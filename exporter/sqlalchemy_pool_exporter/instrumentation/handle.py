"""PoolHandle: what instrument() attached to one engine, and the read side the exposition depends on.

The handle only assembles its parts: Hooks (the undo list), PoolTap (the pool hot path), the
dialect wrappers (transactions, statements), LeakTracker and Failures. Collectors, the exposition,
the multiprocess writer and the views read it through the PoolSource protocol (reading.py).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy.engine import Engine

from .. import metricnames, validation
from ..labels import safe_url, server_labels
from . import advice, appname, backends, dialect, holders, views
from .failures import Failures
from .hooks import Hooks
from .leaks import LeakTracker
from .pool import PoolTap
from .reading import PoolReading, read_pool
from .serverview import ServerPoller
from .stats import PoolStats

log = logging.getLogger("sqlalchemy_pool_exporter")

# Set on the engine's dialect (shared by the engine and its execution_options() copies): which handle
# instruments it. It is the engine's own state, so any Exporter can tell an engine is taken.
MARKER = "_sqlalchemy_pool_exporter_handle"


class PoolHandle:
    """One instrumented engine: its `pool` label, stats and live reading; uninstrument() undoes it all."""

    def __init__(
        self,
        engine: Engine,
        *,
        name: str,
        owner: object,
        buckets: Mapping[str, Sequence[float]],
        max_holders: int,
        leak_threshold: float | None,
        statements: bool,
        transactions: bool,
        detach: Callable[[PoolHandle], None],
        application_name: str | None = None,
        advice_window: float = advice.DEFAULT_WINDOW,
        advice_wait_probability: float = advice.DEFAULT_WAIT_PROBABILITY,
        server_view: bool = False,
        server_view_interval: float = 5.0,
        server_view_queries: bool = False,
    ) -> None:
        self.name = name
        self.url = _printable_url(engine)
        self.db_system = metricnames.db_system(engine.dialect.name)
        self.owner = owner  # the Exporter that made this handle
        self.leak_threshold = leak_threshold
        self.options = {
            "leak_threshold": leak_threshold,
            "statements": statements,
            "transactions": transactions,
            "server_view": server_view,
            "server_view_interval": server_view_interval,
            "server_view_queries": server_view_queries,
        }
        self.stats = PoolStats(buckets, max_holders)
        self.stats.transactions = transactions
        self.stats.window.configure(advice_window, advice_wait_probability)
        self.connects_to = server_labels(engine.url)
        self.fail = Failures(name, self.stats)
        self.leaks = LeakTracker(name, self.stats, leak_threshold, self.fail)
        self.hooks = Hooks()
        self.tap = PoolTap(self.stats, self.hooks, self.fail, self.leaks, self._on_timeout)
        self._engine = weakref.ref(engine)
        self._detach = detach
        self._statements_pending = False
        self.active = True
        # What new PostgreSQL connections the app did not name are named (appname.py); None: left alone.
        self.application_name: str | None = None
        try:
            self._wire(engine, statements=statements, transactions=transactions, application_name=application_name)
        except BaseException:
            self.active = False
            self.hooks.undo()
            raise
        self.leaks.start()
        # What the database sees of the checkouts (serverview.py); None: off, or a database we cannot ask.
        self.server_view: ServerPoller | None = None
        if server_view:
            if backends.supported(engine.dialect.name, engine.dialect.driver):
                self.server_view = ServerPoller(
                    engine, self.stats, self.fail, interval=server_view_interval, queries=server_view_queries
                )
                self.server_view.start()
            else:
                log.warning(
                    "pool %s: server_view needs PostgreSQL (asyncpg, psycopg, psycopg2) or MySQL/MariaDB "
                    "(pymysql, mysqldb); %s+%s has none",
                    name,
                    engine.dialect.name,
                    engine.dialect.driver,
                    extra={"pool": name},
                )

    def _wire(self, engine: Engine, *, statements: bool, transactions: bool, application_name: str | None) -> None:
        hooks = self.hooks
        self.tap.install(engine)
        # Not through ConnectionEvents or DialectEvents: registering any of those costs every
        # transaction 1% (dialect) to 15% (connection) before a listener runs (dialect.py).
        dialect.wrap_connections(engine.dialect, self.stats, self.fail, hooks)
        # After wrap_connections: it wraps the connect it finds, the class's; this one wraps that.
        if application_name is not None and appname.install(engine.dialect, application_name, hooks, self.fail):
            self.application_name = application_name
        if transactions:
            dialect.wrap_transactions(engine.dialect, self.stats, self.fail, hooks)
        # SQLAlchemy's own first-connect probe (server version, schema…) is not the app's work:
        # statements are timed once the dialect is initialised, i.e. after the first connect.
        if statements and engine.dialect.server_version_info is None:
            self._statements_pending = True
            hooks.listen(engine, "connect", self._on_first_connect)
        elif statements:
            dialect.wrap_statements(engine.dialect, self.stats, self.fail, hooks)
        hooks.patch(engine.dialect, MARKER, weakref.ref(self))

    def _on_first_connect(self, dbapi_connection: Any, record: Any) -> None:
        # Runs after SQLAlchemy's first_connect listener, which was registered before ours.
        if not self._statements_pending:
            return
        self._statements_pending = False
        try:
            engine = self._engine()
            if engine is not None and self.active:
                dialect.wrap_statements(engine.dialect, self.stats, self.fail, self.hooks)
        except Exception as exc:
            self.fail("connect", exc)

    def _on_timeout(self) -> None:
        try:
            self.stats.timeouts += 1
            if holders.ATTRIBUTING[0]:
                self.stats.holders.slot(holders.current_name()).timeouts += 1
            r = self.read()
            if r is None:
                return
            fields = {"size": r.size, "used": r.used, "idle": r.idle, "overflow": r.overflow, "pending": r.pending}
            log.warning(
                "pool %s: timed out waiting for a connection: size=%s used=%s idle=%s overflow=%s "
                "pending=%s timeout=%ss",
                self.name,
                r.size,
                r.used,
                r.idle,
                r.overflow,
                r.pending,
                r.timeout,
                extra={"pool": self.name, **fields, "timeout": r.timeout},
            )
        except Exception as exc:
            self.fail("timeout", exc)

    # -- the read side (reading.PoolSource) -----------------------------------------------------

    @property
    def engine(self) -> Engine | None:
        return self._engine()

    def read(self) -> PoolReading | None:
        """The pool's live numbers now, or None once the engine is gone."""
        engine = self._engine()
        if engine is None:
            return None
        return read_pool(engine.pool, self.stats, self.connects_to)

    def check_leaks(self) -> int:
        """Warn once for each connection held longer than the leak threshold; return how many."""
        return self.leaks.check()

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready view: name, URL (password hidden), pool class, then every catalog field."""
        reading = self.read()
        return views.pool_row(self, reading)

    def status_fields(self) -> dict[str, Any]:
        """pool/size/used/idle/overflow/pending, for structured log lines."""
        r = self.read()
        if r is None:
            return {"pool": self.name}
        return {"pool": self.name, "size": r.size, "used": r.used, "idle": r.idle, "overflow": r.overflow,
                "pending": r.pending}  # fmt: skip

    # -- teardown -------------------------------------------------------------------------------

    def uninstrument(self) -> None:
        """Remove every listener and wrapper this handle installed, and its series; idempotent."""
        if not self.active:
            return
        self.active = False
        self.hooks.undo()
        self.leaks.stop()
        if self.server_view is not None:
            self.server_view.stop()
        self._detach(self)


def _printable_url(engine: Engine) -> str:
    """The engine's URL with the password hidden, made encodable (a file path may carry lone surrogates)."""
    url = engine.url
    if url.database:
        url = url.set(database=validation.encodable(url.database))
    return validation.encodable(safe_url(url))


def handle_of(engine: Engine) -> PoolHandle | None:
    """The active handle instrumenting this engine (whichever Exporter made it), or None."""
    ref = vars(engine.dialect).get(MARKER)
    handle = ref() if ref is not None else None
    return handle if handle is not None and handle.active else None
