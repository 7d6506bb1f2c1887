"""instrument()/uninstrument(): wire one engine's pool, dialect and connection events to PoolStats."""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool

from . import catalog, dialect, validation
from .leaks import LeakWatchdog, capture_stack
from .naming import error_class, pool_name, safe_url
from .reading import PoolReading, read_pool
from .stats import Checkout, PoolStats, bump

if TYPE_CHECKING:
    from .collector import PoolCollector

log = logging.getLogger("sqlalchemy_pool_exporter")
perf_counter = time.perf_counter

_HANDLES: weakref.WeakKeyDictionary[Engine, PoolHandle] = weakref.WeakKeyDictionary()
_HANDLES_LOCK = threading.Lock()
_ERROR_LOG_EVERY = 60.0


class PoolHandle:
    """What instrument() attached to one engine; uninstrument() takes all of it off again."""

    def __init__(
        self,
        engine: Engine,
        *,
        name: str,
        registry: CollectorRegistry,
        namespace: str,
        buckets: dict[str, Sequence[float]],
        leak_threshold: float | None,
        statements: bool,
        transactions: bool,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.registry = registry
        self.url = safe_url(engine.url)
        self.leak_threshold = leak_threshold
        self.stats = PoolStats(buckets)
        self._engine = weakref.ref(engine)
        self._listeners: list[tuple[str, Callable[..., Any]]] = []
        self._dialect_wrappers: dialect.Installed = []
        self._statements_pending = False
        self._error_logged: dict[str, float] = {}
        self._wrapped: weakref.WeakSet[Pool] = weakref.WeakSet()
        self._leak_warned: dict[Any, float] = {}
        # Records checked out of a pool that dispose() replaced: SQLAlchemy parks them in the dead
        # pool on return and they close when it is garbage-collected, with no `close` event.
        self._orphans: weakref.WeakKeyDictionary[Any, weakref.finalize[Any, Any] | None] = weakref.WeakKeyDictionary()
        self._collector: PoolCollector | None = None
        self._watchdog: LeakWatchdog | None = None
        self.active = True
        self._wire(engine, statements=statements, transactions=transactions)

    # -- wiring ---------------------------------------------------------------------------------

    def _wire(self, engine: Engine, *, statements: bool, transactions: bool) -> None:
        listen = self._listen
        # Pool events registered on the Engine follow it to the pool that dispose() creates.
        listen(engine, "checkin", self._make_on_return("checkin"))
        listen(engine, "detach", self._make_on_return("detach"))
        listen(engine, "connect", self._on_connect)
        listen(engine, "close", self._on_close)
        listen(engine, "close_detached", self._on_close_detached)
        listen(engine, "invalidate", self._on_invalidate)
        listen(engine, "soft_invalidate", self._on_soft_invalidate)
        # Not through ConnectionEvents or DialectEvents: registering any of those costs every
        # transaction 1% (dialect) to 15% (connection) before a listener runs (dialect.py).
        self._dialect_wrappers += dialect.wrap_connections(engine.dialect, self.stats, self._fail)
        if transactions:
            self._dialect_wrappers += dialect.wrap_transactions(engine.dialect, self.stats, self._fail)
        # SQLAlchemy's own first-connect probe (server version, schema…) is not the app's work:
        # statements are timed once the dialect is initialised, i.e. after the first connect.
        self._statements_pending = statements and engine.dialect.server_version_info is None
        if statements and not self._statements_pending:
            self._dialect_wrappers += dialect.wrap_statements(engine.dialect, self.stats, self._fail)
        # No event fires when a caller starts waiting, so the pool's one entry point is wrapped.
        self._wrap_pool(engine.pool)

    def _listen(self, target: Engine, name: str, fn: Callable[..., Any]) -> None:
        event.listen(target, name, fn)
        self._listeners.append((name, fn))

    def _wrap_pool(self, pool: Pool) -> None:
        if pool in self._wrapped:
            return
        original = pool.connect
        pool.connect = self._make_connect(original)  # type: ignore[method-assign]
        # engine.dispose() swaps the pool for pool.recreate(): hooked here rather than through the
        # engine_disposed event, because any ConnectionEvents listener makes every Connection join
        # the engine's dispatch, +15% app CPU per transaction (docs/performance.md).
        pool.recreate = self._make_recreate(pool, pool.recreate)  # type: ignore[method-assign]
        self._wrapped.add(pool)

    def _make_recreate(self, pool: Pool, original: Callable[[], Pool]) -> Callable[[], Pool]:
        def recreate() -> Pool:
            new = original()
            try:
                self._on_pool_replaced(pool, new)
            except Exception as exc:
                self._fail("pool_replaced", exc)
            return new

        recreate.__wrapped__ = original  # type: ignore[attr-defined]
        return recreate

    def _make_connect(self, original: Callable[[], Any]) -> Callable[[], Any]:
        stats = self.stats
        waiting = stats.waiting
        checkouts = stats.checked_out
        wait = stats.wait
        tokens = itertools.count()
        capture = self.leak_threshold is not None
        ref = weakref.ref
        on_timeout = self._on_timeout
        on_connect_error = self._on_connect_error
        fail = self._fail
        orphans = self._orphans
        # Histogram.observe() inlined: here a Python-level call costs as much as the update it makes
        # (docs/performance.md). The counts list is never replaced, so it can be held.
        wait_counts = wait.counts
        wait_bounds = wait.bounds
        replaced = [False]  # set once dispose() swapped this pool out; its waiters still get served

        def connect() -> Any:
            t0 = perf_counter()
            token = next(tokens)
            waiting[token] = t0
            try:
                fairy = original()
            except sa_exc.TimeoutError:
                waiting.pop(token, None)
                on_timeout()
                raise
            except Exception as exc:
                waiting.pop(token, None)
                on_connect_error(exc)
                raise
            except BaseException:  # cancelled while waiting: not an error of the pool
                waiting.pop(token, None)
                raise
            try:
                del waiting[token]
                t1 = perf_counter()
                waited = t1 - t0
                wait_counts[bisect_left(wait_bounds, waited)] += 1
                wait.sum += waited
                record = fairy._connection_record
                checkouts[record] = (t1, ref(fairy), capture_stack() if capture else None)  # see PoolStats.checkouts
                if replaced[0]:
                    orphans.setdefault(record, None)
            except Exception as exc:
                fail("checkout", exc)
            return fairy

        connect.__wrapped__ = original  # type: ignore[attr-defined]
        connect._pool_exporter_replaced = replaced  # type: ignore[attr-defined]
        return connect

    def _make_on_return(self, event_name: str) -> Callable[[Any, Any], None]:
        """The checkin (or detach) listener: the connection is no longer held."""
        stats = self.stats
        checkouts = stats.checked_out
        use = stats.use
        use_counts = use.counts
        use_bounds = use.bounds
        leak_warned = self._leak_warned
        # A detached connection is closed through close_detached, never with its dead pool.
        orphans = self._orphans if event_name == "checkin" else None
        fail = self._fail
        on_reclaimed = self._on_reclaimed

        def on_return(dbapi_connection: Any, record: Any) -> None:
            try:
                entry = checkouts.pop(record, None)
                if entry is None:
                    return
                held = perf_counter() - entry[0]
                use_counts[bisect_left(use_bounds, held)] += 1  # use.observe(held), inlined
                use.sum += held
                if entry[1]() is None:
                    on_reclaimed(Checkout._make(entry))
                if leak_warned:
                    self._leak_returned(record, Checkout._make(entry))
                if orphans and record in orphans:
                    self._orphan_returned(record)
            except Exception as exc:
                fail(event_name, exc)

        return on_return

    # -- pool events ----------------------------------------------------------------------------

    def _on_reclaimed(self, entry: Checkout) -> None:
        self.stats.leaked += 1
        where = "".join(entry.stack.format()) if entry.stack else ""
        log.warning(
            "pool %s: a connection was never returned and the garbage collector reclaimed it%s",
            self.name,
            f"; it was checked out at:\n{where}" if where else "",
            extra={"pool": self.name},
        )

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        self.stats.created += 1
        if self._statements_pending:
            try:
                self._time_statements()
            except Exception as exc:
                self._fail("connect", exc)

    def _time_statements(self) -> None:
        # Runs after SQLAlchemy's first_connect listener, which was registered before ours.
        self._statements_pending = False
        engine = self._engine()
        if engine is not None and self.active:
            self._dialect_wrappers += dialect.wrap_statements(engine.dialect, self.stats, self._fail)

    def _on_close(self, dbapi_connection: Any, record: Any) -> None:
        self.stats.closed += 1
        if self._orphans:
            finalizer = self._orphans.pop(record, None)
            if finalizer is not None:
                finalizer.detach()

    def _orphan_returned(self, record: Any) -> None:
        # Count the close when the record dies with its dead pool, unless a `close` event comes first.
        # A waiter of the dead pool may check the same record out and in again: one count per record.
        previous = self._orphans.get(record)
        if previous is not None:
            previous.detach()
        finalizer = weakref.finalize(record, _count_close, self.stats)
        finalizer.atexit = False
        self._orphans[record] = finalizer

    def _on_close_detached(self, dbapi_connection: Any) -> None:
        self.stats.closed += 1

    def _on_invalidate(self, dbapi_connection: Any, record: Any, exception: BaseException | None) -> None:
        self.stats.invalidations["hard"] += 1
        try:
            # No ROLLBACK is sent on a connection being thrown away; the server rolls it back.
            dialect.end_transaction(self.stats, record.info, "rollback")
        except Exception as exc:
            self._fail("invalidate", exc)

    def _on_soft_invalidate(self, dbapi_connection: Any, record: Any, exception: BaseException | None) -> None:
        self.stats.invalidations["soft"] += 1

    def _on_pool_replaced(self, old: Pool, new: Pool) -> None:
        """engine.dispose() made `new` to replace `old` (it becomes engine.pool right after)."""
        if not self.active:
            return
        # The new pool has handed nothing out yet: every checkout now is from a replaced pool.
        for record in tuple(self.stats.checked_out):
            self._orphans.setdefault(record, None)
        for pool in list(self._wrapped):
            wrapper = vars(pool).get("connect")
            if pool is not new and wrapper is not None:
                wrapper._pool_exporter_replaced[0] = True
        self._wrap_pool(new)

    def _on_timeout(self) -> None:
        try:
            self.stats.timeouts += 1
            r = self.read()
            if r is None:
                return
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
                extra={
                    "pool": self.name,
                    "size": r.size,
                    "used": r.used,
                    "idle": r.idle,
                    "overflow": r.overflow,
                    "pending": r.pending,
                    "timeout": r.timeout,
                },
            )
        except Exception as exc:
            self._fail("timeout", exc)

    def _on_connect_error(self, error: BaseException) -> None:
        try:
            bump(self.stats.connect_errors, error_class(error))
        except Exception as exc:
            self._fail("connect_error", exc)

    # -- our own failures -----------------------------------------------------------------------

    def _fail(self, where: str, exc: BaseException) -> None:
        """Count and log a bug of ours; never let it reach the application."""
        self.stats.errors += 1
        now = time.monotonic()
        if now - self._error_logged.get(where, -_ERROR_LOG_EVERY) >= _ERROR_LOG_EVERY:
            self._error_logged[where] = now
            log.error(
                "pool %s: exporter listener %r failed (counted; the app is unaffected)",
                self.name,
                where,
                exc_info=exc,
                extra={"pool": self.name},
            )

    # -- leak detection -------------------------------------------------------------------------

    def check_leaks(self) -> int:
        """Warn once for each connection held longer than the leak threshold; return how many."""
        threshold = self.leak_threshold
        if threshold is None:
            return 0
        now = perf_counter()
        found = 0
        for record, entry in tuple(self.stats.checkouts.items()):
            held = now - entry.started
            if held < threshold or self._leak_warned.get(record) == entry.started:
                continue
            self._leak_warned[record] = entry.started
            found += 1
            where = "".join(entry.stack.format()) if entry.stack else "(stack not captured)\n"
            log.warning(
                "pool %s: connection held for %.1fs, longer than the leak threshold of %gs; checked out at:\n%s",
                self.name,
                held,
                threshold,
                where,
                extra={"pool": self.name, "held_seconds": round(held, 3)},
            )
        return found

    def _leak_returned(self, record: Any, entry: Checkout) -> None:
        if self._leak_warned.get(record) == entry.started:
            del self._leak_warned[record]
            log.info(
                "pool %s: connection reported as a possible leak came back after %.1fs",
                self.name,
                perf_counter() - entry.started,
                extra={"pool": self.name},
            )

    # -- reading --------------------------------------------------------------------------------

    @property
    def engine(self) -> Engine | None:
        return self._engine()

    def read(self) -> PoolReading | None:
        """The pool's live numbers now, or None once the engine is gone."""
        engine = self._engine()
        if engine is None:
            return None
        return read_pool(engine.pool, self.stats)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready view of configuration, live numbers and totals (the successor of status())."""
        r = self.read()
        s = self.stats
        live: dict[str, Any] = r._asdict() if r is not None else {}
        return {
            "name": self.name,
            "url": self.url,
            "alive": r is not None,
            **live,
            "checkouts": s.wait.count,
            "timeouts": s.timeouts,
            "connections_created": s.created,
            "connections_closed": s.closed,
            "connect_errors": dict(s.connect_errors),
            "invalidations": dict(s.invalidations),
            "disconnects": s.disconnects,
            "leaked": s.leaked,
            "transactions": {k: h.count for k, h in s.transaction.items()},
            "exporter_errors": s.errors,
        }

    def status_fields(self) -> dict[str, Any]:
        """pool/size/used/idle/overflow/pending, for structured log lines."""
        r = self.read()
        if r is None:
            return {"pool": self.name}
        return {
            "pool": self.name,
            "size": r.size,
            "used": r.used,
            "idle": r.idle,
            "overflow": r.overflow,
            "pending": r.pending,
        }

    # -- teardown -------------------------------------------------------------------------------

    def uninstrument(self) -> None:
        """Remove every listener, wrapper and collector entry this handle added; idempotent."""
        if not self.active:
            return
        self.active = False
        engine = self._engine()
        if engine is not None:
            for name, fn in self._listeners:
                with contextlib.suppress(sa_exc.InvalidRequestError):
                    event.remove(engine, name, fn)
        self._listeners.clear()
        if engine is not None:
            dialect.unwrap(engine.dialect, self._dialect_wrappers)
        self._dialect_wrappers = []
        for pool in list(self._wrapped):
            if "connect" in vars(pool):
                del pool.connect
            if "recreate" in vars(pool):
                del pool.recreate
        self._wrapped = weakref.WeakSet()
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self._collector is not None:
            self._collector.remove(self)
            self._collector = None
        from .multiprocess import detach_handle

        detach_handle(self)
        with _HANDLES_LOCK:
            if engine is not None and _HANDLES.get(engine) is self:
                del _HANDLES[engine]


def _count_close(stats: PoolStats) -> None:
    stats.closed += 1


def _sync_engine(engine: Engine | AsyncEngine) -> Engine:
    if isinstance(engine, AsyncEngine):
        return engine.sync_engine
    if isinstance(engine, Engine):
        return engine
    raise TypeError(f"instrument() takes a SQLAlchemy Engine or AsyncEngine, not {type(engine).__name__}")


def instrument(
    engine: Engine | AsyncEngine,
    *,
    name: str | None = None,
    registry: CollectorRegistry | None = None,
    namespace: str = catalog.DEFAULT_NAMESPACE,
    buckets: dict[str, Sequence[float]] | None = None,
    leak_threshold: float | None = None,
    statements: bool = True,
    transactions: bool = True,
    multiprocess: bool | None = None,
) -> PoolHandle:
    """Export one engine's pool, connections and transactions; a second call returns the same handle.

    `name` becomes the `pool` label (default `host:port/database`). `buckets` overrides histogram
    bounds by set (`wait`, `use`, `create`, `statement`). `leak_threshold` (seconds) warns, with the
    checkout's stack, about connections held longer. `multiprocess` defaults to whether
    PROMETHEUS_MULTIPROC_DIR is set; then numbers also go to the shared directory for a sidecar.
    """
    from .collector import collector_for
    from .multiprocess import attach_handle, multiprocess_enabled

    sync = _sync_engine(engine)
    with _HANDLES_LOCK:
        existing = _HANDLES.get(sync)
        if existing is not None and existing.active:
            return existing
        leak_threshold = validation.leak_threshold(leak_threshold)
        namespace = validation.namespace(namespace)
        bounds: dict[str, Sequence[float]] = dict(validation.buckets(buckets))
        registry = REGISTRY if registry is None else registry
        collector = collector_for(registry, namespace)
        handle_name = collector.unique_name(name, pool_name(sync.url))
        handle = PoolHandle(
            sync,
            name=handle_name,
            registry=registry,
            namespace=namespace,
            buckets=bounds,
            leak_threshold=leak_threshold,
            statements=statements,
            transactions=transactions,
        )
        collector.add(handle)
        handle._collector = collector
        _HANDLES[sync] = handle
    if leak_threshold is not None:
        handle._watchdog = LeakWatchdog(handle, min(max(leak_threshold / 4, 0.05), 1.0))
    if multiprocess if multiprocess is not None else multiprocess_enabled():
        attach_handle(handle)
    return handle


def uninstrument(engine: Engine | AsyncEngine) -> None:
    """Undo instrument() on this engine; a no-op if it was not instrumented."""
    handle = _HANDLES.get(_sync_engine(engine))
    if handle is not None:
        handle.uninstrument()


def handle_for(engine: Engine | AsyncEngine) -> PoolHandle | None:
    """The active handle of an engine, if it is instrumented."""
    handle = _HANDLES.get(_sync_engine(engine))
    return handle if handle is not None and handle.active else None


def handles() -> list[PoolHandle]:
    """Every active handle in this process whose engine is still alive."""
    with _HANDLES_LOCK:
        return [h for h in _HANDLES.values() if h.active and h.engine is not None]
