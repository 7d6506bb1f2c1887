"""Every private name of SQLAlchemy, prometheus_client, aiohttp, FastAPI and OpenTelemetry's SDK we touch, in one place.

Each entry says what it is for, the versions it was checked on, and what happens when it is gone:
a public-API fallback where one exists, otherwise a feature that degrades (logged, counted), never
an exception in the application. Tests run on the floors and the latest releases (docs/compatibility.md).
"""

from __future__ import annotations

import dis
import operator
import threading
from collections.abc import Awaitable, Callable, Iterable
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.engine.base import Connection, RootTransaction
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.pool import Pool, QueuePool
from sqlalchemy.pool.base import _ConnectionFairy

if TYPE_CHECKING:
    # Types only: importing the package (instrument(), the ASGI pieces) loads no aiohttp module.
    import asyncio

    from aiohttp import web

    RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

F = TypeVar("F", bound=Callable[..., Any])

# -- SQLAlchemy (checked on 2.0.x and 2.1.9) ---------------------------------------------------

# The pool record behind a checked-out _ConnectionFairy: the key of our checkout table, the same
# object the checkin/close/invalidate events pass.
# The checkout path (instrumentation/pool.py connect()) and BEGIN/COMMIT/ROLLBACK (instrumentation/dialect.py)
# spell this attribute and `fairy_ref` below directly: on Python 3.11 an attrgetter call builds an argument
# tuple and takes the generic getattr, ~0.2k Ir each, where a specialised attribute load costs a few dozen.
# The getters below serve the rare paths; the names are these two, nowhere else.
fairy_record: Callable[[Any], Any] = operator.attrgetter("_connection_record")


# SQLAlchemy's own weak reference from a pool record to the proxy it is checked out to (set at
# checkout, cleared at checkin). Reused so that the checkout path creates no weak reference of its own.
record_fairy_ref: Callable[[Any], Any] = operator.attrgetter("fairy_ref")

# Pool._return_conn(record): where every checkin of a record ends (ConnectionRecord.checkin calls it
# right after the `checkin` event), on every pool class. instrumentation/pool.py wraps it per pool instance,
# instead of listening to `checkin`, whose dispatch costs more than our whole return path.
RETURN_CONN = "_return_conn"


# SQLAlchemy's methods whose whole body is one call, on the hot path: Pool.connect, Pool._return_conn,
# and DefaultDialect's do_begin (empty), do_commit, do_rollback, do_execute and do_execute_no_params.
# Our wrappers (instrumentation/pool.py, dialect.py) look the wrapped method up on the class at each
# call; where they find SQLAlchemy's own function there they make its one call themselves instead of
# calling it: one Python frame fewer on every checkout, return, BEGIN, COMMIT, reset on return and
# statement (docs/performance.md). A function counts as SQLAlchemy's own only if its bytecode equals the
# body written out below, compiled by this interpreter; so a SQLAlchemy release that changes a body (2.0.38's
# do_rollback has no skip_autocommit_rollback; 2.0.59's has), a dialect or pool class that overrides
# one, or a later patch of the class gets the call as before, only a frame dearer. Checked on 2.0.38, 2.0.59
# and 2.1.9, Python 3.11.7, 3.12.1 and 3.13.0.
class _Bodies:  # the bodies as SQLAlchemy 2.1 writes them; never called
    def connect(self: Any) -> Any:
        return _ConnectionFairy._checkout(self)

    def _return_conn(self: Any, record: Any) -> Any:
        self._do_return_conn(record)

    def do_begin(self: Any, dbapi_connection: Any) -> Any:
        pass

    def do_commit(self: Any, dbapi_connection: Any) -> Any:
        dbapi_connection.commit()

    def do_rollback(self: Any, dbapi_connection: Any) -> Any:
        if self.skip_autocommit_rollback and self.detect_autocommit_setting(dbapi_connection):
            return
        dbapi_connection.rollback()

    def do_execute(self: Any, cursor: Any, statement: Any, parameters: Any, context: Any = None) -> Any:
        cursor.execute(statement, parameters)

    def do_execute_no_params(self: Any, cursor: Any, statement: Any, context: Any = None) -> Any:
        cursor.execute(statement)


def _instructions(code: CodeType) -> list[tuple[str, Any]]:
    # `name.attr(...)` compiles to a method load where `name` was defined in the module and to an attribute
    # load (3.11: LOAD_ATTR; 3.12+: LOAD_ATTR and a PUSH_NULL) where it was imported: the same lookup and call.
    return [
        ("LOAD_ATTR" if i.opname == "LOAD_METHOD" else i.opname, i.argval)
        for i in dis.get_instructions(code)
        if i.opname != "PUSH_NULL"
    ]


def plain(cls: type, name: str) -> Callable[..., Any] | None:
    """`cls`'s own function `name` if its body is the one written out in _Bodies, else None."""
    func, reference = vars(cls).get(name), vars(_Bodies)[name]
    code = getattr(func, "__code__", None)
    if not isinstance(code, CodeType):
        return None
    ref = reference.__code__
    same = (
        _instructions(code) == _instructions(ref)
        and code.co_varnames == ref.co_varnames
        and code.co_argcount == ref.co_argcount
        and getattr(func, "__defaults__", None) == reference.__defaults__
    )
    return func if same else None


# The class whose _checkout Pool.connect calls (looked up at each call, as SQLAlchemy's body does).
FAIRY: Any = _ConnectionFairy
PLAIN_CONNECT, PLAIN_RETURN_CONN = plain(Pool, "connect"), plain(Pool, RETURN_CONN)
PLAIN_BEGIN, PLAIN_COMMIT, PLAIN_ROLLBACK, PLAIN_EXECUTE, PLAIN_EXECUTE_NO_PARAMS = (
    plain(DefaultDialect, name)
    for name in ("do_begin", "do_commit", "do_rollback", "do_execute", "do_execute_no_params")
)


# How a transaction ended without COMMIT: the application rolled it back, or it was closed.
# `Connection._rollback_impl` is where SQLAlchemy calls `dialect.do_rollback` for a Connection's
# transaction, and it gets there from `RootTransaction._close_impl`, which one of two methods called:
#   do_rollback <- Connection._rollback_impl <- RootTransaction._connection_rollback_impl
#     <- RootTransaction._close_impl <- RootTransaction._do_rollback  (Connection.rollback(),
#        Transaction.rollback(), an exception leaving a begin() block, Session.rollback())
#                                    <- RootTransaction._do_close     (Connection.close() or
#        Session.close() with the transaction open: how an ORM read ends)
# The pool's reset on return calls do_rollback itself (`_ConnectionFairy._reset`), no Transaction in
# between. So the frame ROLLBACK_DEPTH calls above the dialect wrapper tells the two apart: one C call
# and one identity test, on the rollback/close path only. Checked on SQLAlchemy 2.0.38, 2.0.59 and 2.1.9
# (Python 3.11.7, 3.12.1, 3.13.0: sys._getframe skips the same frames), and at import below: each link
# must still name the next. If one does not (a refactored SQLAlchemy), TRANSACTION_ENDS is False and
# every transaction ended without COMMIT counts as `rollback`, as before `close` existed: the rollback
# ratio then includes closed reads again.
# A COMMIT that raises sends no ROLLBACK (the transaction is deactivated first); `_commit_impl` hands the
# error to `_handle_dbapi_exception`, which asks `dialect.is_disconnect(error, connection, None)` about
# any DBAPI error: the wrapper there sees `_commit_impl` one frame above its caller (commit_failed).
ROLLBACK_DEPTH = 4


def _method_code(cls: type, name: str) -> CodeType | None:
    code = getattr(vars(cls).get(name), "__code__", None)
    return code if isinstance(code, CodeType) else None


def transaction_ends(
    root: type = RootTransaction, connection: type = Connection
) -> tuple[CodeType | None, CodeType | None, CodeType | None, CodeType | None]:
    """The code of _do_rollback, _do_close, Connection._rollback_impl and _commit_impl; all None
    unless each link of the chain above still names the next."""
    rollback, close = _method_code(root, "_do_rollback"), _method_code(root, "_do_close")
    close_impl = _method_code(root, "_close_impl")
    connection_rollback = _method_code(root, "_connection_rollback_impl")
    rollback_impl, commit_impl = _method_code(connection, "_rollback_impl"), _method_code(connection, "_commit_impl")
    chain = (
        (rollback, "_close_impl"),
        (close, "_close_impl"),
        (close_impl, "_connection_rollback_impl"),
        (connection_rollback, "_rollback_impl"),
        (rollback_impl, "do_rollback"),
        (commit_impl, "do_commit"),
    )
    if all(code is not None and callee in code.co_names for code, callee in chain):
        return rollback, close, rollback_impl, commit_impl
    return None, None, None, None


EXPLICIT_ROLLBACK, TRANSACTION_CLOSE, _ROLLBACK_IMPL, _COMMIT_IMPL = transaction_ends()
TRANSACTION_ENDS = EXPLICIT_ROLLBACK is not None
# Wrappers another layer stacks on ours put frames between Connection._rollback_impl and us; the
# slow path below looks this many frames up for it.
_STACKED = 4


def rolled_back(caller: FrameType | None) -> bool:
    """Whether the do_rollback called from `caller` is the application's rollback (False: a close).

    The slow path of the dialect wrapper, when the frame ROLLBACK_DEPTH up is neither method:
    another layer's wrapper stacked on ours, or no Transaction at all (the pool's reset on return
    of a connection dropped with its transaction open: a close).
    """
    if not TRANSACTION_ENDS:
        return True
    frame = caller
    for _ in range(_STACKED):
        if frame is None:
            return False
        if frame.f_code is _ROLLBACK_IMPL:
            for _ in range(ROLLBACK_DEPTH - 1):
                frame = frame.f_back
                if frame is None:
                    return False
            return frame.f_code is EXPLICIT_ROLLBACK
        frame = frame.f_back
    return False


def commit_failed(caller: FrameType | None) -> bool:
    """Whether `caller`, SQLAlchemy's `_handle_dbapi_exception` asking `is_disconnect` about an error
    with no cursor, is handling a failed COMMIT (`Connection._commit_impl` calls it so)."""
    if _COMMIT_IMPL is None or caller is None or caller.f_back is None:
        return False
    return caller.f_back.f_code is _COMMIT_IMPL


def max_overflow(pool: QueuePool) -> int | None:
    """QueuePool's max_overflow (-1 = unlimited), which it has no public reader for; None if unknown."""
    value = getattr(pool, "_max_overflow", None)
    return value if isinstance(value, int) else None


def idle_records(pool: QueuePool) -> Iterable[Any] | None:
    """The records waiting in a QueuePool's queue (each may or may not hold a DBAPI connection).

    `sqlalchemy.util.queue.Queue` keeps a deque in `.queue`; `AsyncAdaptedQueue` creates an
    asyncio.Queue lazily in `_queue`, whose deque is `_queue`. None when neither shape is found:
    the caller falls back to the public `checkedin()`.
    """
    queue: Any = getattr(pool, "_pool", None)
    if queue is None:
        return None
    items = getattr(queue, "queue", None)
    if items is None:
        if "_queue" not in vars(queue):
            return ()  # the asyncio queue is created at first use: nothing idle yet
        items = getattr(queue._queue, "_queue", None)
    if items is None:
        return None
    # tuple() copies the deque in one C call, so a concurrent get/put cannot break a walk over it.
    return tuple(items)


def pool_creator(pool: Pool) -> Callable[[], Any] | None:
    """The function a pool calls to open a DBAPI connection (do_connect listeners and creator= included).

    The readiness probe opens its own connection through it, outside the pool: it never waits in
    the pool nor shows in its numbers. None when the attribute is gone (the probe then reports
    that it cannot check).
    """
    creator = getattr(pool, "_creator", None)
    return creator if callable(creator) else None


# -- prometheus_client (checked on 0.23.1 and 0.26.0) ------------------------------------------

# The fast /metrics renderer spells names and labels exactly as prometheus_client's encoders do, with
# their own escaping helpers. If any is missing, FAST_RENDER is None and /metrics uses
# prometheus_client's encoder for everything (exposition/render.py logs that once and counts it).
try:
    from prometheus_client.openmetrics import exposition as _om
    from prometheus_client.utils import floatToGoString as _float_to_go
    from prometheus_client.validation import _is_valid_legacy_metric_name

    class _Escapes:
        """The escaping helpers of prometheus_client's encoders, as one object."""

        ALLOWUTF8: str = _om.ALLOWUTF8
        UNDERSCORES: str = _om.UNDERSCORES
        escape = staticmethod(_om._escape)
        is_legacy_labelname_rune = staticmethod(_om._is_legacy_labelname_rune)
        escape_label_name = staticmethod(_om.escape_label_name)
        escape_metric_name = staticmethod(_om.escape_metric_name)
        is_valid_legacy_metric_name = staticmethod(_is_valid_legacy_metric_name)
        float_to_go = staticmethod(_float_to_go)

    FAST_RENDER: type[_Escapes] | None = _Escapes
    FAST_RENDER_PROBLEM = ""
except (ImportError, AttributeError) as exc:  # pragma: no cover - exercised on old prometheus_client
    FAST_RENDER = None
    FAST_RENDER_PROBLEM = f"{type(exc).__name__}: {exc}"


def add_to_histogram(child: Any, bucket_deltas: Iterable[tuple[int, float]], sum_delta: float) -> None:
    """Add observations to a prometheus_client Histogram child by bucket, without replaying them.

    prometheus_client has no public "add n observations"; its per-bucket values are non-cumulative,
    like ours, so deltas go straight into `_buckets[i]` and `_sum` (both value objects with inc()).
    """
    buckets = child._buckets
    for i, delta in bucket_deltas:
        buckets[i].inc(delta)
    if sum_delta:
        child._sum.inc(sum_delta)


def multiprocess_values() -> bool:
    """Whether prometheus_client writes metric values to files (PROMETHEUS_MULTIPROC_DIR was set at import)."""
    from prometheus_client import values

    return bool(getattr(values.ValueClass, "_multiprocess", False))


# -- aiohttp (checked on 3.9.0 and 3.14.5) -------------------------------------------------------
#
# - `AppRunner.server` is aiohttp's low-level `web_server.Server`, the protocol factory; every
#   RequestHandler it makes copies its `request_handler` attribute when created, and calls it once
#   per request, as soon as the request head is parsed. Wrapping it tells us "head complete".
# - RequestHandler calls its access logger's `log()` after a response is fully written
#   (`finish_response`, also when the client went away), whether or not the logger is enabled on
#   3.9 and when `enabled` is True on later versions. That tells us "request done" (web/connections.py
#   passes its logger through the public `AppRunner(access_log_class=...)`).
# - `BaseRequest.protocol` is the RequestHandler serving the request.
# - `@web.middleware` only sets `__middleware_version__ = 1` on the function; an app calls a
#   middleware without it the old way, with a DeprecationWarning. `aiohttp_middleware` sets the same
#   mark without importing aiohttp, so that the top-level middleware module does not load it
#   (tests/house/test_install.py checks the mark is the decorator's).
# Without the first hook the cap still holds, but every connection counts as busy (new ones beyond
# the cap get the 503) and there is no head deadline: we could not tell when a head was complete.


def aiohttp_middleware(fn: F) -> F:
    """What `aiohttp.web.middleware` does to `fn`, without importing aiohttp."""
    fn.__middleware_version__ = 1  # type: ignore[attr-defined]
    return fn


def wrap_request_handler(server: Any, wrap: Callable[[RequestHandler], RequestHandler]) -> bool:
    """Wrap the low-level server's per-request handler; False when this aiohttp has none to wrap."""
    handler = getattr(server, "request_handler", None)
    if not callable(handler):
        return False
    server.request_handler = wrap(handler)
    return True


def request_protocol(request: web.BaseRequest) -> asyncio.BaseProtocol:
    """The connection (RequestHandler) serving `request`."""
    protocol: asyncio.BaseProtocol = request.protocol
    return protocol


# -- FastAPI (checked on 0.115.0, 0.137.0, 0.141.0 and 0.165.0; HolderMiddleware does not import it) -----
#
# Up to 0.136, include_router() copied each route into the including router with the prefix in its
# path, so scope["route"].path_format was the whole template. From 0.137 an included router is routed
# lazily: scope["route"] is the router's own APIRoute, whose path_format is relative to its include
# (`/notes/{note_id}`; every prefix of the include chain is lost), and the whole template is on the
# private `_EffectiveRouteContext` FastAPI keeps in scope["fastapi"]["effective_route_context"] (where
# its own telemetry names `http.route` from). Without it, names fall back to the relative template.


def included_route_template(scope: Any, route: object) -> str | None:
    """FastAPI's template for `route` with the prefixes of the routers that include it, if it recorded one."""
    fastapi = scope.get("fastapi")
    if not isinstance(fastapi, dict):
        return None
    context = fastapi.get("effective_route_context")
    # Only the context of this very route: a mounted app's plain route leaves its parent's context there.
    if context is None or getattr(context, "original_route", None) is not route:
        return None
    template = getattr(context, "path_format", None)
    return template if isinstance(template, str) and template else None


# -- OpenTelemetry SDK (opentelemetry-sdk, the `otel` extra; checked on 1.27.0 and 1.45.2) ----------
#
# Its MetricReader takes no MetricProducer yet (the specification's way to hand a reader metrics made
# elsewhere: open-telemetry/opentelemetry-python#4768, not in a release). What every reader has is
# the public `collect()`, which hands the SDK's own batch (MetricsData; nothing at all when the SDK
# has no metrics) to the protected `_receive_metrics(metrics_data, timeout_millis=...)`, the method
# its docs name for subclasses: InMemoryMetricReader keeps the batch, PeriodicExportingMetricReader
# exports it. Both are wrapped on one reader instance (otel.attach), never on the class: our metrics
# join each batch, or make one of their own when the SDK had none. If a release renames the hook,
# attach() raises TypeError naming it; nothing in the application changes.


def hook_metric_reader(reader: Any, add: Callable[[Any, float], Any]) -> Callable[[], None]:
    """Make `reader` pass every batch through `add(batch or None, timeout_millis)`; return the undo."""
    collect, receive = getattr(reader, "collect", None), getattr(reader, "_receive_metrics", None)
    if not callable(collect) or not callable(receive):
        raise TypeError(f"{type(reader).__name__} has no collect() and _receive_metrics(): not an SDK MetricReader")
    state = threading.local()

    def receive_with_ours(metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> Any:
        state.received = True
        return receive(add(metrics_data, timeout_millis), timeout_millis=timeout_millis, **kwargs)

    def collect_with_ours(timeout_millis: float = 10_000) -> None:
        state.received = False
        collect(timeout_millis=timeout_millis)
        if not state.received:  # the SDK had no metrics of its own this time: ours alone
            receive(add(None, timeout_millis), timeout_millis=timeout_millis)

    reader.collect = collect_with_ours
    reader._receive_metrics = receive_with_ours

    def undo() -> None:
        for name, ours in (("collect", collect_with_ours), ("_receive_metrics", receive_with_ours)):
            if vars(reader).get(name) is ours:
                delattr(reader, name)

    return undo
